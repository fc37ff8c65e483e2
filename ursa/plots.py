"""Pictures of training, written as PNG files (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ursa.util import atomic_path


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def smooth(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """fastai's debiased exponential moving average, so noisy batch losses read as a curve."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        if not math.isfinite(v):
            out.append(v)
            continue
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_losses(batch_losses: Sequence[float], batch_epochs: Sequence[float], rows: Sequence[dict],
                path: str | Path) -> Path:
    """Per-batch train loss (raw, faint; smoothed, bold) and per-epoch valid loss against epochs."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if batch_losses:
        ax.plot(batch_epochs, batch_losses, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(batch_epochs, smooth(batch_losses, 0.9), color="tab:blue", label="train (smoothed)")
    if rows:
        ax.plot([r["epoch"] + 1 for r in rows], [r["valid_loss"] for r in rows], "o-", color="tab:orange",
                label="valid")
        stages = [r["stage"] for r in rows]
        if "unfrozen" in stages and "frozen" in stages:
            x = stages.index("unfrozen")
            ax.axvline(x, color="grey", ls="--", lw=0.8)
            ax.text(x, ax.get_ylim()[1], " unfreeze", va="top", fontsize=8, color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training and validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
