"""Test-time augmentation (fastai's ``learn.tta``): each image and its trained mirrors, the calibrated probabilities averaged.

Torch-free (numpy): the one place both backends take their views and their average from. A
preprocessed batch [N, 3, H, W] becomes [V*N, 3, H, W]: every original, then every horizontal
mirror (the last axis flipped), then every vertical mirror (the one before), so the views cost
one forward pass. Each view's logits are divided by the model's temperature and put through the
softmax before the V rows of an image are averaged, so the unsure threshold means what it meant.

Which mirrors: only those the model was trained to be invariant to, from its metadata config's
``flips`` ("none", "horizontal" or "all"; files written before the key were trained with
horizontal flips). With "none" there is nothing to add and the answer is the plain one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ursa.errors import ModelFileError
from ursa.util.numbers import softmax
from ursa.vision import FLIPS

DEFAULT_FLIPS = "horizontal"  # model files from before TrainConfig had `flips` were trained with horizontal flips
VIEW_NAMES = ("original", "horizontal mirror", "vertical mirror")
NO_VIEWS = "this model was trained without flips: --tta has no views to add"


def trained_flips(config: Mapping[str, Any] | None, where: str | Path | None = None) -> str:
    """Which flips the model was trained with, from its metadata config, so TTA adds only views it has seen."""
    flips = (config or {}).get("flips", DEFAULT_FLIPS)
    if flips not in FLIPS:
        raise ModelFileError(f"{where or 'model file'}: config flips is {flips!r}, expected the flips the model "
                             f"was trained with ({', '.join(FLIPS)}); predict without --tta")
    return flips


def tta_views(config: Mapping[str, Any] | None, tta: bool, where: str | Path | None = None) -> tuple[str, ...]:
    """The names of the views a predictor runs: ("original",) without TTA or for a model trained without flips."""
    if not tta:
        return VIEW_NAMES[:1]
    return VIEW_NAMES[: FLIPS.index(trained_flips(config, where)) + 1]


def view_batch(x: np.ndarray, n_views: int) -> np.ndarray:
    """A preprocessed NCHW batch with its mirrors appended, view after view ([n_views * N, C, H, W], contiguous)."""
    if not 1 <= n_views <= len(VIEW_NAMES):
        raise ValueError(f"view_batch: n_views must be 1 to {len(VIEW_NAMES)} (got {n_views})")
    x = np.asarray(x)
    views = (x, x[..., ::-1], x[..., ::-1, :])[:n_views]
    return np.ascontiguousarray(np.concatenate(views, axis=0), dtype=np.float32)


def mean_probs(logits: np.ndarray, n_views: int, temperature: float, task: Any = None) -> np.ndarray:
    """Average of each view's calibrated probabilities (logits / temperature, the task's activation: softmax unless
    ``task`` says otherwise, ``inference.task``) for logits laid out as view_batch's."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    p = softmax(z, dtype=np.float32) if task is None else task.activate(z, dtype=np.float32)
    if len(p) % n_views:
        raise ValueError(f"mean_probs: {len(p)} rows are not {n_views} views of the same images")
    return p.reshape(n_views, -1, p.shape[1]).mean(axis=0, dtype=np.float64).astype(np.float32)


def views_text(views: Sequence[str]) -> str:
    """How many views and which, for the lines that say what ran, e.g. "2 views (original, horizontal mirror)"."""
    return f"{len(views)} view{'s' if len(views) != 1 else ''} ({', '.join(views)})"
