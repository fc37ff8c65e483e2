"""The one optimiser factory, the one-cycle schedule, layer-group learning rates and the BatchNorm rules.

Every fit, the cached head's and the LR finder's sweep, builds its optimiser here, so AdamW's
settings and the BatchNorm-in-eval rule are written once.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ursa.errors import UrsaError

BETAS = (0.9, 0.99)  # fastai's Adam betas


def lr_groups(max_lr: float | slice, n_groups: int) -> list[float]:
    """fastai's slice(lo, hi): geometric spread from lo (early body) to hi (head); a float: all equal."""
    if isinstance(max_lr, slice):
        lo, hi = max_lr.start, max_lr.stop
        if lo is None:
            return [hi / 10] * (n_groups - 1) + [hi]
        if n_groups == 1:
            return [hi]
        step = (hi / lo) ** (1 / (n_groups - 1))
        return [lo * step**i for i in range(n_groups)]
    return [float(max_lr)] * n_groups


def head_lr(max_lr: float | slice) -> float:
    """The rate of the last layer group (the head): a slice's high end, as in fastai."""
    return float(max_lr.stop) if isinstance(max_lr, slice) else float(max_lr)


def param_groups(groups: Sequence[Iterable[nn.Parameter]], max_lr: float | slice) -> list[dict]:
    """Optimiser groups with their learning rates, trainable parameters only; empty groups dropped."""
    groups = [list(g) for g in groups]
    out = []
    for ps, lr in zip(groups, lr_groups(max_lr, len(groups))):
        ps = [p for p in ps if p.requires_grad]
        if ps:
            out.append({"params": ps, "lr": lr})
    if not out:
        raise UrsaError("nothing to train: every parameter is frozen")
    return out


def make_optimizer(groups: list[dict], wd: float) -> torch.optim.Optimizer:
    """AdamW with fastai's betas; each group carries its own learning rate."""
    return torch.optim.AdamW(groups, weight_decay=wd, betas=BETAS)


def one_cycle(opt: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.25) -> torch.optim.lr_scheduler.OneCycleLR:
    """Warm up then anneal each group's rate (cosine), momentum the other way: fastai's fit_one_cycle."""
    # OneCycleLR needs at least two steps in each phase; tiny runs get a slightly longer warm-up.
    total = max(total_steps, 4)
    pct_start = min(max(pct_start, 2.0 / total), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=pct_start,
        div_factor=25.0, final_div_factor=1e5, anneal_strategy="cos",
        cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
    )


def batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of a module."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_modes(model: nn.Module, frozen: bool, bn_eval_frozen: bool, bn_eval_unfrozen: bool) -> None:
    """The one BatchNorm rule: train mode, with the body's BatchNorm in eval mode where the rule says so.

    Frozen with a feature cache, the body's statistics must be the ones the cache was made with.
    Fine-tuning with bn_stats_frozen keeps them fixed too: the features the head was trained on
    stay the same function when the body is unfrozen (batch statistics of 32 augmented images made
    the loss jump). The head's BatchNorm keeps training: with it fixed as well the loss jumped
    again (it absorbs the body's moving features).
    """
    model.train()
    body = getattr(model, "body", None)
    if body is None:
        return
    if frozen and bn_eval_frozen:
        body.eval()
    elif not frozen and bn_eval_unfrozen:
        for m in batchnorms(body):
            m.eval()


@torch.no_grad()
def recalibrate_bn(head: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate the head's BatchNorm statistics over the epoch's features ("precise BN").

    With few batches per epoch the running averages lag far behind the weights and validation
    collapses to one class; an equal-weight average over the whole epoch fixes that cheaply.
    """
    bns = batchnorms(head)
    if not bns or not any(len(xb) > 1 for xb in batches):
        return  # nothing to estimate from (a cancelled epoch): keep the statistics it has
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = head.training
    head.train()
    for xb in batches:
        if len(xb) > 1:
            head(xb)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    head.train(was_training)
