"""From a dataset to batches: decode once into memory when it fits, else per batch in workers."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from ursa.errors import DataError, ImageError
from ursa.vision.data import ImageDataset, ensure_both_sides
from ursa.vision.images import open_image
from ursa.vision.transforms import decode_size, eval_transform, load_pixels, train_transform

log = logging.getLogger("ursa")

# Decode everything into memory when the estimate is below this many bytes.
MEMORY_BUDGET = 1_500_000_000


def decode_all(ds: ImageDataset, short_side: int, workers: int | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Decode every image once (threads: Pillow releases the GIL); None marks an unreadable file."""
    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    errors: dict[int, str] = {}

    def one(i: int) -> torch.Tensor | None:
        try:
            return load_pixels(ds.files[i], short_side)
        except ImageError as e:
            errors[i] = f"{e.kind}: {e.reason}"
            return None

    out: list[torch.Tensor | None] = []
    with ThreadPoolExecutor(workers) as pool:
        for t in pool.map(one, range(len(ds))):
            out.append(t)
            if progress:
                progress(1)
    return out, errors


def failed_label(i: int) -> int:
    """The label an item gets when its file can no longer be read (changed or vanished since the scan): -1 - i.

    Negative, so no loss or metric counts it, and it still says which item it was (``failed_items``),
    also when a loader worker process read it.
    """
    return -1 - i


def failed_items(y: torch.Tensor) -> list[int]:
    """The dataset indices of the items a batch's labels mark as failed (``failed_label``)."""
    return [-1 - int(v) for v in y[y < 0].tolist()]


def estimate_bytes(n: int, short_side: int) -> int:
    """Rough memory for n decoded images (4:3 on average)."""
    return n * short_side * int(short_side * 1.4) * 3


