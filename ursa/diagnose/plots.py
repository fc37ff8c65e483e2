"""Pictures of training, written as PNG files (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ursa.util.files import atomic_path
from ursa.util.numbers import smooth


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A figure on the Agg canvas (no display), ncols panels of width x height inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically: a crash never leaves half a picture."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def losses_figure(batch_losses: Sequence[float], batch_epochs: Sequence[float], rows: Sequence[dict]):
    """One panel: per-batch train loss (raw, faint; smoothed, bold) and per-epoch valid loss against epochs."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    smoothed = smooth(batch_losses, 0.9)
    if batch_losses:
        ax.plot(batch_epochs, _finite(batch_losses), color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(batch_epochs, _finite(smoothed), color="tab:blue", label="train (smoothed)")
    if rows:
        ax.plot([r["epoch"] + 1 for r in rows], _finite([r["valid_loss"] for r in rows]), "o-", color="tab:orange",
                label="valid")
    if _wide_range(smoothed + [r["valid_loss"] for r in rows]):
        ax.set_yscale("log")  # a diverged run: keep the start of the curve readable
    if rows:
        _mark_unfreeze(ax, rows)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training and validation loss")
    if batch_losses or rows:
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_losses(batch_losses: Sequence[float], batch_epochs: Sequence[float], rows: Sequence[dict],
                path: str | Path) -> Path:
    """losses.png: the lesson's recorder.plot_losses(), to read under- and overfitting."""
    return save_figure(losses_figure(batch_losses, batch_epochs, rows), path)


def _finite(values: Sequence[float]) -> list[float]:
    """inf would wreck the axis limits; as NaN it is simply a gap."""
    return [v if math.isfinite(v) else math.nan for v in values]


def _mark_unfreeze(ax, rows: Sequence[dict]) -> None:
    """A dashed line where fine-tuning of the whole network started."""
    stages = [r["stage"] for r in rows]
    if "unfrozen" in stages and "frozen" in stages:
        x = rows[stages.index("unfrozen")]["epoch"]
        ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.text(x, ax.get_ylim()[1], " unfreeze", va="top", fontsize=8, color="grey")


def _wide_range(values: Sequence[float]) -> bool:
    """Values spanning over two decades read better on a log axis (a diverged loss, LRs of two stages)."""
    pos = [v for v in values if math.isfinite(v) and v > 0]
    return len(pos) > 1 and max(pos) / min(pos) > 100


def _stage_peaks(batch_lrs: Sequence[float], batch_epochs: Sequence[float],
                 rows: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """Highest LR of each stage and where it was reached (one-cycle's peak = the max_lr asked for)."""
    stage_of = {r["epoch"]: r["stage"] for r in rows}
    peaks: dict[str, tuple[float, float]] = {}
    for lr, pos in zip(batch_lrs, batch_epochs):
        stage = stage_of.get(max(0, math.ceil(pos) - 1), "")
        if math.isfinite(lr) and (stage not in peaks or lr > peaks[stage][1]):
            peaks[stage] = (pos, lr)
    return {s: p for s, p in peaks.items() if s}


def lr_figure(batch_lrs: Sequence[float], batch_epochs: Sequence[float], rows: Sequence[dict] = ()):
    """One panel: the learning rate of every batch (the one-cycle shape of each stage)."""
    fig = new_figure(height=3.5)
    ax = fig.add_subplot(1, 1, 1)
    if batch_lrs:
        ax.plot(batch_epochs, _finite(batch_lrs), color="tab:green")
        for stage, (x, peak) in _stage_peaks(batch_lrs, batch_epochs, rows).items():
            ax.annotate(f"{stage} peak {peak:.1e}", (x, peak), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color="tab:green")
        top = max((v for v in batch_lrs if math.isfinite(v)), default=0.0)
        ax.set_ylim(0, top * 1.18 if top > 0 else None)  # room for the peak labels
    if rows:
        _mark_unfreeze(ax, rows)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate (head)")
    ax.set_title("learning rate schedule (one cycle per stage)")
    ax.grid(alpha=0.3)
    return fig


def plot_lr(batch_lrs: Sequence[float], batch_epochs: Sequence[float], path: str | Path,
            rows: Sequence[dict] = ()) -> Path:
    """lr.png: check the schedule actually did what was asked (warm-up, then anneal)."""
    return save_figure(lr_figure(batch_lrs, batch_epochs, rows), path)


def metrics_figure(rows: Sequence[dict]):
    """Two panels per epoch: error rate (best marked), and train vs valid loss (what the advisor reads)."""
    fig = new_figure(ncols=2, width=5.0, height=3.6)
    ax_err, ax_loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if rows:
        x = [r["epoch"] for r in rows]
        err = _finite([r["error_rate"] for r in rows])
        ax_err.plot(x, err, "o-", color="tab:red", label="error rate")
        bal = _finite([r.get("balanced_error", math.nan) for r in rows])
        if any(math.isfinite(b) and abs(b - e) > 1e-9 for b, e in zip(bal, err)):  # lopsided validation classes
            ax_err.plot(x, bal, "s--", color="tab:purple", alpha=0.8, label="balanced error")
        ok = [(e, i) for i, e in enumerate(err) if math.isfinite(e)]
        if ok:
            best = min(e for e, _ in ok)
            i = max(i for e, i in ok if e == best)  # the latest epoch at its best, as the advice reads it
            ax_err.plot([x[i]], [best], "*", ms=14, color="gold", mec="black", label=f"best {best:.3f}")
        ax_loss.plot(x, _finite([r["train_loss"] for r in rows]), "o-", color="tab:blue", label="train")
        ax_loss.plot(x, _finite([r["valid_loss"] for r in rows]), "o-", color="tab:orange", label="valid")
        if _wide_range([r["train_loss"] for r in rows] + [r["valid_loss"] for r in rows]):
            ax_loss.set_yscale("log")
        for ax in (ax_err, ax_loss):
            _mark_unfreeze(ax, rows)
            ax.set_xticks(x)
        ax_err.legend()
        ax_loss.legend()
    ax_err.set_ylim(bottom=0)
    ax_err.set(xlabel="epoch", ylabel="error rate", title="validation error rate")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    for ax in (ax_err, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_metrics(rows: Sequence[dict], path: str | Path) -> Path:
    """metrics.png: is the error still falling, or rising again (too many epochs)?"""
    return save_figure(metrics_figure(rows), path)


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                   suggestions: dict[str, tuple[float, float]]):
    """One panel: loss against learning rate (log axis), each suggestion marked and labelled."""
    fig = new_figure(height=4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lrs, _finite(losses), color="tab:blue", alpha=0.25, lw=0.8, label="loss")
    ax.plot(lrs, _finite(smoothed), color="tab:blue", label="smoothed loss")
    styles = {"valley": ("o", "tab:red"), "steep": ("s", "tab:orange")}
    for name, (lr, loss) in suggestions.items():
        if not (math.isfinite(lr) and math.isfinite(loss)):
            continue
        marker, color = styles.get(name, ("D", "tab:purple"))
        ax.plot([lr], [loss], marker, ms=9, color=color, label=f"{name}: {lr:.1e}", zorder=3)
        ax.axvline(lr, color=color, ls=":", lw=0.8)
    ax.set_xscale("log")
    fin = [v for v in smoothed if math.isfinite(v)]
    if fin:  # frame the curve up to its minimum: the blow-up at the end would squash the rest
        k = fin.index(min(fin))
        raw = [v for v in losses[:k + 1] if math.isfinite(v)] or fin
        lo = min(min(fin), min(raw))
        hi = max(max(fin[:k + 1]), min(max(raw), 1.5 * fin[0]))
        pad = 0.05 * ((hi - lo) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title("learning rate finder")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 suggestions: dict[str, tuple[float, float]], path: str | Path) -> Path:
    """lr_find.png: pick a learning rate where the loss is still falling clearly."""
    return save_figure(lr_find_figure(lrs, losses, smoothed, suggestions), path)


def confusion_figure(cm: Sequence[Sequence[int]], classes: Sequence[str]):
    """One panel: counts with actual classes down the side and predicted along the bottom."""
    import numpy as np

    cm = np.asarray(cm)
    n = len(classes)
    side = min(12.0, max(4.0, 0.9 * n + 2.0))
    fig = new_figure(width=side, height=side)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max()) if cm.size else 1))
    ax.set_xticks(range(n), labels=list(classes), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=list(classes))
    hi = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            v = int(cm[i, j])
            ax.text(j, i, str(v), ha="center", va="center", fontsize=12 if n <= 10 else 7,
                    color="white" if hi and v > hi / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> Path:
    """confusion_matrix.png: which classes the model mixes up, at a glance."""
    return save_figure(confusion_figure(cm, classes), path)


def top_losses_figure(images: Sequence, titles: Sequence[str], ncols: int = 4):
    """One panel per image (PIL image or HxWx3 array), titled predicted/actual/loss/probability."""
    import numpy as np

    n = max(1, len(images))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = new_figure(width=2.6 * ncols, height=2.9 * nrows)
    fig.suptitle("top losses: predicted / actual / loss / probability", fontsize=11)
    for k, (im, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(np.asarray(im))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_top_losses(images: Sequence, titles: Sequence[str], path: str | Path, ncols: int = 4) -> Path:
    """top_losses.png: the images the model is most wrong (or least sure) about."""
    return save_figure(top_losses_figure(images, titles, ncols), path)


def plot_training(batch_losses: Sequence[float], batch_lrs: Sequence[float], batch_epochs: Sequence[float],
                  rows: Sequence[dict], out: str | Path) -> dict[str, Path]:
    """losses.png, lr.png and metrics.png into a run folder; name -> path."""
    out = Path(out)
    return {
        "losses": plot_losses(batch_losses, batch_epochs, rows, out / "losses.png"),
        "lr": plot_lr(batch_lrs, batch_epochs, out / "lr.png", rows),
        "metrics": plot_metrics(rows, out / "metrics.png"),
    }
