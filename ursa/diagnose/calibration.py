"""How far to trust a probability: temperature scaling, calibration error, and an "unsure" threshold.

A network trained with cross-entropy is usually over-confident: of the answers it gives with
probability 0.95, fewer than 95% are right. Temperature scaling (Guo et al. 2017) divides the
logits by one number T fitted on the validation set (the T that minimises its negative
log-likelihood), which leaves every prediction's ranking and class unchanged and makes the
probabilities mean what they say. The expected calibration error (ECE, 15 equal-width bins of
confidence) measures the gap before and after. The "unsure" threshold is the lowest top-class
probability (after scaling) at which the predictions the model keeps reach a target precision
on the validation set; below it, predict and serve can answer "unsure" instead of a class.

Everything here is numpy on a few hundred numbers: milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ursa.util.numbers import softmax  # the one softmax (float64 by default), used here and re-exported

N_BINS = 15
TARGET_PRECISION = 0.95
T_RANGE = (0.25, 20.0)  # temperatures searched (1/T is searched, where the NLL is convex)
# With fewer validation mistakes than this the NLL keeps falling as T -> 0 (every answer right: sharpen
# forever), so the fit would make a small run's model claim certainty it never earned: keep T = 1.
MIN_MISTAKES = 3


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets under logits / temperature."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    y = np.asarray(y, dtype=np.int64)
    return float(np.mean(lse - z[np.arange(len(y)), y])) if len(y) else math.nan


def fit_temperature(logits: np.ndarray, y: np.ndarray, tol: float = 1e-4) -> float:
    """The temperature minimising the validation NLL: golden-section search on 1/T (convex there)."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]
    f = lambda beta: nll(logits, y, 1.0 / beta)  # noqa: E731
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol * max(1.0, abs(a)):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(1.0 / ((a + b) / 2))


def reliability(probs: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Per confidence bin (equal width over [0, 1]): its range, items, mean confidence and accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    conf = probs.max(1) if len(y) else np.zeros(0)
    right = (probs.argmax(1) == y) if len(y) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (lo, hi] bins; 0 in the first
    out = []
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(conf[m].mean()) if n else math.nan,
                    "accuracy": float(right[m].mean()) if n else math.nan})
    return out


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: the items-weighted mean gap between confidence and accuracy per bin."""
    bins = reliability(probs, y, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return math.nan
    return float(sum(b["count"] * abs(b["confidence"] - b["accuracy"]) for b in bins if b["count"]) / n)


def choose_threshold(probs: np.ndarray, y: np.ndarray, target_precision: float = TARGET_PRECISION) -> float | None:
    """The lowest top-class probability whose accepted predictions reach the target precision on this set.

    Predictions are accepted from the most confident down; the threshold is the confidence of the
    last one accepted (ties accepted together), so an answer less confident than anything the
    model got right here is "unsure". None when not even the most confident answers reach the
    target (then nothing is marked unsure).
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return None
    conf = probs.max(1)
    right = probs.argmax(1) == y
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], right[order]
    precision = np.cumsum(right) / np.arange(1, len(y) + 1)
    last_of_tie = np.append(conf[1:] != conf[:-1], True)  # a threshold accepts a whole tie group
    ok = np.nonzero((precision >= target_precision - 1e-12) & last_of_tie)[0]
    if len(ok) == 0:
        return None
    return float(conf[ok[-1]])


