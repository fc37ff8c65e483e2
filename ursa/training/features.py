"""Feature cache for the frozen stage: run the frozen body once per augmented view, train the head.

While the body is frozen (and its BatchNorm in eval mode) it is a fixed function, so running it
on every batch of every epoch recomputes the same thing. Here it runs once per image per view
(K augmented views of the training set, one un-augmented view of the validation set) in one
streaming pass, the pooled features stay in memory (or in a memory-mapped file when large),
and the head trains on them with the same one-cycle schedule: epoch e uses view e mod K, so with
the default K (one view per epoch) each epoch still sees a fresh augmentation.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from rich.console import Console

from ursa.inference.onnx import onnx_features
from ursa.util.progress import progress_bar
from ursa.vision.loaders import DataLoaders
from ursa.vision.models import Classifier

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


def compute_features(model: Classifier, dls: DataLoaders, n_views: int, *, augment: bool = True,
                     size: int | None = None, seed: int = 42, backend: str = "auto", bf16: bool = False,
                     spill_dir: Path | None = None, console: Console | None = None,
                     quiet: bool = True) -> FeatureCache:
    """One streaming pass of the body in eval mode over K train views and the validation set.

    backend "auto" runs the body on ONNX Runtime (about 2x eager torch here), falling back to
    torch when the export or its check fails; "torch" always uses torch (bf16 autocast if asked).
    """
    size = size or dls.size
    console = console or Console(stderr=True, quiet=quiet)
    model.body.eval()
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', not {backend!r}")
    fast = onnx_features(model, size) if backend == "auto" and not bf16 else None
    threads = torch.get_num_threads()
    run = _Pass(model, dls, n_views, augment, size, seed, spill_dir, console, quiet)
    try:
        if fast is not None:
            # torch only augments now (in the prefetch thread); ONNX Runtime has its own threads.
            torch.set_num_threads(1)
            with torch.inference_mode():
                return run(fast, "ONNX Runtime")

        def body(xb: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model.features(xb).float()

        # torch runs body and augmentation on the same OpenMP threads: no second thread to compete with it.
        with torch.inference_mode():
            return run(body, "torch")
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Pass:
    """The settings of one feature pass (what ``compute_features`` was asked)."""

    model: Classifier
    dls: DataLoaders
    n_views: int
    augment: bool
    size: int
    seed: int
    spill_dir: Path | None
    console: Console
    quiet: bool

    def __call__(self, body: Callable[[torch.Tensor], torch.Tensor], engine: str) -> FeatureCache:
        dls, model, n_views, spill_dir = self.dls, self.model, self.n_views, self.spill_dir
        train_idx, valid_idx = dls.dataset.train_idx, dls.dataset.valid_idx
        n_feat = model.head_cfg.n_features * (2 if model.head_cfg.pool == "concat" else 1)
        total_bytes = (n_views * len(train_idx) + len(valid_idx)) * n_feat * 4
        self.console.print(
            f"feature cache: {n_views} view(s) of {len(train_idx)} training images + {len(valid_idx)} validation "
            f"images, {total_bytes / 1e6:.0f} MB" + (" (memory-mapped)" if spill_dir and total_bytes > RAM_BUDGET else "")
            + f"; body on {engine}",
            highlight=False,
        )
        prefetching = engine != "torch"  # torch would compete with itself for the same cores
        views = []
        # Measured on 2 cores: batches of 8 are fastest on either engine (and the prefetch thread
        # stays one small batch ahead).
        bs = 8
        with progress_bar(self.console, self.quiet) as prog:
            task = prog.add_task("computing body features", total=n_views * len(train_idx) + len(valid_idx))
            for k in range(n_views):
                torch.manual_seed(self.seed * 1000 + k)  # reproducible augmentation of view k
                out = _alloc(len(train_idx), n_feat, total_bytes, spill_dir, f"train_view{k}")
                dl = dls.loader(train_idx, train=self.augment, size=self.size, bs=bs, shuffle=False)
                _fill(body, dl, out, prog, task, prefetching)
                views.append(out)
            valid = _alloc(len(valid_idx), n_feat, total_bytes, spill_dir, "valid")
            _fill(body, dls.loader(valid_idx, train=False, size=self.size, bs=bs, shuffle=False), valid, prog, task,
                  prefetching)
        labels = torch.tensor(dls.dataset.labels, dtype=torch.long)
        return FeatureCache(views, labels[train_idx], valid, labels[valid_idx], self.size, self.augment)


def prefetch(it: Iterable, depth: int = 2) -> Iterator:
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


def _fill(body: Callable[[torch.Tensor], torch.Tensor], dl, out: torch.Tensor, prog, task, prefetching: bool) -> None:
    i = 0
    assert not dl.drop_last, "feature cache needs every item"
    for xb, _ in (prefetch(dl) if prefetching else dl):
        f = body(xb)
        out[i:i + len(f)] = f
        i += len(f)
        prog.update(task, advance=len(f))
