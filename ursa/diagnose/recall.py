"""Per-class recall and the balanced error: the figures that show what lopsided classes hide.

On 300 pictures of one class and 12 of another, a model that never says the small class has a
low error rate; its recall on that class (the share of its pictures found) is 0, and the balanced
error (one minus the mean recall over the classes present) says so. The epoch table, history.csv,
the console summary, the report and the model file's metrics carry them beside the error rate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def class_recall(pred: Sequence[int], y: Sequence[int], n_classes: int) -> np.ndarray:
    """Per class, the share of its validation pictures predicted as it (NaN for a class with none)."""
    pred, y = np.asarray(pred, dtype=np.int64), np.asarray(y, dtype=np.int64)
    total = np.bincount(y, minlength=n_classes)[:n_classes].astype(np.float64)
    hit = np.bincount(y[pred == y], minlength=n_classes)[:n_classes].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hit / np.maximum(total, 1), np.nan)


def balanced_error(pred: Sequence[int], y: Sequence[int], n_classes: int) -> float:
    """One minus the mean recall over the classes that have validation pictures (NaN when none has)."""
    r = class_recall(pred, y, n_classes)
    r = r[np.isfinite(r)]
    return float(1.0 - r.mean()) if len(r) else float("nan")


def recall_by_class(pred: Sequence[int], y: Sequence[int], classes: Sequence[str]) -> dict[str, float | None]:
    """{class: recall} for JSON (None for a class without validation pictures)."""
    r = class_recall(pred, y, len(classes))
    return {c: (None if not np.isfinite(v) else round(float(v), 4)) for c, v in zip(classes, r)}

