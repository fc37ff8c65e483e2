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
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from rich.console import Console

from ursa.errors import NoSpaceError
from ursa.inference.onnx import onnx_features
from ursa.util.device import autocast_dtype
from ursa.util.progress import make_console, progress_bar
from ursa.vision.loaders import DataLoaders
from ursa.vision.models import Classifier

# Above this many bytes of features, store them in a memory-mapped file instead of RAM.
RAM_BUDGET = 1_000_000_000
SPILL_SHARE = 0.9  # of the free disk space a memory-mapped cache may take


@dataclass
class FeatureCache:
    """Pooled body features: K training views plus the validation set."""

    train_views: list[torch.Tensor]  # each [n_train, n_features]
    train_y: torch.Tensor
    valid: torch.Tensor  # [n_valid, n_features]
    valid_y: torch.Tensor
    size: int
    augmented: bool
    computed: int = 0  # images this process ran through the body (its share under torchrun)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in [*self.train_views, self.valid])


def _alloc(n: int, f: int, total_bytes: int, spill_dir: Path | None, name: str) -> torch.Tensor:
    if spill_dir is not None and total_bytes > RAM_BUDGET:
        spill_dir.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(spill_dir / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, f))
        return torch.from_numpy(mm)
    return torch.empty(n, f, dtype=torch.float32)


def check_free_space(spill_dir: Path, total_bytes: int, n_views: int) -> None:
    """Refuse, before the pass, a memory-mapped cache the disk cannot hold (NoSpaceError, one line)."""
    where = Path(spill_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if total_bytes > free * SPILL_SHARE:
        raise NoSpaceError(f"{spill_dir}: the feature cache needs {total_bytes / 1e9:.1f} GB ({n_views} view(s) of every "
                           f"training image), only {free / 1e9:.1f} GB are free there: give --views N (N views cycled "
                           "over the epochs, e.g. --views 4) or fewer --epochs, or free some space")


def compute_features(model: Classifier, dls: DataLoaders, n_views: int, *, augment: bool = True,
                     size: int | None = None, seed: int = 42, backend: str = "auto", bf16: bool = False,
                     spill_dir: Path | None = None, console: Console | None = None,
                     quiet: bool = True, device: torch.device | None = None,
                     shard: tuple[int, int] | None = None) -> FeatureCache:
    """One streaming pass of the body in eval mode over K train views and the validation set.

    backend "auto" runs the body on ONNX Runtime on the CPU (about 2x eager torch here), falling
    back to torch when the export or its check fails; "torch" always uses torch (bf16 autocast if
    asked). On a GPU the body runs there, in its mixed precision. ``shard`` = (rank, world): only
    this rank's share of the rows (every world-th image) is computed; ``gather_cache`` puts them together.
    """
    size = size or dls.size
    device = device or torch.device("cpu")
    console = console or make_console(quiet)
    model.body.eval()
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', not {backend!r}")
    on_cpu = device.type == "cpu"
    fast = onnx_features(model, size) if backend == "auto" and not bf16 and on_cpu else None
    threads = torch.get_num_threads()
    run = _Pass(model, dls, n_views, augment, size, seed, spill_dir, console, quiet, shard or (0, 1))
    try:
        if fast is not None:
            # torch only augments now (in the prefetch thread); ONNX Runtime has its own threads.
            torch.set_num_threads(1)
            with torch.inference_mode():
                return run(fast, "ONNX Runtime")

        amp = autocast_dtype(device)

        def body(xb: torch.Tensor) -> torch.Tensor:
            xb = xb.to(device, non_blocking=True)
            if amp is not None:
                with torch.autocast(device.type, dtype=amp):
                    return model.features(xb).float().cpu()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and on_cpu):
                return model.features(xb).float().cpu()

        # torch runs body and augmentation on the same OpenMP threads: no second thread to compete with it.
        with torch.inference_mode():
            return run(body, "torch" if on_cpu else f"torch on {device}")
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
    shard: tuple[int, int] = (0, 1)

    def __call__(self, body: Callable[[torch.Tensor], torch.Tensor], engine: str) -> FeatureCache:
        dls, model, n_views, spill_dir = self.dls, self.model, self.n_views, self.spill_dir
        rank, world = self.shard
        train_idx, valid_idx = dls.dataset.train_idx[rank::world], dls.dataset.valid_idx[rank::world]
        n_feat = model.head_cfg.n_features * (2 if model.head_cfg.pool == "concat" else 1)
        total_bytes = (n_views * len(train_idx) + len(valid_idx)) * n_feat * 4
        self.console.print(
            f"feature cache: {n_views} view(s) of {len(train_idx)} training images + {len(valid_idx)} validation "
            f"images, {total_bytes / 1e6:.0f} MB" + (" (memory-mapped)" if spill_dir and total_bytes > RAM_BUDGET else "")
            + f"; body on {engine}" + (f"; this rank's share of {world}" if world > 1 else ""),
            highlight=False,
        )
        if spill_dir is not None and total_bytes > RAM_BUDGET:
            check_free_space(spill_dir, total_bytes, n_views)
        if world > 1 and spill_dir is not None:
            spill_dir = spill_dir / f"rank{rank}"  # each rank its own files
        prefetching = engine == "ONNX Runtime"  # torch would compete with itself for the same cores
        views = []
        labels = torch.tensor(dls.dataset.labels, dtype=torch.long)
        train_y, valid_y = labels[train_idx].clone(), labels[valid_idx].clone()
        # Measured on 2 cores: batches of 8 are fastest on either engine (and the prefetch thread
        # stays one small batch ahead).
        bs = 8
        with progress_bar(self.console, self.quiet) as prog:
            task = prog.add_task("computing body features", total=n_views * len(train_idx) + len(valid_idx))
            for k in range(n_views):
                torch.manual_seed(self.seed * 1000 + k)  # reproducible augmentation of view k
                out = _alloc(len(train_idx), n_feat, total_bytes, spill_dir, f"train_view{k}")
                dl = dls.loader(train_idx, train=self.augment, size=self.size, bs=bs, shuffle=False)
                _fill(body, dl, out, train_y, prog, task, prefetching)
                views.append(out)
            valid = _alloc(len(valid_idx), n_feat, total_bytes, spill_dir, "valid")
            _fill(body, dls.loader(valid_idx, train=False, size=self.size, bs=bs, shuffle=False), valid, valid_y, prog,
                  task, prefetching)
        return FeatureCache(views, train_y, valid, valid_y, self.size, self.augment,
                            n_views * len(train_idx) + len(valid_idx))


