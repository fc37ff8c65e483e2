"""The Learner: one training loop with named events, and fastai's verbs on top of it.

``run`` is the loop (see ``ursa.training.callbacks`` for the events); it iterates over a batch
source (``ursa.training.sources``): images through the model, or cached body features through the
head while the body is frozen, which gives the same result many times faster. The verbs
(``freeze``, ``unfreeze``, ``fit_one_cycle``, ``lr_find``, ``get_preds``, ``save``, ``load``,
``export``) build a source and an optimiser and call ``run``. A learner is configured once, by
its ``LearnerConfig``; per-stage settings are arguments of ``fit_one_cycle``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from rich.console import Console

from ursa.errors import DivergedError
from ursa.inference.modelfile import ModelMeta, save_model
from ursa.training.callbacks import (
    BestWeights,
    metric_values,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Recorder,
    check_callbacks,
    default_callbacks,
)
from ursa.training.balance import sample_weights
from ursa.training.config import LearnerConfig
from ursa.training.dist import Dist
from ursa.training.features import FeatureCache, compute_features, gather_cache
from ursa.training.optim import head_lr, make_optimizer, one_cycle, param_groups
from ursa.training.sources import BatchSource, CachedFeatures, ImageBatches, Metrics
from ursa.training.task import task_for
from ursa.util.device import autocast_dtype, resolve_device
from ursa.util.files import save_tensors
from ursa.util.progress import make_console
from ursa.vision.loaders import DataLoaders, failed_items
from ursa.vision.models import Classifier


class Learner:
    """Model + data + a fixed configuration, with fastai's verbs."""

    def __init__(self, dls: DataLoaders, model: Classifier, config: LearnerConfig | None = None,
                 cbs: Iterable[Callback] = (), console: Console | None = None, dist: Dist | None = None) -> None:
        self.dls, self.model = dls, model
        self.config = config or LearnerConfig()
        self.task = task_for(getattr(dls, "dataset", None))  # loss, activation, metrics: one class, or a label set
        self.dist = dist or Dist()  # this process's rank under torchrun (rank 0 of 1 without)
        self.device = resolve_device(self.config.device)  # auto: CUDA, then MPS, then the CPU, as the CLI
        # CUDA: bf16 autocast where the GPU has it, else fp16 with a gradient scaler; the CPU: fp32 (or --bf16)
        self.amp = autocast_dtype(self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.feature_counts: list[float] = []  # images each rank ran through the body for the feature cache
        self.fit_args: dict = {}  # the current fit's settings (a checkpoint saves them)
        self.fit_generator: torch.Generator | None = None
        self.sched: Any = None
        self.console = console or make_console(self.config.quiet)
        cbs = list(cbs)
        check_callbacks(cbs)
        self.cbs = sorted([*default_callbacks(), *cbs], key=lambda cb: cb.order)
        self.recorder: Recorder = next(cb for cb in self.cbs if isinstance(cb, Recorder))
        self.best: BestWeights = next(cb for cb in self.cbs if isinstance(cb, BestWeights))
        self.diverged = False
        self.epochs_done = 0  # epochs trained so far, over every fit
        self.kept_row: dict | None = None  # set by use_best(): the history row whose weights the model holds
        # Images that changed or vanished on disk after the scan (--pixels stream): index -> why; they are
        # skipped (no loss, not in the validation figures) and reported by the run writer.
        self.vanished: dict[int, str] = {}
        self._cache: FeatureCache | None = None
        # What the loop sets while it runs (callbacks read these); created here, so a learner always has them.
        self.n_epoch, self.epoch, self.epoch_in_fit, self.n_iter, self.iter = 0, 0, 0, 0, 0
        self.stage = ""
        self.source: BatchSource | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.metrics: Metrics = (float("nan"),) * 4
        self._running: list[Callback] = self.cbs
        self.xb: torch.Tensor | None = None
        self.yb: torch.Tensor | None = None
        self.pred: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.loss_value = float("nan")
        self.lr = 0.0
        self.batch_cancelled = False
        self.model.to(self.device, memory_format=torch.channels_last)

    # --- fastai verbs --------------------------------------------------------------------------

    def freeze(self) -> None:
        """Train the head only (and the body's BatchNorm, unless the feature cache needs it fixed)."""
        self.model.freeze(train_bn=not self.config.cache)

    def unfreeze(self) -> None:
        """Train every layer (use a slice of learning rates); cached body features no longer hold."""
        self.model.unfreeze()
        self._cache = None

    def use_best(self, force: bool = False) -> dict | None:
        """Put back the best epoch's weights when their error is lower than the last epoch's (by an image or more).

        Returns that epoch's history row, or None when the last epoch is as good; metrics and the
        exported model file then describe the kept epoch. ``force``: put them back whatever the last
        epoch did (after a fit that diverged, whose last row is not the model's).
        """
        b, rows = self.best, self.recorder.rows
        if b.state is None or b.row is None or not rows:
            return None
        if not force and not b.beats(rows):
            return None
        self.model.load_state_dict(b.state)
        self.kept_row = dict(b.row)
        return self.kept_row

    def restore_epochs(self, epochs_done: int) -> None:
        """The epoch count of a checkpoint (``--resume``): the learner owns it, so it sets it."""
        self.epochs_done = int(epochs_done)

    def recovered(self) -> None:
        """A divergence was handled by going back to good weights (the recipe's fine-tuning): no longer diverged."""
        self.diverged = False

    def note_vanished(self, y: torch.Tensor) -> None:
        """Record the items a batch marks as unreadable since the scan (``loaders.failed_items``)."""
        for i in failed_items(y):
            self.vanished.setdefault(i, "changed or vanished on disk during training")

    def vanished_names(self) -> list[str]:
        """Names (relative to the data folder) of the images skipped because they changed or vanished."""
        return [self.dls.dataset.rel(i) for i in sorted(self.vanished)]

    def drop_features(self) -> None:
        """Free the feature cache (it is computed again when a frozen fit needs it)."""
        self._cache = None

    @property
    def feature_cache(self) -> FeatureCache | None:
        """The frozen body's cached features, while they are valid."""
        return self._cache

    def cached_features(self, n_views: int = 1) -> FeatureCache:
        """The frozen body's features of n_views augmented training views and the validation set (computed once, kept)."""
        return self._features(n_views, None)

    def loss_func(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (label smoothing, --balance as configured) over the items that were read (label >= 0).

        An image that changed or vanished since the scan has a negative label: it adds nothing (a
        batch of nothing else gives a zero loss, so every rank still takes the same steps).
        """
        keep = y >= 0
        if not bool(keep.all()):
            self.note_vanished(y)
            if not bool(keep.any()):
                return (logits * 0).sum()
            logits, y = logits[keep], y[keep]
        return self.task.loss(logits, y, self.config)  # task: cross-entropy (balanced as --balance says) or BCE

    def fit_one_cycle(self, n_epoch: int, max_lr: float | slice = 3e-3, pct_start: float = 0.25, *,
                      size: int | None = None, bf16: bool = False, stage: str | None = None,
                      cbs: Sequence[Callback] = (), resume: Any = None) -> None:
        """Train n_epoch epochs with one cycle: LR warms up then anneals, momentum the other way.

        ``size``: train at this input size (progressive resizing); ``bf16``: bfloat16 autocast;
        ``cbs``: callbacks for this fit only, beside the learner's own; ``resume``: a
        ``training.checkpoint.Checkpoint`` of this fit to go on from (its optimiser, schedule and random state).
        """
        if n_epoch <= 0:
            return
        self.kept_row = None  # new weights: an earlier use_best's row no longer describes them (a notebook's refit)
        frozen = self.model.is_frozen
        stage = stage or ("frozen" if frozen else "unfrozen")
        cached = frozen and self.config.cache
        views = min(self.config.views or n_epoch, n_epoch)
        source = self.batch_source(cached, size=size, n_views=views, generator=self._generator())
        if cached:
            groups = param_groups([list(self.model.head.parameters())], head_lr(max_lr))
        else:
            groups = param_groups(self.model.param_groups(), max_lr)
        opt = make_optimizer(groups, self.config.wd)
        sched = one_cycle(opt, n_epoch * source.n_batches, pct_start)
        first = 0
        self.fit_args = {"n_epoch": n_epoch, "max_lr": [max_lr.start, max_lr.stop] if isinstance(max_lr, slice) else max_lr,
                         "pct_start": pct_start, "size": size, "bf16": bf16, "stage": stage}
        if resume is not None:
            first = resume.restore_fit(self, opt, sched)
        self.run(n_epoch, source, opt, sched, stage=stage, bf16=bf16, cbs=[*self.cbs, *cbs] if cbs else None,
                 first_epoch=first)
        # Every rank ends with rank 0's weights (the cached head is trained on every rank; DDP's are equal already).
        self.dist.sync_module(self.model.head if cached else self.model)

    def lr_find(self, **kwargs: Any) -> Any:
        """Sweep learning rates and suggest one (see ursa.training.lr_find); the state is restored after."""
        from ursa.training.lr_find import lr_find

        return lr_find(self, **kwargs)

    # --- the loop ------------------------------------------------------------------------------

    def batch_source(self, cached: bool, size: int | None = None, n_views: int = 1,
                     generator: torch.Generator | None = None, keep: bool = True) -> BatchSource:
        """Cached body features for the head (frozen body), or augmented images through the model.

        keep=False: a feature cache computed for this source is not kept for later fits.
        """
        generator = generator or self._generator()
        self.fit_generator = generator  # a checkpoint saves its state: a resumed run shuffles on as before
        if cached:
            # Every rank trains the same head on the gathered features (cheaper than syncing a 1 s fit);
            # fit_one_cycle copies rank 0's head to all at the end, so they agree exactly.
            cache = self._features(n_views, size, keep)
            return CachedFeatures(self.model.head, cache, self.dls.bs, generator, self.device, self.task,
                                  sample_weights(self.config, cache.train_y))
        d = self.dist
        return ImageBatches(self.model, self.dls, augment=self.config.augment, size=size, generator=generator,
                            bn_eval_frozen=self.config.cache, bn_eval_unfrozen=self.config.bn_stats_frozen,
                            validate=self.validate, device=self.device, weights=sample_weights(
                                self.config, torch.tensor(self.dls.dataset.labels)[self.dls.dataset.train_idx]),
                            shard=(d.rank, d.world) if d.active else None, wrap=self._ddp if d.active else None)

    def _ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """torch's DistributedDataParallel around what is trained: gradients averaged across the ranks."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def autocast(self, bf16: bool = False) -> Any:
        """Mixed precision where it runs: the GPU's (bf16 or fp16), else bfloat16 on the CPU when asked."""
        if self.amp is not None:
            return torch.autocast(self.device.type, dtype=self.amp)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and self.device.type == "cpu")

    def run(self, n_epoch: int, source: BatchSource, opt: torch.optim.Optimizer, sched: Any = None, *,
            stage: str = "", bf16: bool = False, validate: bool = True,
            cbs: Sequence[Callback] | None = None, first_epoch: int = 0) -> None:
        """The training loop: events around every batch and epoch; cbs replaces the learner's own callbacks.

        ``first_epoch``: a resumed fit starts there (the epochs before it are in the checkpoint).
        """
        self.n_epoch, self.source, self.opt, self.sched, self.stage = n_epoch, source, opt, sched, stage
        self.metrics = (float("nan"),) * 4
        self._running = sorted(cbs, key=lambda cb: cb.order) if cbs is not None else self.cbs
        try:
            self._event("before_fit")
            for e in range(first_epoch, n_epoch):
                self.epoch, self.epoch_in_fit, self.n_iter = self.epochs_done, e, source.n_batches
                try:
                    self._event("before_epoch")
                    source.train_modes()
                    for i, (xb, yb) in enumerate(source.batches(e)):
                        self.iter, self.xb, self.yb, self.batch_cancelled = i, xb, yb, False
                        try:
                            self._one_batch(source, opt, sched, bf16)
                        except CancelBatchException:
                            self.batch_cancelled = True  # no loss, no step: recorder and guard skip it
                            self._event("after_cancel_batch")
                        self._event("after_batch")
                except CancelEpochException:
                    self._event("after_cancel_epoch")  # the rest of the batches are skipped; still validated
                source.end_epoch()
                if validate:
                    # rank 0's figures on every rank: the recorder, the guard and the rules then agree everywhere
                    self.metrics = tuple(self.dist.agree(list(source.validate())))  # type: ignore[assignment]
                    self.epochs_done += 1
                self._event("after_epoch")
        except CancelFitException as stop:
            if str(stop):
                self.console.print(f"[yellow]stopped early:[/] {stop}")
            self._event("after_cancel_fit")
        except DivergedError:
            self.diverged = True
            raise
        finally:
            self._event("after_fit")

    def _one_batch(self, source: BatchSource, opt: torch.optim.Optimizer, sched: Any, bf16: bool) -> None:
        self._event("before_batch")
        with self.autocast(bf16):
            self.pred = source.forward(self.xb)
        self.loss = self.loss_func(self.pred.float(), self.yb)
        self._event("after_loss")
        self.lr = opt.param_groups[-1]["lr"]  # the rate this batch uses
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16 on a GPU: scale the loss so small gradients do not vanish
            self.scaler.scale(self.loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            self.loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        # Every rank sees the same (averaged) loss, so the guard and the rules decide the same everywhere.
        self.loss_value = self.dist.mean(float(self.loss.detach()))
        self._event("after_step")

    def _event(self, name: str) -> None:
        for cb in self._running:
            cb(name, self)

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.config.seed + self.epochs_done)
        return g

    def _features(self, n_views: int, size: int | None, keep: bool = True) -> FeatureCache:
        """The feature cache, computed (one streaming pass) unless it already has enough views at this size."""
        cache = self._cache
        if cache is None or len(cache.train_views) < n_views or cache.size != (size or self.dls.size):
            cfg, d = self.config, self.dist
            # Under torchrun each rank runs the body on its share of the images; the shares are gathered.
            cache = compute_features(self.model, self.dls, n_views, augment=cfg.augment, size=size, seed=cfg.seed,
                                     backend=cfg.feature_backend, bf16=cfg.bf16_features, spill_dir=cfg.spill_dir,
                                     console=self.console, quiet=cfg.quiet, device=self.device,
                                     shard=(d.rank, d.world) if d.active else None)
            self.feature_counts = d.each(float(cache.computed))
            if d.active:
                spill = cfg.spill_dir / f"rank{d.rank}" if cfg.spill_dir is not None else None
                cache = gather_cache(cache, d.gather_rows, len(self.dls.dataset.train_idx),
                                     len(self.dls.dataset.valid_idx), spill)
            self.note_vanished(torch.cat([cache.train_y, cache.valid_y]))
            if keep:
                self._cache = cache
        return cache

    # --- evaluation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def get_preds(self, idx: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and targets for items idx (default: the validation set), eval transform."""
        logits, y, _ = self.get_logits(idx)
        return self.task.probs(logits), y

    @torch.inference_mode()
    def get_logits(self, idx: Sequence[int] | None = None,
                   features: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits, targets and (when asked) pooled body features for items idx (default: the validation set), one pass.

        The run writer fits the temperature on the logits and maps the features; the same pass
        gives the report its probabilities.
        """
        idx = self.dls.dataset.valid_idx if idx is None else list(idx)
        self.model.eval()
        # 16 at a time: on CPU as fast as larger batches, and a 224 px batch of 64 holds ~1 GB of activations.
        dl = self.dls.loader(idx, train=False, bs=min(self.dls.bs, 16))
        logits, ys, feats = [], [], []
        for xb, yb in dl:
            with self.autocast():
                f = self.model.features(xb.to(self.device, non_blocking=True))
                logits.append(self.model.head(f).float().cpu())
            ys.append(yb)
            self.note_vanished(yb)
            if features:
                feats.append(f.float().cpu())
        return torch.cat(logits), torch.cat(ys), torch.cat(feats) if features else None

    def validate(self) -> Metrics:
        """valid_loss, error_rate, accuracy on the validation set (each rank a share under torchrun, gathered)."""
        d = self.dist
        if not d.active:
            probs, y = self.get_preds()
            return self.task.metrics(probs, y)
        idx = self.dls.dataset.valid_idx
        mine = d.shard(idx)
        if mine:
            probs, y = self.get_preds(mine)
        else:  # fewer validation images than ranks
            probs, y = torch.zeros(0, len(self.dls.classes)), torch.zeros(0, dtype=torch.long)
        probs, y = d.gather_rows(probs, len(idx)), d.gather_rows(y, len(idx))
        self.note_vanished(y)  # every rank's unreadable images, so rank 0 reports them all
        return self.task.metrics(probs, y)

    # --- checkpoints and export ----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Checkpoint the weights (safetensors, atomic) to come back to with load()."""
        return save_tensors(path, {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()})

    def load(self, path: str | Path) -> "Learner":
        """Restore weights saved by save()."""
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(path)))
        return self

    def export(self, path: str | Path, metrics: dict | None = None, config: dict | None = None,
               state: dict | None = None, calibration: dict | None = None, open_world: dict | None = None,
               licenses: dict | None = None, thresholds: list[float] | None = None) -> Path:
        """Write the one model file (weights + metadata) that predict and serve load.

        ``state``: other weights to write (the best epoch's) instead of the current ones; the
        learner's own are left as they are. ``calibration``: the temperature and unsure threshold
        fitted on the validation set for these weights (``diagnose.calibration``); ``open_world``: the
        ``openset`` and ``conformal`` metadata fields (``training.reference``); ``licenses``: the images' licences.
        """
        if metrics is None and self.recorder.rows:
            last = self.kept_row or self.recorder.rows[-1]
            metrics = metric_values(last)
        meta = ModelMeta(
            arch=self.model.arch, classes=list(self.dls.classes), input_size=self.dls.size,
            mean=list(self.dls.mean), std=list(self.dls.std), head=asdict(self.model.head_cfg),
            metrics=metrics or {}, config=config or {}, calibration=calibration or {}, **(open_world or {}),
            licenses=licenses or {}, task=self.task.name, thresholds=list(thresholds or []),
        )
        current = {k: v.clone() for k, v in self.model.state_dict().items()} if state is not None else None
        self.model.eval()
        try:
            if state is not None:
                self.model.load_state_dict(state)
            return save_model(self.model, path, meta)
        finally:
            if current is not None:
                self.model.load_state_dict(current)
