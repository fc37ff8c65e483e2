"""Batch sources: what the one training loop iterates over.

`ImageBatches` feeds augmented images through the model (fine-tuning, or a frozen body run
every batch); `CachedFeatures` feeds body features from the feature cache to the head alone
(the frozen stage, the body pass swapped for a lookup). The loop asks a source the same five
things either way: set the train modes, the batches of an epoch, the forward pass, what to do
at the end of an epoch, and the validation metrics.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ursa.diagnose.recall import balanced_error
from ursa.training.features import FeatureCache
from ursa.training.optim import recalibrate_bn, set_train_modes
from ursa.vision.loaders import DataLoaders
from ursa.vision.models import Classifier

Batch = tuple[torch.Tensor, torch.Tensor]
Metrics = tuple[float, ...]  # valid_loss, error_rate, accuracy, balanced_error (then a task's own columns: training.task)


class BatchSource(Protocol):
    """What the loop needs from a source of batches."""

    n_batches: int  # batches per epoch
    module: nn.Module  # what is trained (the head, or the whole model)

    def train_modes(self) -> None: ...

    def batches(self, epoch: int) -> Iterator[Batch]: ...

    def forward(self, xb: torch.Tensor) -> torch.Tensor: ...

    def end_epoch(self) -> None: ...

    def validate(self) -> Metrics: ...


def metrics_from_probs(probs: torch.Tensor, y: torch.Tensor) -> Metrics:
    """valid_loss (cross-entropy), error_rate, accuracy and balanced_error (diagnose/recall.py) from probabilities.

    Items whose label is negative (their file changed or vanished during training) are left out.
    """
    keep = y >= 0
    if not bool(keep.all()):
        probs, y = probs[keep], y[keep]
    if len(y) == 0:
        return math.nan, math.nan, math.nan, math.nan
    loss = torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    pred = probs.argmax(1)
    acc = (pred == y).float().mean().item()
    return loss, 1.0 - acc, acc, balanced_error(pred.cpu().numpy(), y.cpu().numpy(), probs.shape[1])


def to_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Batches copied to the device (non-blocking from pinned memory on a GPU); as they are on the CPU."""
    if device.type == "cpu":
        yield from batches
        return
    for xb, yb in batches:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


class ImageBatches:
    """Augmented training images through the model; a frozen body's features recalibrate the head's BatchNorm.

    Under torchrun, ``shard`` = (rank, world) gives each rank its part of every epoch (torch's
    DistributedSampler) and ``wrap`` puts what is trained into DistributedDataParallel, which
    averages the gradients across ranks. ``weights``: per training item, a class-balanced draw
    (``training.balance.sample_weights``) instead of a shuffle.
    """

    def __init__(self, model: Classifier, dls: DataLoaders, *, augment: bool, size: int | None,
                 generator: torch.Generator, bn_eval_frozen: bool, bn_eval_unfrozen: bool,
                 validate: Callable[[], Metrics], device: torch.device | None = None,
                 shard: tuple[int, int] | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 weights: torch.Tensor | None = None) -> None:
        self.model, self.module = model, model
        self.device = device or torch.device("cpu")
        # Under torchrun --bs is the batch of all ranks together: the same steps, so the same recipe, as one process.
        bs = max(2, dls.bs // shard[1]) if shard else None
        self.dl = dls.loader(dls.dataset.train_idx, train=augment, size=size, shuffle=True, generator=generator,
                             shard=shard, bs=bs, weights=weights)
        self.n_batches = len(self.dl)
        self.bn_eval_frozen, self.bn_eval_unfrozen = bn_eval_frozen, bn_eval_unfrozen
        self._validate = validate
        self.frozen_feats: list[torch.Tensor] = []
        wrap = wrap or (lambda m: m)
        # What runs the trained part: the whole model, or (body frozen) the head on the body's features.
        self.train_net = wrap(model.head) if model.is_frozen else wrap(model)

    def train_modes(self) -> None:
        """Train mode, with the body's BatchNorm in eval mode where the rule says so."""
        set_train_modes(self.model, self.model.is_frozen, self.bn_eval_frozen, self.bn_eval_unfrozen)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """One pass of the shuffled, augmented training set (this rank's share of it under torchrun)."""
        self.frozen_feats = []
        if isinstance(self.dl.sampler, DistributedSampler):
            self.dl.sampler.set_epoch(epoch)
        return to_device(self.dl, self.device)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        """Logits; a frozen body's features are kept to recalibrate the head at the end of the epoch."""
        if self.model.is_frozen:
            f = self.model.features(xb)
            self.frozen_feats.append(f.detach().float())
            return self.train_net(f)
        return self.train_net(xb)

    def end_epoch(self) -> None:
        """Precise BN for the head when the body was frozen."""
        if self.frozen_feats:
            recalibrate_bn(self.model.head, self.frozen_feats)
        self.frozen_feats = []

    def validate(self) -> Metrics:
        """The learner's validation pass over images."""
        return self._validate()


class CachedFeatures:
    """Cached body features for the head: epoch e uses view e mod K, reshuffled every epoch."""

    def __init__(self, head: nn.Module, cache: FeatureCache, bs: int, generator: torch.Generator,
                 device: torch.device | None = None, task: Any = None, weights: torch.Tensor | None = None) -> None:
        self.module, self.cache, self.bs, self.g = head, cache, bs, generator
        self.task = task  # training.task: the activation and metrics (None: one class per picture)
        self.weights = weights  # per training item: a class-balanced draw (with replacement) instead of a shuffle
        self.device = device or torch.device("cpu")
        n = len(cache.train_y)
        self.drop_last = n > bs  # drop a small last batch, as the image loader does
        self.n_batches = n // bs if self.drop_last else math.ceil(n / bs)
        self.epoch_batches: list[torch.Tensor] = []

    def train_modes(self) -> None:
        """The head alone trains."""
        self.module.train()

    def batches(self, epoch: int) -> Iterator[Batch]:
        """Mini-batches of one view's features in a fresh random order (or a fresh class-balanced draw)."""
        cache, bs = self.cache, self.bs
        feats = cache.train_views[epoch % len(cache.train_views)]
        n = len(cache.train_y)
        perm = (torch.randperm(n, generator=self.g) if self.weights is None
                else torch.multinomial(self.weights, n, replacement=True, generator=self.g))
        self.epoch_batches = []
        for b in range(self.n_batches):
            idx = perm[b * bs:(b + 1) * bs]
            xb = feats[idx].to(self.device, non_blocking=True)
            self.epoch_batches.append(xb)
            yield xb, cache.train_y[idx].to(self.device)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        """The head on pooled features."""
        return self.module(xb)

    def end_epoch(self) -> None:
        """Precise BN over the epoch's features."""
        recalibrate_bn(self.module, self.epoch_batches)
        self.epoch_batches = []

    @torch.inference_mode()
    def validate(self) -> Metrics:
        """The head on the cached validation features (equal to the frozen model on the images)."""
        self.module.eval()
        v = self.cache.valid
        logits = torch.cat([self.module(v[i:i + 1024].to(self.device)).float().cpu() for i in range(0, len(v), 1024)])
        if self.task is None:
            return metrics_from_probs(logits.softmax(1), self.cache.valid_y)
        return self.task.metrics(self.task.probs(logits), self.cache.valid_y)
