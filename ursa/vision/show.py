"""Look at the data first (the lesson's ``show_batch``): training images as the model sees them, and the class counts.

``batch_grid`` draws training images through the training augmentation (random crop, flip,
rotation, warp, lighting) at the input size, labelled with their class, as one picture;
``ursa show`` writes it and prints the classes with their counts on each side of the split, and
``ursa train`` writes it as ``batch.png`` at the start of a run. Only the images shown are
decoded, and the global random state is left as it was, so a run is the same with or without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ursa.errors import ImageError
from ursa.util.files import atomic_path
from ursa.vision.data import ImageDataset
from ursa.vision.transforms import decode_size, load_pixels, train_transform
from ursa.util.names import printable

N_SHOW = 16
TILE = 168  # pixels per image in the grid
IMBALANCE_RATIO = 2.0  # largest class over smallest at which ursa warns


def pick(ds: ImageDataset, n: int = N_SHOW, seed: int = 42) -> list[int]:
    """n training items, the classes taking turns (so each shows), drawn at random within each class."""
    rng = np.random.default_rng(seed)
    by_class = [[i for i in ds.train_idx if ds.label_indices(i)[:1] == [c]] for c in range(len(ds.classes))]
    for items in by_class:
        rng.shuffle(items)
    out: list[int] = []
    while len(out) < n and any(by_class):
        for items in by_class:
            if items and len(out) < n:
                out.append(items.pop())
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def batch_grid(ds: ImageDataset, size: int, mean: Sequence[float], std: Sequence[float], n: int = N_SHOW,
               seed: int = 42, augment: bool = True, flips: str = "horizontal") -> Image.Image:
    """A grid of n training images through the training transform (augmented unless told otherwise), labelled."""
    idx = pick(ds, n, seed)
    tfm = train_transform(size, mean, std, flips)
    m = torch.tensor(list(mean)).view(3, 1, 1)
    s = torch.tensor(list(std)).view(3, 1, 1)
    tiles: list[tuple[Image.Image, str]] = []
    threads = torch.get_num_threads()
    # One thread: these small ops take ~1 s on two busy cores (threads waiting on each other), ~0.1 s on one.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay as they were
            torch.manual_seed(seed)
            for i in idx:
                try:
                    px = load_pixels(ds.files[i], decode_size(size))
                except ImageError:
                    continue
                if augment:
                    x = (tfm(px) * s + m).clamp(0, 1)
                    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                else:
                    arr = px.permute(1, 2, 0).numpy()
                im = Image.fromarray(arr)
                im.thumbnail((TILE, TILE))
                tiles.append((im, ds.label_text(i)))
    finally:
        torch.set_num_threads(threads)
    cols = max(1, min(4, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / cols))
    label_h, gap = 22, 6
    grid = Image.new("RGB", (cols * (TILE + gap) + gap, rows * (TILE + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(14)
    for k, (im, label) in enumerate(tiles):
        r, c = divmod(k, cols)
        x0, y0 = gap + c * (TILE + gap), gap + r * (TILE + label_h + gap)
        grid.paste(im, (x0 + (TILE - im.width) // 2, y0 + (TILE - im.height) // 2))
        draw.text((x0 + 2, y0 + TILE + 3), label, fill=(29, 36, 51), font=font)
    return grid


def write_batch(ds: ImageDataset, size: int, mean: Sequence[float], std: Sequence[float], path: str | Path,
                n: int = N_SHOW, seed: int = 42, flips: str = "horizontal") -> Path:
    """batch.png: the grid, written atomically."""
    path = Path(path)
    img = batch_grid(ds, size, mean, std, n, seed, flips=flips)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def split_counts(ds: ImageDataset) -> dict[str, tuple[int, int]]:
    """Per class: (training images, validation images)."""
    train, valid = ds.class_counts(ds.train_idx), ds.class_counts(ds.valid_idx)
    return {c: (train[c], valid[c]) for c in ds.classes}


def imbalance_warning(counts: dict[str, int], ratio: float = IMBALANCE_RATIO) -> str | None:
    """A sentence when the largest class has `ratio` times the images of the smallest, else None."""
    nonzero = {c: n for c, n in counts.items() if n > 0}
    if len(nonzero) < 2:
        return None
    big = max(nonzero, key=lambda c: nonzero[c])
    small = min(nonzero, key=lambda c: nonzero[c])
    r = nonzero[big] / nonzero[small]
    if r < ratio:
        return None
    return (f"{big} has {nonzero[big]} images and {small} only {nonzero[small]} ({r:.1f}x): the model will lean "
            f"towards {big} and its error on {small} will be higher; add images of {small} if you can (the learning "
            "curve, `ursa curve`, says whether that would help)")


def summary_lines(ds: ImageDataset) -> list[str]:
    """The classes with their counts and the split, as `ursa show` prints them."""
    counts = {printable(c): n for c, n in split_counts(ds).items()}  # a newline or raw byte in a name: escaped
    w = max(5, *(len(c) for c in counts))
    lines = [f"{len(ds)} images, {len(ds.classes)} classes, {len(ds.train_idx)} train / {len(ds.valid_idx)} valid",
             f"{'class':<{w}}  {'train':>6}  {'valid':>6}  {'total':>6}"]
    for c, (t, v) in counts.items():
        lines.append(f"{c:<{w}}  {t:>6}  {v:>6}  {t + v:>6}")
    return lines