class PixelSet(Dataset):
    """Items as (normalised float tensor, label) through a transform; pixels from memory or disk."""

    def __init__(self, ds: ImageDataset, idx: Sequence[int], tfm: Callable, short_side: int,
                 pixels: list[torch.Tensor | None] | None = None) -> None:
        self.ds, self.idx, self.tfm, self.short_side, self.pixels = ds, list(idx), tfm, short_side, pixels

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = self.idx[j]
        if self.pixels is not None and self.pixels[i] is not None:
            x = self.pixels[i]
        else:
            try:
                x = load_pixels(self.ds.files[i], self.short_side)
            except (ImageError, OSError):
                # Found bad after the scan (changed or gone on disk): a grey image keeps the batch shape and
                # the label says it failed, so it is skipped and reported, never trained on as its class.
                x = torch.full((3, self.short_side, self.short_side), 128, dtype=torch.uint8)
                return self.tfm(x), failed_label(i)
        return self.tfm(x), self.ds.labels[i]


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack into a channels_last batch (faster convolutions on CPU)."""
    xs = torch.stack([b[0] for b in batch]).contiguous(memory_format=torch.channels_last)
    return xs, torch.tensor([b[1] for b in batch], dtype=torch.long)


@dataclass
class DataLoaders:
    """Train and valid loaders plus what the learner and exporter need to know about them."""

    dataset: ImageDataset
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bs: int
    pixels: list[torch.Tensor | None] | None
    num_workers: int = 0
    seed: int = 42
    flips: str = "horizontal"  # which mirror images the training transform draws (transforms.FLIPS)
    pin_memory: bool = False  # page-locked batches for fast, non-blocking copies to a GPU
    decoded_bytes: int = 0  # the estimate the memory-or-stream decision was made on

    @property
    def in_memory(self) -> bool:
        """Pixels decoded once and kept; else decoded per batch by loader workers."""
        return self.pixels is not None

    def pixels_line(self) -> str:
        """Where the pixels live and why, for the first lines a run prints."""
        size = f"{self.decoded_bytes / 1e9:.2f} GB" if self.decoded_bytes >= 1e8 else f"{self.decoded_bytes / 1e6:.0f} MB"
        if self.in_memory:
            return f"pixels: decoded once and kept in memory ({size})"
        return (f"pixels: decoded per batch by {self.num_workers} loader worker(s), not kept in memory "
                f"({size} decoded)")

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def short_side(self) -> int:
        return decode_size(self.size)

    def loader(self, idx: Sequence[int], train: bool, size: int | None = None, bs: int | None = None,
               shuffle: bool | None = None, generator: torch.Generator | None = None,
               drop_last: bool | None = None, shard: tuple[int, int] | None = None,
               weights: torch.Tensor | None = None) -> DataLoader:
        """A DataLoader over items idx, augmented when train, at size (default: self.size).

        ``shard``: (rank, world) under torchrun: torch's DistributedSampler gives this rank its
        share of idx, reshuffled by ``sampler.set_epoch`` each epoch. ``weights``: per item of idx, drawn
        with replacement in proportion to them (torch's WeightedRandomSampler, from ``generator``) instead of shuffled.
        """
        size = size or self.size
        tfm = train_transform(size, self.mean, self.std, self.flips) if train else eval_transform(size, self.mean, self.std)
        ps = PixelSet(self.dataset, idx, tfm, self.short_side, self.pixels)
        shuffle = train if shuffle is None else shuffle
        bs = bs or self.bs
        # Training drops a last small batch (BatchNorm dislikes tiny batches); evaluation never does.
        drop_last = (shuffle and len(ps) > bs) if drop_last is None else drop_last
        nw = self.num_workers
        sampler = None
        if shard is not None:
            sampler = DistributedSampler(ps, num_replicas=shard[1], rank=shard[0], shuffle=shuffle, seed=self.seed)
            shuffle = False
        elif weights is not None:
            sampler = WeightedRandomSampler(weights, len(ps), replacement=True, generator=generator)
            shuffle = False
        return DataLoader(
            ps, batch_size=bs, shuffle=shuffle, drop_last=drop_last, sampler=sampler,
            num_workers=nw, collate_fn=collate, persistent_workers=False, generator=generator,
            worker_init_fn=_worker_init if nw else None, pin_memory=self.pin_memory,
        )

    @property
    def train(self) -> DataLoader:
        return self.loader(self.dataset.train_idx, train=True)

    @property
    def valid(self) -> DataLoader:
        return self.loader(self.dataset.valid_idx, train=False, bs=self.bs * 2)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def dataloaders(
    ds: ImageDataset,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    bs: int = 32,
    num_workers: int | None = None,
    cache: bool | None = None,
    progress: Callable[[int], None] | None = None,
    seed: int = 42,
    flips: str = "horizontal",
    pin_memory: bool = False,
    memory_budget: int = MEMORY_BUDGET,
) -> DataLoaders:
    """Decode once into memory when it fits (skipping and naming unreadable files), then build loaders.

    When the decoded set is bigger than memory_budget (or cache=False), images are decoded per
    batch in worker processes: memory then stays flat however many images there are.
    """
    short = decode_size(size)
    decoded = estimate_bytes(len(ds), short)
    if cache is None:
        cache = decoded <= memory_budget
    pixels = None
    if cache:
        pixels, reasons = decode_all(ds, short, progress=progress)
        bad = {i for i, p in enumerate(pixels) if p is None}
        if bad:
            pixels = [p for p in pixels if p is not None]
            ds.drop(bad, reasons)
    else:
        bad = set()
        reasons = {}
        for i, f in enumerate(ds.files):  # cheap header + decode check so bad files never reach a batch
            try:
                open_image(f, min_size=short)
            except ImageError as e:
                bad.add(i)
                reasons[i] = f"{e.kind}: {e.reason}"
            if progress:
                progress(1)
        ds.drop(bad, reasons)
    if ds.skipped:
        names = ", ".join(f"{n} ({r.split(':')[0]})" for n, r in ds.skipped[:5])
        more = f" and {len(ds.skipped) - 5} more" if len(ds.skipped) > 5 else ""
        log.warning("skipped %d unreadable image(s): %s%s (run `ursa verify` to quarantine them)",
                    len(ds.skipped), names, more)
    counts = ds.class_counts()
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"{ds.root}: class(es) {', '.join(empty)} have no readable images")
    ensure_both_sides(ds, 0.2)
    if num_workers is None:
        num_workers = 0 if pixels is not None else min(4, os.cpu_count() or 1)
    return DataLoaders(ds, size, tuple(mean), tuple(std), bs, pixels, num_workers, seed, flips, pin_memory, decoded)


def iter_batches(items: Sequence, bs: int) -> Iterator[Sequence]:
    """Consecutive slices of at most bs items."""
    for i in range(0, len(items), bs):
        yield items[i:i + bs]