def gather_cache(local: FeatureCache, gather_rows: Callable[..., torch.Tensor], n_train: int, n_valid: int,
                 spill_dir: Path | None = None) -> FeatureCache:
    """The whole cache from every rank's share (gather_rows: ``training.dist.Dist.gather_rows``), rows in order.

    Memory-mapped under spill_dir (this rank's own folder) when the whole is over RAM_BUDGET.
    """
    n_feat = local.valid.shape[1]
    total = (len(local.train_views) * n_train + n_valid) * n_feat * 4
    views = [gather_rows(v, n_train, _alloc(n_train, n_feat, total, spill_dir, f"all_train_view{k}"))
             for k, v in enumerate(local.train_views)]
    valid = gather_rows(local.valid, n_valid, _alloc(n_valid, n_feat, total, spill_dir, "all_valid"))
    return FeatureCache(views, gather_rows(local.train_y, n_train), valid, gather_rows(local.valid_y, n_valid),
                        local.size, local.augmented, local.computed)


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


def _fill(body: Callable[[torch.Tensor], torch.Tensor], dl, out: torch.Tensor, y: torch.Tensor, prog, task,
          prefetching: bool) -> None:
    """Features of every item into out; an item that failed to read (negative label) gets that label in y."""
    i = 0
    assert not dl.drop_last, "feature cache needs every item"
    for xb, yb in (prefetch(dl) if prefetching else dl):
        f = body(xb)
        out[i:i + len(f)] = f
        failed = yb < 0
        if bool(failed.any()):
            y[i:i + len(f)][failed] = yb[failed]  # skipped in every view: this view could not read it
        i += len(f)
        prog.update(task, advance=len(f))
