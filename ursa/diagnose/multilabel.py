"""Multi-label figures, numpy only: per-label precision/recall/F1, macro and sample-averaged F1, mAP, the thresholds.

Targets are multi-hot [N, K] (0/1), probabilities [N, K] (a sigmoid per label). ``choose_thresholds``
picks each label's threshold on the validation images: the one that maximises that label's F1
(ties: the threshold nearer 0.5), searched midway between the label's own neighbouring probabilities
(so no image sits on it, and both backends' tiny differences decide alike); a label with fewer
than ``MIN_POSITIVES`` positive validation images keeps 0.5 (a threshold fitted on one or two
pictures is noise). ``fit_temperature``: one temperature for all labels, the one that minimises
the binary cross-entropy on the validation logits (a grid, then a golden-section refinement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

MIN_POSITIVES = 3  # fewer positive validation images than this: the label keeps DEFAULT
DEFAULT = 0.5
T_RANGE = (0.25, 20.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def bce(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of logits / temperature against 0/1 targets (stable form)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    t = np.asarray(targets, dtype=np.float64)
    return float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))) if z.size else math.nan


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The one temperature (for every label) with the lowest validation BCE, within T_RANGE; 1 without data."""
    if len(logits) == 0:
        return 1.0
    grid = np.exp(np.linspace(math.log(T_RANGE[0]), math.log(T_RANGE[1]), 40))
    losses = [bce(logits, targets, t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    g = (math.sqrt(5) - 1) / 2
    for _ in range(30):  # golden section on log T
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if bce(logits, targets, math.exp(a)) < bce(logits, targets, math.exp(b)):
            hi = b
        else:
            lo = a
    return float(min(max(math.exp((lo + hi) / 2), T_RANGE[0]), T_RANGE[1]))


def f1_counts(pred: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label true positives, false positives and false negatives of 0/1 predictions."""
    pred, t = np.asarray(pred, dtype=bool), np.asarray(targets, dtype=bool)
    return (pred & t).sum(0), (pred & ~t).sum(0), (~pred & t).sum(0)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, min_positives: int = MIN_POSITIVES) -> list[float]:
    """Each label's threshold: the F1-maximising one on these images (DEFAULT with fewer than min_positives positives)."""
    probs, t = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=bool)
    out = []
    for k in range(probs.shape[1]):
        p, y = probs[:, k], t[:, k]
        if y.sum() < min_positives:
            out.append(DEFAULT)
            continue
        u = np.unique(p)  # midway between neighbouring probabilities: no validation image sits on a threshold
        cands = np.concatenate([(u[:-1] + u[1:]) / 2, [DEFAULT]])
        best, best_f1 = DEFAULT, -1.0
        for c in cands:
            pr = p >= c
            tp, fp, fn = (pr & y).sum(), (pr & ~y).sum(), (~pr & y).sum()
            f1 = 2 * tp / max(2 * tp + fp + fn, 1)
            if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and abs(c - DEFAULT) < abs(best - DEFAULT)):
                best, best_f1 = float(c), f1
        out.append(best)
    return out


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """One label's average precision (area under the precision-recall steps); NaN without a positive."""
    y = np.asarray(targets, dtype=bool)
    if not y.any():
        return math.nan
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


@dataclass
class LabelFigures:
    """A multi-label model's figures on a set of images, at given thresholds."""

    classes: list[str]
    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    ap: list[float]
    support: list[int]
    macro_f1: float
    samples_f1: float
    mean_ap: float
    exact: float  # share of images whose whole set is right
    accuracy_multi: float  # fastai's: share of (image, label) decisions that are right

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if not math.isfinite(v) else round(float(v), 6)

        per = [{"label": c, "threshold": num(t), "precision": num(p), "recall": num(r), "f1": num(f), "ap": num(a),
                "support": int(s)} for c, t, p, r, f, a, s in zip(self.classes, self.thresholds, self.precision,
                                                                   self.recall, self.f1, self.ap, self.support)]
        return {"macro_f1": num(self.macro_f1), "samples_f1": num(self.samples_f1), "map": num(self.mean_ap),
                "exact_match": num(self.exact), "accuracy_multi": num(self.accuracy_multi), "labels": per}

    def lines(self) -> list[str]:
        """The console's table: one line per label, then the averages."""
        out = [f"{'label':<20} {'thresh':>6} {'prec':>6} {'recall':>6} {'f1':>6} {'AP':>6} {'n':>5}"]
        for c, t, p, r, f, a, s in zip(self.classes, self.thresholds, self.precision, self.recall, self.f1, self.ap,
                                       self.support):
            out.append(f"{c[:20]:<20} {t:>6.2f} {p:>6.3f} {r:>6.3f} {f:>6.3f} {a:>6.3f} {s:>5d}")
        out.append(f"macro F1 {self.macro_f1:.4f}, sample-averaged F1 {self.samples_f1:.4f}, mAP {self.mean_ap:.4f}, "
                   f"exact sets {100 * self.exact:.1f}%")
        return out


def label_figures(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                  thresholds: Sequence[float] | None = None) -> LabelFigures:
    """Every figure at the thresholds given (DEFAULT each when None)."""
    probs, t = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=bool)
    th = np.asarray(list(thresholds) if thresholds is not None else [DEFAULT] * probs.shape[1])
    pred = probs >= th
    tp, fp, fn = f1_counts(pred, t)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    ap = [average_precision(probs[:, k], t[:, k]) for k in range(probs.shape[1])]
    # sample-averaged F1: an image with no label that is given none counts as 1 (sklearn's zero_division=1)
    tp_s, fp_s, fn_s = (pred & t).sum(1), (pred & ~t).sum(1), (~pred & t).sum(1)
    denom = 2 * tp_s + fp_s + fn_s
    samples = np.where(denom > 0, 2 * tp_s / np.maximum(denom, 1), 1.0)
    aps = [a for a in ap if math.isfinite(a)]
    return LabelFigures(list(classes), [float(x) for x in th], precision.tolist(), recall.tolist(), f1.tolist(), ap,
                        t.sum(0).astype(int).tolist(), float(f1.mean()) if len(f1) else math.nan,
                        float(samples.mean()) if len(samples) else math.nan,
                        float(np.mean(aps)) if aps else math.nan,
                        float((pred == t).all(1).mean()) if len(t) else math.nan,
                        float((pred == t).mean()) if t.size else math.nan)


