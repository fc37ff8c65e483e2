"""Honest figures: the error of the epoch the recipe keeps, corrected for having chosen it on the same images.

The default recipe keeps the best epoch (over both stages) by its validation error (unless --epoch-kept last), so the error
it reports is the minimum of up to 30 draws on the same pictures: optimistic by construction, more
so on small sets. ``ValidCorrect`` records, after every epoch, which validation pictures the model
gets right; ``selection_corrected`` then cross-fits the choice: the epoch is chosen (by the
recipe's own rule) on one half of the validation pictures and scored on the other half, both ways,
and the two halves' errors are added up. No picture scores the epoch it helped to choose. Beside it,
the one-sided 95% upper bound of that figure (Clopper-Pearson): on 25 validation pictures, none
wrong still allows up to 11%.
"""

from __future__ import annotations

from typing import Any

import torch

from ursa.training.callbacks import Callback
from ursa.training.sources import CachedFeatures
from ursa.util.numbers import error_upper_bound

CONFIDENCE = 0.95  # the one-sided bound beside the honest figure: how far off so few pictures may be

METHOD = ("cross-fitted: the epoch chosen on one half of the validation pictures (alternate pictures, the "
          "recipe's rule: the best epoch when it beats the last by a picture) and scored on the other half, "
          "both ways")


class ValidCorrect(Callback):
    """Which validation pictures each epoch gets right (rank 0; the frozen stage reads the cached features)."""

    order = 15  # after the recorder, which has the epoch's row

    def __init__(self) -> None:
        self.correct: list[torch.Tensor] = []  # one bool vector per validated epoch, in epoch order
        self.known: torch.Tensor | None = None  # pictures readable in every epoch (a vanished file's label is < 0)

    @torch.inference_mode()
    def after_epoch(self, learn: Any) -> None:
        if not learn.dist.main:
            return
        src = learn.source
        if isinstance(src, CachedFeatures):  # the head on the cached validation features: the frozen model
            src.module.eval()
            v = src.cache.valid
            logits = torch.cat([src.module(v[i:i + 1024].to(src.device)).float().cpu() for i in range(0, len(v), 1024)])
            probs, y = learn.task.probs(logits), src.cache.valid_y
        else:
            probs, y = learn.get_preds()
        self.correct.append(learn.task.correct(probs, y))
        self.known = (y >= 0) if self.known is None else self.known & (y >= 0)


def _choose(wrong: list[int]) -> int:
    """The recipe's rule on one half: the first best epoch when it beats the last by a picture, else the last."""
    best = min(range(len(wrong)), key=lambda e: (wrong[e], e))
    return best if wrong[best] < wrong[-1] else len(wrong) - 1


def selection_corrected(correct: list[torch.Tensor]) -> float | None:
    """The chosen epoch's error, the choice cross-fitted over two halves of the validation pictures; None: too few."""
    if not correct or len(correct[0]) < 2:
        return None
    n = len(correct[0])
    halves = [torch.arange(n) % 2 == 0, torch.arange(n) % 2 == 1]
    wrong = 0
    for pick, score in (halves, halves[::-1]):
        e = _choose([int((~c[pick]).sum()) for c in correct])
        wrong += int((~correct[e][score]).sum())
    return wrong / n


LAST = ("no epoch-selection correction needed: the last epoch is kept (--epoch-kept last), not chosen on these "
        "pictures")


def honest_figures(correct: list[torch.Tensor], kept_error: float, known: torch.Tensor | None = None,
                   chosen: bool = True) -> dict:
    """recipe.json's ``honest``: the raw kept error, the selection-corrected one and how it was made.

    ``known``: the pictures readable in every epoch (the others are left out, as the error rate leaves them out).
    ``chosen``: False when the last epoch is kept whatever the pictures say; its error then needs no correction.
    """
    if known is not None and not bool(known.all()):
        correct = [c[known] for c in correct]
    corrected = selection_corrected(correct) if chosen else kept_error
    n = len(correct[0]) if correct else 0
    figure = corrected if corrected is not None else kept_error
    method = (METHOD if chosen else LAST) if corrected is not None else "too few validation pictures to cross-fit"
    return {"error_rate": kept_error, "selection_corrected": corrected, "chosen": chosen, "epochs": len(correct),
            "method": method,
            # Clopper-Pearson on the honest figure's count of wrong pictures: what n pictures can and cannot show
            "pictures": n, "confidence": CONFIDENCE,
            "upper_bound": error_upper_bound(round(figure * n), n, CONFIDENCE) if n else None}
