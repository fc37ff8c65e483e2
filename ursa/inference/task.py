"""What a model's outputs mean, chosen once from its metadata's ``task``: torch-free, for both backends.

``single_label`` (one class per picture, the default of every file written before multi-label
existed): a softmax over the classes, the answer is the most likely class. ``multi_label`` (a
set of labels per picture, ``ursa train --multi-label``): one sigmoid per label, the answer is
every label whose probability reaches that label's threshold (chosen on the validation images
when the model was trained, stored in the model file's ``thresholds``). Both divide the logits by
the calibration temperature first. Nothing else branches on the task: the predictors call
``activate`` and ``answer``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ursa.errors import UrsaError
from ursa.util.numbers import softmax

SINGLE_LABEL = "single_label"
MULTI_LABEL = "multi_label"
TASKS = (SINGLE_LABEL, MULTI_LABEL)
DEFAULT_THRESHOLD = 0.5  # a label's threshold when the model file has none


def sigmoid(logits: Any, temperature: float = 1.0, dtype: Any = np.float64) -> np.ndarray:
    """Element-wise probabilities of logits / temperature, stable for large logits of either sign."""
    z = np.asarray(logits).astype(np.float64) / float(temperature)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(dtype, copy=False)


@dataclass(frozen=True)
class SingleLabel:
    """One class per picture: softmax, the most likely class."""

    name: str = SINGLE_LABEL
    multi: bool = False

    def activate(self, logits: Any, temperature: float = 1.0, dtype: Any = np.float32) -> np.ndarray:
        return softmax(logits, temperature, dtype=dtype)

    def answer(self, pred: Any, thresholds: Sequence[float]) -> Any:
        return pred


@dataclass(frozen=True)
class MultiLabel:
    """A set of labels per picture: a sigmoid per label, every label at or above its threshold."""

    name: str = MULTI_LABEL
    multi: bool = True

    def activate(self, logits: Any, temperature: float = 1.0, dtype: Any = np.float32) -> np.ndarray:
        return sigmoid(logits, temperature, dtype=dtype)

    def answer(self, pred: Any, thresholds: Sequence[float]) -> Any:
        """``pred`` with its label set: the labels whose probability reaches their threshold, most likely first."""
        probs = list(pred.probs.items())
        chosen = [(c, p) for (c, p), t in zip(probs, thresholds) if p >= t]
        return replace(pred, chosen=[c for c, _ in sorted(chosen, key=lambda cp: -cp[1])])


def task_named(name: str) -> SingleLabel | MultiLabel:
    """The task object of a metadata ``task`` value."""
    if name == MULTI_LABEL:
        return MultiLabel()
    if name == SINGLE_LABEL:
        return SingleLabel()
    raise UrsaError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")


def thresholds_of(meta: Any) -> list[float]:
    """A model's per-label thresholds: its metadata's, else the default for each class."""
    given = list(getattr(meta, "thresholds", None) or [])
    return [float(t) for t in given] if given else [DEFAULT_THRESHOLD] * len(meta.classes)
