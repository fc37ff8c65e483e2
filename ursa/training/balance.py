"""Lopsided classes: the recipe's remedy for classes of very different sizes, and the decision to use it.

A model trained on 300 pictures of one class and 12 of another leans towards the large class: its
error on the small one is high while the overall error looks fine. ``ursa train`` notices that
(the largest class has ``RATIO`` times the training images of the smallest) and counters it with
one of three remedies (``--balance``, docs/multilabel.md "Lopsided classes" has the measurements):

- ``weights``: cross-entropy weighted by the inverse class frequency (each class weighs the same);
- ``sampler``: training batches drawn class-balanced (with replacement), seeded from the fit's
  generator, so a run is as deterministic as one that shuffles;
- ``logit_adjust``: Menon et al. 2021's logit-adjusted loss, cross-entropy on the logits plus
  ``TAU * log(prior)``; the network's own logits then estimate the balanced posterior, so
  nothing changes at prediction time (both backends, the model file as before).

``none`` trains as if the classes were equally common; ``auto`` (the default) is ``DEFAULT`` when
the classes are lopsided and ``none`` otherwise. The decision and its reason go to recipe.json.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ursa.training.config import BALANCES
from ursa.vision.show import IMBALANCE_RATIO

REMEDIES = BALANCES[2:]
# The remedy `auto` uses on lopsided classes: the one that paid on benchmarks/imbalance.py (docs/multilabel.md).
DEFAULT = "logit_adjust"
RATIO = IMBALANCE_RATIO  # largest class over smallest (training images) from which auto counters it
TAU = 1.0  # Menon et al.'s temperature of the prior: 1 is the balanced error's optimum


def class_prior(counts: Sequence[int]) -> tuple[float, ...]:
    """Each class's share of the training images (a class with none counts as one image, so log() is finite)."""
    c = [max(1, int(n)) for n in counts]
    total = sum(c)
    return tuple(n / total for n in c)


def choose_balance(counts: Mapping[str, int], given: str) -> tuple[str, str]:
    """The remedy for these training counts per class, and why (``given``: --balance)."""
    if given != "auto":
        return given, "--balance"
    nonzero = {c: n for c, n in counts.items() if n > 0}
    if len(nonzero) < 2:
        return "none", "fewer than two classes with training images"
    big = max(nonzero, key=lambda c: nonzero[c])
    small = min(nonzero, key=lambda c: nonzero[c])
    ratio = nonzero[big] / nonzero[small]
    if ratio < RATIO:
        return "none", (f"the classes are about equally common (largest/smallest {ratio:.1f}x, under {RATIO:.0f}x)")
    return DEFAULT, (f"lopsided classes: {big} has {nonzero[big]} training images and {small} {nonzero[small]} "
                     f"({ratio:.1f}x): {WHY[DEFAULT]}; --balance none to train as if they were equally common")


WHY = {
    "weights": "each class weighs the same in the loss",
    "sampler": "training batches are drawn class-balanced",
    "logit_adjust": "the loss adds log(class share) to the logits (logit adjustment), so the model's own "
                    "scores favour no class for its size",
}


def balanced_loss(logits: torch.Tensor, y: torch.Tensor, config: Any) -> torch.Tensor:
    """Cross-entropy as ``config`` (a LearnerConfig) balances it: weights, logit adjustment, or plain."""
    prior = config.class_prior
    if config.balance in ("weights", "logit_adjust") and prior:
        p = torch.tensor(prior, dtype=logits.dtype, device=logits.device)
        if config.balance == "weights":
            w = 1.0 / (len(prior) * p)
            return F.cross_entropy(logits, y, weight=w, label_smoothing=config.label_smoothing)
        logits = logits + TAU * p.log()
    return F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)


def sample_weights(config: Any, labels: torch.Tensor) -> torch.Tensor | None:
    """Per training item, the weight of a class-balanced draw (--balance sampler), else None (a plain shuffle)."""
    if config.balance != "sampler":
        return None
    labels = torch.as_tensor(labels).long()
    valid = labels >= 0
    counts = torch.bincount(labels[valid], minlength=int(labels.max().item()) + 1 if valid.any() else 1).double()
    w = torch.zeros(len(labels), dtype=torch.double)
    w[valid] = 1.0 / counts[labels[valid]]
    return w