def confused_pairs(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], thresholds: Sequence[float],
                   top: int = 10) -> list[tuple[str, str, int]]:
    """The most confused pairs of labels: (true label missed, label given instead, images), most first.

    An image counts for a pair when it carries the first label, is not given it, and is given the
    second label, which it does not carry.
    """
    pred = np.asarray(probs) >= np.asarray(thresholds)
    t = np.asarray(targets, dtype=bool)
    missed, extra = (t & ~pred).astype(np.int64), (pred & ~t).astype(np.int64)
    counts = missed.T @ extra  # [K, K]: missed label a while given label b
    pairs = [(classes[a], classes[b], int(counts[a, b])) for a in range(len(classes)) for b in range(len(classes))
             if a != b and counts[a, b] > 0]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:top]


def as_binary(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (image, label) decision as a two-class row [1 - p, p] with its 0/1 target: the reliability and ECE of
    ``diagnose.calibration`` then measure the sigmoids."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    return np.stack([1 - p, p], axis=1), np.asarray(targets).reshape(-1).astype(np.int64)


@dataclass
class LabelCalibration:
    """A multi-label model's calibration: one temperature for every label, and each label's threshold."""

    temperature: float
    thresholds: list[float]
    figures: LabelFigures
    ece_before: float
    ece_after: float
    bce_before: float
    bce_after: float
    n: int

    def to_meta(self) -> dict[str, Any]:
        """The model file's ``calibration`` (no unsure threshold: a label set answers for itself)."""
        return {"temperature": self.temperature, "threshold": None, "target_precision": None,
                "ece_before": _unit(self.ece_before), "ece_after": _unit(self.ece_after)}

    def to_json(self) -> dict[str, Any]:
        """report.json's ``calibration``."""
        return {**self.to_meta(), "nll_before": self.bce_before, "nll_after": self.bce_after, "n": self.n,
                "method": "one temperature for every label (lowest validation BCE); each label's threshold maximises "
                          f"its F1 on the validation images (0.5 with fewer than {MIN_POSITIVES} positives)",
                "thresholds": dict(zip(self.figures.classes, self.thresholds))}

    def summary(self) -> str:
        return (f"calibration: one temperature {self.temperature:.2f} for every label, expected calibration error "
                f"{100 * self.ece_before:.1f}% -> {100 * self.ece_after:.1f}% over {self.n} validation images x labels; "
                f"per-label thresholds {min(self.thresholds):.2f}-{max(self.thresholds):.2f} (F1 on validation): "
                f"macro F1 {self.figures.macro_f1:.4f}, mAP {self.figures.mean_ap:.4f}")


def _unit(v: float) -> float | None:
    return float(min(max(v, 0.0), 1.0)) if math.isfinite(v) else None


def calibrate_labels(logits: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> LabelCalibration:
    """Temperature, then thresholds on the calibrated probabilities, then the figures at those thresholds."""
    from ursa.diagnose.calibration import ece

    logits = np.asarray(logits, dtype=np.float64)
    t = fit_temperature(logits, targets)
    before, after = _sigmoid(logits), _sigmoid(logits / t)
    thresholds = choose_thresholds(after, targets)
    return LabelCalibration(t, thresholds, label_figures(after, targets, classes, thresholds),
                            ece(*as_binary(before, targets)), ece(*as_binary(after, targets)),
                            bce(logits, targets), bce(logits, targets, t), int(len(logits)))
