"""Feature cache for the frozen stage: run the frozen body once per augmented view, train the head.

While the body is frozen (and its BatchNorm in eval mode) it is a fixed function, so running it
on every batch of every epoch recomputes the same thing. Here it runs once per image per view
(K augmented views of the training set, one un-augmented view of the validation set) in one
streaming pass, the pooled features stay in memory (or in a memory-mapped file when large),
and the head trains on them with the same one-cycle schedule: epoch e uses view e mod K, so with
the default K (one view per epoch) each epoch still sees a fresh augmentation.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

from ursa.inference.onnx import onnx_features

if TYPE_CHECKING:
    from ursa.training.learner import Learner

# Above this many bytes of features, store them in a memory-mapped file instead of RAM.
RAM_BUDGET = 1_000_000_000


@dataclass
class FeatureCache:
    """Pooled body features: K training views plus the validation set."""

    train_views: list[torch.Tensor]  # each [n_train, n_features]
    train_y: torch.Tensor
    valid: torch.Tensor  # [n_valid, n_features]
    valid_y: torch.Tensor
    size: int
    augmented: bool

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in [*self.train_views, self.valid])


def _alloc(n: int, f: int, total_bytes: int, spill_dir: Path | None, name: str) -> torch.Tensor:
    if spill_dir is not None and total_bytes > RAM_BUDGET:
        spill_dir.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(spill_dir / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, f))
        return torch.from_numpy(mm)
    return torch.empty(n, f, dtype=torch.float32)


def compute_features(learn: "Learner", n_views: int, augment: bool = True, size: int | None = None,
                     spill_dir: Path | None = None) -> FeatureCache:
    """One streaming pass of the body in eval mode over K train views and the validation set."""
    dls, model = learn.dls, learn.model
    size = size or dls.size
    model.body.eval()
    if learn.feature_backend not in ("auto", "torch"):
        raise ValueError(f"feature_backend must be 'auto' or 'torch', not {learn.feature_backend!r}")
    fast = onnx_features(model, size) if learn.feature_backend == "auto" and not learn.bf16_features else None
    threads = torch.get_num_threads()
    try:
        if fast is not None:
            # torch only augments now (in the prefetch thread); ONNX Runtime has its own threads.
            torch.set_num_threads(1)
            with torch.inference_mode():
                return _compute(learn, fast, n_views, augment, size, spill_dir, "ONNX Runtime")

        def body(xb: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=learn.bf16_features):
                return model.features(xb).float()

        # torch runs body and augmentation on the same OpenMP threads: no second thread to compete with it.
        with torch.inference_mode():
            return _compute(learn, body, n_views, augment, size, spill_dir, "torch")
    finally:
        torch.set_num_threads(threads)


def _compute(learn: "Learner", body: Callable[[torch.Tensor], torch.Tensor], n_views: int, augment: bool,
             size: int, spill_dir: Path | None, engine: str) -> FeatureCache:
    dls, model = learn.dls, learn.model
    train_idx, valid_idx = dls.dataset.train_idx, dls.dataset.valid_idx
    n_feat = model.head_cfg.n_features * (2 if model.head_cfg.pool == "concat" else 1)
    total_bytes = (n_views * len(train_idx) + len(valid_idx)) * n_feat * 4
    learn.console.print(
        f"feature cache: {n_views} view(s) of {len(train_idx)} training images + {len(valid_idx)} validation "
        f"images, {total_bytes / 1e6:.0f} MB" + (" (memory-mapped)" if spill_dir and total_bytes > RAM_BUDGET else "")
        + f"; body on {engine}",
        highlight=False,
    )
    prefetch = engine != "torch"  # torch would compete with itself for the same cores
    views = []
    # Measured on 2 cores: batches of 8 are fastest on either engine (and the prefetch thread
    # stays one small batch ahead).
    bs = 8
    with learn._progress() as prog:
        task = prog.add_task("computing body features", total=n_views * len(train_idx) + len(valid_idx))
        for k in range(n_views):
            torch.manual_seed(learn.seed * 1000 + k)  # reproducible augmentation of view k
            out = _alloc(len(train_idx), n_feat, total_bytes, spill_dir, f"train_view{k}")
            dl = dls.loader(train_idx, train=augment, size=size, bs=bs, shuffle=False)
            _fill(body, dl, out, prog, task, prefetch)
            views.append(out)
        valid = _alloc(len(valid_idx), n_feat, total_bytes, spill_dir, "valid")
        _fill(body, dls.loader(valid_idx, train=False, size=size, bs=bs, shuffle=False), valid, prog, task, prefetch)
    labels = torch.tensor(dls.dataset.labels, dtype=torch.long)
    return FeatureCache(views, labels[train_idx], valid, labels[valid_idx], size, augment)


def _prefetch(it: Iterable, depth: int = 2) -> Iterator:
    """Iterate in a background thread, so the next batch is augmented while this one runs (the runtime frees the GIL)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in it:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
            put(e)
        put(done)

    thread = threading.Thread(target=work, daemon=True, name="ursa-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # The consumer is done (or stopped early: an error, Ctrl-C): let the producer finish its
        # current item and end, so no augmentation runs (and draws random numbers) after we return.
        stop.set()
        thread.join(timeout=10)


def _fill(body: Callable[[torch.Tensor], torch.Tensor], dl, out: torch.Tensor, prog, task, prefetch: bool) -> None:
    i = 0
    assert not dl.drop_last, "feature cache needs every item"
    for xb, _ in (_prefetch(dl) if prefetch else dl):
        f = body(xb)
        out[i:i + len(f)] = f
        i += len(f)
        prog.update(task, advance=len(f))


def fit_head_cached(learn: "Learner", n_epoch: int, max_lr: float | slice, pct_start: float, stage: str) -> None:
    """fit_one_cycle for the head alone, on cached features; same schedule, same metrics."""
    from ursa.training.learner import metrics_from_probs, recalibrate_bn

    cache = learn.feature_cache
    n_views = min(learn.n_views or n_epoch, n_epoch)
    if cache is None or len(cache.train_views) < n_views or cache.size != (learn.train_size or learn.dls.size):
        cache = compute_features(learn, n_views=n_views, augment=learn.augment, size=learn.train_size,
                                 spill_dir=learn.spill_dir)
        learn.feature_cache = cache
    head = learn.model.head
    # The head is the last layer group: a slice's high end applies to it, as in fastai.
    hi = max_lr.stop if isinstance(max_lr, slice) else float(max_lr)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": hi}], weight_decay=learn.wd, betas=(0.9, 0.99))
    n = len(cache.train_y)
    bs = learn.dls.bs
    drop_last = n > bs
    n_batches = n // bs if drop_last else math.ceil(n / bs)
    sched = learn._scheduler(opt, [hi], n_epoch * n_batches, pct_start)
    g = learn._generator()
    epoch_counter = iter(range(n_epoch))

    def epoch_iter():
        e = next(epoch_counter)
        feats = cache.train_views[e % len(cache.train_views)]
        perm = torch.randperm(n, generator=g)
        head.train()
        for b in range(n_batches):
            idx = perm[b * bs:(b + 1) * bs]
            xb, yb = feats[idx], cache.train_y[idx]
            loss = learn.loss_func(head(xb), yb)
            lr = opt.param_groups[-1]["lr"]  # the rate this batch used
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            yield float(loss.detach()), lr, len(yb)
        recalibrate_bn(head, [feats[perm[b * bs:(b + 1) * bs]] for b in range(n_batches)])

    @torch.inference_mode()
    def validate() -> tuple[float, float, float]:
        head.eval()
        probs = torch.cat([head(cache.valid[i:i + 1024]).softmax(1) for i in range(0, len(cache.valid), 1024)])
        return metrics_from_probs(probs, cache.valid_y)

    learn._run_epochs(n_epoch, stage, n_batches, epoch_iter, validate)
