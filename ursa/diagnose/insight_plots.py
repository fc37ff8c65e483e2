"""Pictures of the insight sections: the learning curve (curve.png) and the reliability diagram (reliability.png)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ursa.diagnose.plots import new_figure, save_figure


def _law(fit: dict[str, float], n: np.ndarray) -> np.ndarray:
    return fit["a"] * np.power(np.maximum(n, 1e-9), -fit["b"]) + fit["c"]


def curve_figure(curve: dict[str, Any]):
    """Two panels: overall validation error against images per class (draws, mean, spread, fitted law), and per class."""
    fig = new_figure(ncols=2, width=5.2, height=3.8)
    ax, axc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    n = np.asarray(curve["n_per_class"], dtype=float)  # [F, C]
    err = 100 * np.asarray(curve["errors"], dtype=float)  # [F, D]
    cls_err = 100 * np.asarray(curve["class_errors"], dtype=float)  # [F, D, C]
    x = n.mean(1)
    mean, sd = err.mean(1), err.std(1)
    for d in range(err.shape[1]):
        ax.plot(x, err[:, d], "o", color="tab:blue", alpha=0.3, ms=4, label="draws" if d == 0 else None)
    ax.fill_between(x, mean - sd, mean + sd, color="tab:blue", alpha=0.15, label="mean ± 1 sd")
    ax.plot(x, mean, "o-", color="tab:blue", label="mean")
    xs = np.linspace(x.min(), x.max() * 1.6, 100)
    ax.plot(xs, 100 * _law(curve["fit"], xs), "--", color="tab:orange",
            label=f"fit a·n^-{curve['fit']['b']:.2f} + {100 * curve['fit']['c']:.1f}%")
    ax.axvline(x.max(), color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("validation error (%)")
    ax.set_title("learning curve")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    colors = _colors(len(curve["classes"]))
    for c, name in enumerate(curve["classes"]):
        xc, m, s = n[:, c], cls_err[:, :, c].mean(1), cls_err[:, :, c].std(1)
        axc.fill_between(xc, m - s, m + s, color=colors[c], alpha=0.12)
        axc.plot(xc, m, "o-", color=colors[c], label=name, ms=4)
        xcs = np.linspace(xc.min(), xc.max() * 1.6, 60)
        axc.plot(xcs, 100 * _law(curve["class_fits"][c], xcs), "--", color=colors[c], lw=0.8)
    axc.set_xlabel("training images of the class")
    axc.set_ylabel("error on the class's validation images (%)")
    axc.set_title("per class")
    axc.set_ylim(bottom=0)
    axc.grid(alpha=0.3)
    axc.legend(fontsize=8)
    return fig


def plot_curve(curve: dict[str, Any], path: str | Path) -> Path:
    """curve.png: how the error falls with more images (from LearningCurve.to_json())."""
    return save_figure(curve_figure(curve), path)


def reliability_figure(before: Sequence[dict], after: Sequence[dict], ece_before: float, ece_after: float,
                       temperature: float):
    """Accuracy against confidence per bin, before and after temperature scaling, with the diagonal of perfect calibration."""
    fig = new_figure(width=4.8, height=4.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    for bins, label, color, marker in ((before, f"raw (ECE {100 * ece_before:.1f}%)", "tab:red", "s"),
                                       (after, f"T = {temperature:.2f} (ECE {100 * ece_after:.1f}%)", "tab:blue", "o")):
        pts = [(b["confidence"], b["accuracy"], b["count"]) for b in bins
               if b["count"] and math.isfinite(b["confidence"])]
        if not pts:
            continue
        c, a, k = (np.array(v, dtype=float) for v in zip(*pts))
        ax.plot(c, a, "-", color=color, alpha=0.6)
        ax.scatter(c, a, s=12 + 60 * k / k.max(), color=color, marker=marker, label=label, zorder=3)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability on the validation set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def plot_reliability(before: Sequence[dict], after: Sequence[dict], ece_before: float, ece_after: float,
                     temperature: float, path: str | Path) -> Path:
    """reliability.png: the reliability diagram before and after temperature scaling (point size: items in the bin)."""
    return save_figure(reliability_figure(before, after, ece_before, ece_after, temperature), path)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