def coverage(probs: np.ndarray, y: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """(share of answers kept, their precision) at a threshold; None keeps every answer."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return math.nan, math.nan
    keep = probs.max(1) >= (threshold if threshold is not None else -1.0)
    right = probs.argmax(1) == y
    return float(keep.mean()), float(right[keep].mean()) if keep.any() else math.nan


@dataclass
class Calibration:
    """What the model file's ``calibration`` holds, plus the numbers the report shows."""

    temperature: float
    threshold: float | None
    target_precision: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    kept: float  # share of validation answers at or above the threshold
    kept_precision: float
    n: int
    mistakes: int = -1  # validation answers that were wrong (-1: not counted)
    # Honest figures (issue 28): the temperature and threshold fitted on alternate validation images and
    # measured on the others, both ways (cross_fit); None when too few images to halve.
    ece_cross: float | None = None
    kept_precision_cross: float | None = None

    def to_meta(self) -> dict[str, Any]:
        """The model file's ``calibration`` (temperature, threshold, target_precision, ece_before, ece_after)."""
        def unit(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {"temperature": self.temperature, "threshold": self.threshold,
                "target_precision": self.target_precision, "ece_before": unit(self.ece_before),
                "ece_after": unit(self.ece_after)}

    def to_json(self) -> dict[str, Any]:
        """report.json's ``calibration``."""
        return {**self.to_meta(), "nll_before": self.nll_before, "nll_after": self.nll_after, "kept": self.kept,
                "kept_precision": self.kept_precision, "n": self.n, "bins": N_BINS,
                "ece_cross": self.ece_cross, "kept_precision_cross": self.kept_precision_cross,
                "cross_method": "fitted on alternate validation images, measured on the others, both ways"}

    def summary(self) -> str:
        """One line for the console and the report."""
        s = (f"calibration: temperature {self.temperature:.2f}, expected calibration error {100 * self.ece_before:.1f}% "
             f"-> {100 * self.ece_after:.1f}% on {self.n} validation images")
        if 0 <= self.mistakes < MIN_MISTAKES:
            s += (f" (only {self.mistakes} wrong answer(s) to learn from: too few to fit a temperature, so the "
                  "probabilities are kept as the network gives them)")
        elif self.ece_after > self.ece_before:
            s += (f" (the raw model was already close to calibrated: the temperature lowers the log-loss, "
                  f"{self.nll_before:.3f} -> {self.nll_after:.3f}, not the binned error, which is noisy on few images)")
        if self.threshold is None:
            return s + f"; no threshold reaches precision {self.target_precision:.2f} (nothing is marked unsure)"
        s += (f"; answers below {self.threshold:.2f} are 'unsure' (precision {self.target_precision:.2f} target: "
              f"{100 * self.kept:.0f}% of validation answers kept, {100 * self.kept_precision:.1f}% of them right)")
        if self.ece_cross is not None:
            s += (f"; fitted on half the images and measured on the other half: calibration error "
                  f"{100 * self.ece_cross:.1f}%" + (f", kept answers {100 * self.kept_precision_cross:.1f}% right"
                                                  if self.kept_precision_cross is not None else ""))
        return s


def calibrate(logits: np.ndarray, y: np.ndarray, target_precision: float = TARGET_PRECISION) -> Calibration:
    """Fit the temperature on validation logits, measure ECE before and after, choose the unsure threshold."""
    if not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    mistakes = int((logits.argmax(1) != y).sum()) if len(y) else 0
    t = fit_temperature(logits, y) if mistakes >= MIN_MISTAKES else 1.0
    before, after = softmax(logits), softmax(logits, t)
    threshold = choose_threshold(after, y, target_precision)
    kept, kept_precision = coverage(after, y, threshold)
    return Calibration(t, threshold, target_precision, ece(before, y), ece(after, y), nll(logits, y), nll(logits, y, t),
                       kept, kept_precision, len(y), mistakes, *cross_fit(logits, y, target_precision))


def cross_fit(logits: np.ndarray, y: np.ndarray, target_precision: float) -> tuple[float | None, float | None]:
    """ECE and the kept answers' precision with the temperature and threshold fitted on the other half of the images.

    Alternate images form two halves; each half's probabilities use the temperature fitted on the other
    half, and its kept answers the other half's threshold. None, None with fewer than 4 images.
    """
    n = len(y)
    if n < 4:
        return None, None
    halves = [np.arange(n) % 2 == 0, np.arange(n) % 2 == 1]
    probs = np.zeros((n, logits.shape[1]))
    keep = np.zeros(n, dtype=bool)
    for fit, use in (halves, halves[::-1]):
        lf, yf = logits[fit], y[fit]
        t = fit_temperature(lf, yf) if int((lf.argmax(1) != yf).sum()) >= MIN_MISTAKES else 1.0
        probs[use] = softmax(logits[use], t)
        threshold = choose_threshold(softmax(lf, t), yf, target_precision)
        keep[use] = probs[use].max(1) >= (threshold if threshold is not None else -1.0)
    right = probs.argmax(1) == y
    return ece(probs, y), (float(right[keep].mean()) if keep.any() else None)
