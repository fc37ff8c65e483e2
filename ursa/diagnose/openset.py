"""Fitting the open-world parts of a model file on its training run (``inference.openset`` scores with them).

``fit_unknown``: the unknown-detection reference from the training images' body features alone (no
pictures of "other" needed) and the threshold chosen on the validation images to keep a stated
share of them; ``fit_conformal``: the validation scores of split-conformal prediction sets;
``set_coverage``: the coverage and average set size per class the report shows, each half of the
validation images judged with the quantile of the other half (the sets' own quantile is fitted on
all of them, so judging it on the same images would flatter it).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ursa.inference.openset import ConformalSets, UnknownDetector, keep_share, normalise

K, DIMS = 20, 128  # benchmarks/openset.py: mean similarity to the 20 nearest, 128 principal axes (docs/open-world.md)
MAX_REFERENCE = 20_000  # training images kept as the reference (a spread-out subset above this): 5 MB at 128 dims


def pca_basis(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(centre, [F, d] leading principal axes) of the normalised rows of x."""
    z = normalise(x).astype(np.float64)
    center = z.mean(axis=0)
    zc = z - center
    d = max(1, min(dims, zc.shape[1], max(1, zc.shape[0] - 1)))
    if zc.shape[0] < zc.shape[1]:  # fewer images than features: the SVD of the images is cheaper
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        basis = vt[:d].T
    else:
        w, v = np.linalg.eigh(zc.T @ zc)
        basis = v[:, np.argsort(w)[::-1][:d]]
    return center.astype(np.float32), basis.astype(np.float32)


def fit_unknown(train_feats: np.ndarray, valid_feats: np.ndarray, keep: float = 0.95, *, k: int = K,
                dims: int = DIMS, max_reference: int = MAX_REFERENCE, source: str = "") -> UnknownDetector:
    """The reference from the training features and the threshold that keeps ``keep`` of the validation images."""
    keep = keep_share(keep, "--keep")
    train = np.asarray(train_feats, dtype=np.float32)
    if len(train) > max_reference:  # evenly spaced rows: deterministic, spread over the classes' order
        train = train[np.linspace(0, len(train) - 1, max_reference).round().astype(int)]
    center, basis = pca_basis(train, dims)
    det = UnknownDetector(k, center, basis.astype(np.float16).astype(np.float32), np.zeros((0, basis.shape[1]), np.float32),
                          np.zeros(0), keep)
    det.reference = det.project(train).astype(np.float16).astype(np.float32)  # what the model file will hold
    det.valid_scores = np.sort(det.score(valid_feats)) if len(valid_feats) else np.zeros(0)
    t = det.threshold
    kept = float((det.valid_scores <= t).mean()) if len(det.valid_scores) else None
    det.figures = {"n_reference": int(len(train)), "n_valid": int(len(det.valid_scores)), "dims": int(basis.shape[1]),
                   "kept_valid": kept, "features": source or "final model, training images"}
    return det


def unknown_summary(det: UnknownDetector | None) -> str:
    """One line for the console and the report about the unknown threshold."""
    if det is None:
        return "unknown detection: not fitted"
    f = det.figures
    kept = f.get("kept_valid")
    said = f"{100 * kept:.1f}% of {f.get('n_valid')} validation images kept" if kept is not None else "no validation images"
    return (f"unknown detection: mean similarity to the {det.k} nearest of {f.get('n_reference')} training images "
            f"({f.get('dims')} dims, {det.nbytes() / 1e6:.2f} MB); threshold {det.threshold:.4f} ({said})")


def true_class_scores(probs: np.ndarray, y: Sequence[int]) -> np.ndarray:
    """1 - the probability of the true class, per image."""
    y = np.asarray(y, dtype=int)
    return 1.0 - np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y]


def fit_conformal(probs: np.ndarray, y: Sequence[int]) -> ConformalSets:
    """Prediction sets from the validation images' calibrated probabilities and labels."""
    return ConformalSets(np.sort(true_class_scores(probs, y)))


def set_coverage(probs: np.ndarray, y: Sequence[int], classes: Sequence[str], level: float = 0.9) -> dict[str, Any]:
    """Coverage and average set size, overall and per class, two-fold: each half judged with the other half's quantile."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(y)
    halves = np.arange(n) % 2
    covered = np.zeros(n, bool)
    sizes = np.zeros(n, int)
    for h in (0, 1):
        sets = fit_conformal(probs[halves != h], y[halves != h])
        for i in np.flatnonzero(halves == h):
            s = sets.indices(probs[i], level)
            covered[i], sizes[i] = y[i] in s, len(s)
    per = {c: {"n": int((y == j).sum()), "coverage": float(covered[y == j].mean()) if (y == j).any() else None,
               "mean_size": float(sizes[y == j].mean()) if (y == j).any() else None}
           for j, c in enumerate(classes)}
    return {"level": level, "n": n, "coverage": float(covered.mean()) if n else None,
            "mean_size": float(sizes.mean()) if n else None, "per_class": per,
            "how": "two-fold: each half of the validation images judged with the other half's quantile"}


def open_world_insight(probs: np.ndarray, y: Sequence[int], classes: Sequence[str], scores: Sequence[float] | None,
                       det: UnknownDetector | None, note: str | None = None, level: float = 0.9) -> dict[str, Any]:
    """The report's "Open world" section: the unknown threshold and how many of these images it turns away,
    and the prediction sets' coverage and size per class (``set_coverage``)."""
    unknown: dict[str, Any] = {"fitted": det is not None, "note": note}
    if det is not None:
        s = np.asarray([v for v in (scores if scores is not None else det.valid_scores) if v is not None], dtype=np.float64)
        unknown.update({"line": unknown_summary(det), "threshold": det.threshold, "keep": det.keep,
                        "figures": det.figures, "n": int(len(s)),
                        "turned_away": float((s > det.threshold).mean()) if len(s) else None})
    sets = set_coverage(probs, y, classes, level) if len(y) >= 4 else None
    return {"unknown": unknown, "sets": sets}
