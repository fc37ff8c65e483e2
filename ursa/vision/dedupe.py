"""Exact and near-duplicate images without a model: content hashes, perceptual hashes, groups, a split that keeps groups together.

A near-duplicate (the same photo resized, re-encoded, lightly cropped or watermarked) that lands
on both sides of the validation split lets the model "recognise" a validation image it has
already trained on, so the score is better than it will be on new pictures. Cheap hashes find
them: sha256 of the bytes (exact copies), and two 64-bit perceptual hashes of a small grayscale
thumbnail compared by Hamming distance, a DCT hash (pHash: overall layout) and a difference hash
(dHash: edges); a pair is near when both are close. They need no network and no model, so the
split rule (``data.py``), ``ursa verify`` and ``ursa train``'s leakage audit can all use them.

``group_split`` keeps each near-duplicate group on one side of the split by a stable rule: the
whole group goes where the split rule puts its lexicographically smallest member, so adding or
removing other images never moves a group, and an image without twins keeps its own place.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ursa.errors import ImageError
from ursa.vision.images import Source, open_image
from ursa.util.names import printable

# Hamming distances (of 64 bits) at or below which two images are near-duplicates: both hashes
# must agree. Looked at by eye on the bears set (467k pairs, docs/insight.md): every pair with
# pHash <= 10 and dHash <= 12 is the same photo re-encoded, resized, watermarked or lightly
# cropped (30 pairs, one of them the same toy photographed twice); pHash 10-14 adds 3 more true
# copies but also many different teddies on white backgrounds, whose silhouettes hash alike.
NEAR_DISTANCE = 10
DHASH_DISTANCE = 12
HASH_SIDE = 32  # the thumbnail the DCT runs on
_LOW = 8  # the 8x8 lowest frequencies make the 64 bits


@dataclass(frozen=True)
class ImageHash:
    """sha256 of the file's bytes and the two 64-bit perceptual hashes of its pixels."""

    sha256: str
    phash: int
    dhash: int


@dataclass(frozen=True)
class Pair:
    """Two items (indices) that are exact copies (same bytes) or near-duplicates; distance: of the pHashes."""

    i: int
    j: int
    distance: int
    exact: bool


@dataclass
class DuplicateGroup:
    """Items that are copies of each other (directly or through a chain of near-duplicates)."""

    members: list[int]
    exact: bool  # every member has the same bytes
    pairs: list[Pair] = field(default_factory=list)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(HASH_SIDE)


def phash_of(im: Image.Image) -> int:
    """64-bit perceptual hash: DCT of a 32x32 grayscale thumbnail, low 8x8 frequencies above their median."""
    g = np.asarray(im.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0),
                   dtype=np.float64)
    low = (_DCT @ g @ _DCT.T)[:_LOW, :_LOW].ravel()
    bits = low[1:] > np.median(low[1:])  # the DC term says only how bright the image is
    bits = np.concatenate([[low[0] > 0], bits])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def dhash_of(im: Image.Image) -> int:
    """64-bit difference hash: is each pixel of a 9x8 grayscale thumbnail brighter than its left neighbour."""
    g = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.int16)
    return int.from_bytes(np.packbits((g[:, 1:] > g[:, :-1]).ravel()).tobytes(), "big")


def image_hash(source: Source) -> ImageHash:
    """The hashes of one image file (or its bytes); raises ImageError when it cannot be decoded."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)  # type: ignore[arg-type]
    im = open_image(data, min_size=HASH_SIDE * 2)
    return ImageHash(hashlib.sha256(data).hexdigest(), phash_of(im), dhash_of(im))


def hash_images(paths: Sequence[Path], workers: int | None = None,
                progress: Callable[[int], None] | None = None) -> list[ImageHash | None]:
    """Hashes of many files in threads (Pillow releases the GIL); None for a file that cannot be read."""
    workers = workers or min(4, (os.cpu_count() or 1) + 1)

    def one(p: Path) -> ImageHash | None:
        try:
            return image_hash(p)
        except (ImageError, OSError):
            return None

    out: list[ImageHash | None] = []
    with ThreadPoolExecutor(workers) as pool:
        for h in pool.map(one, paths):
            out.append(h)
            if progress:
                progress(1)
    return out


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    b = x.view(np.uint8).reshape(*x.shape, 8)  # pragma: no cover - older numpy
    return np.unpackbits(b, axis=-1).sum(-1).astype(np.int64)


def near_pairs(hashes: Sequence[ImageHash | None], max_distance: int = NEAR_DISTANCE,
               allowed: Callable[[int, int], bool] | None = None, max_dhash: int = DHASH_DISTANCE) -> list[Pair]:
    """Every pair of items that are exact copies, or whose pHashes differ in at most max_distance bits and dHashes in at most max_dhash.

    ``allowed(i, j)``: only pairs it accepts (e.g. one in train and one in valid). Items that are
    None (unreadable) pair with nothing. Quadratic in the number of images, in blocks: about a
    second for 10,000 images.
    """
    idx = [k for k, h in enumerate(hashes) if h is not None]
    if len(idx) < 2:
        return []
    ph = np.array([hashes[k].phash for k in idx], dtype=np.uint64)  # type: ignore[union-attr]
    dh = np.array([hashes[k].dhash for k in idx], dtype=np.uint64)  # type: ignore[union-attr]
    sha = [hashes[k].sha256 for k in idx]  # type: ignore[union-attr]
    out: list[Pair] = []
    block = 1024
    for a in range(0, len(idx), block):
        d = _popcount(ph[a:a + block, None] ^ ph[None, :])
        near = (d <= max_distance) & (_popcount(dh[a:a + block, None] ^ dh[None, :]) <= max_dhash)
        rows, cols = np.nonzero(near)
        for r, c in zip(rows.tolist(), cols.tolist()):
            ia = a + r
            if c <= ia:
                continue
            i, j = idx[ia], idx[c]
            if allowed is None or allowed(i, j):
                out.append(Pair(i, j, int(d[r, c]), sha[ia] == sha[c]))
    return sorted(out, key=lambda p: (p.i, p.j))


def groups_of(n: int, pairs: Sequence[Pair]) -> list[DuplicateGroup]:
    """Connected groups (of two or more items) that the pairs link, each sorted, ordered by first member."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.i), find(p.j)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for k in range(n):
        members.setdefault(find(k), []).append(k)
    by_root: dict[int, list[Pair]] = {}
    for p in pairs:
        by_root.setdefault(find(p.i), []).append(p)
    out = []
    for root, ms in members.items():
        if len(ms) > 1:
            ps = by_root.get(root, [])
            exact = len(ps) >= len(ms) - 1 and all(p.exact for p in ps)
            out.append(DuplicateGroup(sorted(ms), exact, ps))
    return sorted(out, key=lambda g: g.members[0])


def group_split(names: Sequence[str], groups: Sequence[DuplicateGroup] | Sequence[Sequence[int]],
                is_valid: Callable[[str], bool]) -> list[bool]:
    """The split with every group on one side: where the rule puts the group's lexicographically smallest name.

    ``names``: each item's stable name (its path relative to the data folder); ``is_valid``: the
    split rule for one name (e.g. ``lambda n: data.is_valid_split(n, valid_pct, seed)``). Items in
    no group keep the rule's answer, so the result changes only for items that have a twin.
    """
    out = [bool(is_valid(n)) for n in names]
    for g in groups:
        ms = list(g.members) if isinstance(g, DuplicateGroup) else list(g)
        side = out[min(ms, key=lambda k: names[k])]
        for k in ms:
            out[k] = side
    return out


def cross_split(pairs: Sequence[Pair], is_valid: Sequence[bool]) -> list[Pair]:
    """The pairs that straddle the split, ordered (train item, valid item): what leaks into validation."""
    out = []
    for p in pairs:
        if is_valid[p.i] != is_valid[p.j]:
            i, j = (p.i, p.j) if not is_valid[p.i] else (p.j, p.i)
            out.append(Pair(i, j, p.distance, p.exact))
    return sorted(out, key=lambda p: (p.distance, p.i, p.j))


@dataclass
class DuplicateReport:
    """Exact and near-duplicate groups of a folder, per class, and groups that span classes (a label conflict)."""

    names: list[str]
    labels: list[str]
    groups: list[DuplicateGroup]
    unreadable: list[str]

    def per_class(self) -> dict[str, list[DuplicateGroup]]:
        """Groups whose members all carry one label, by that label."""
        out: dict[str, list[DuplicateGroup]] = {}
        for g in self.groups:
            labels = {self.labels[k] for k in g.members}
            if len(labels) == 1:
                out.setdefault(labels.pop(), []).append(g)
        return out

    def across_classes(self) -> list[DuplicateGroup]:
        """Groups with members under two or more labels: the same picture labelled differently."""
        return [g for g in self.groups if len({self.labels[k] for k in g.members}) > 1]

    def lines(self) -> list[str]:
        """Human-readable lines, one per group: 'exact' or 'near', the class, the files."""
        out = []
        for c, gs in sorted(self.per_class().items()):
            for g in gs:
                kind = "exact" if g.exact else "near"
                out.append(f"{c}: {kind} duplicates: " + ", ".join(self.names[k] for k in g.members))
        for g in self.across_classes():
            kind = "exact" if g.exact else "near"
            out.append(f"across classes ({', '.join(sorted({self.labels[k] for k in g.members}))}): {kind} duplicates: "
                       + ", ".join(self.names[k] for k in g.members))
        return [printable(line) for line in out]  # one line each, whatever the names hold

    def to_dict(self) -> dict:
        """For --json and CSVs: each group's kind, labels and files."""
        return {"groups": [{"exact": g.exact, "labels": sorted({self.labels[k] for k in g.members}),
                            "files": [self.names[k] for k in g.members],
                            "distances": [p.distance for p in g.pairs]} for g in self.groups],
                "unreadable": list(self.unreadable), "max_distance": NEAR_DISTANCE, "max_dhash": DHASH_DISTANCE}


def find_duplicates(paths: Sequence[Path], names: Sequence[str], labels: Sequence[str],
                    max_distance: int = NEAR_DISTANCE, workers: int | None = None,
                    progress: Callable[[int], None] | None = None) -> DuplicateReport:
    """Exact and near-duplicates among the files (what ``ursa verify`` lists): groups per class and across classes."""
    hashes = hash_images(paths, workers, progress)
    pairs = near_pairs(hashes, max_distance)
    return DuplicateReport(list(names), list(labels), groups_of(len(paths), pairs),
                           [names[k] for k, h in enumerate(hashes) if h is None])


def stable_group_split(files: Sequence[Path], names: Sequence[str],
                       is_valid: Callable[[str], bool]) -> tuple[list[bool], list[DuplicateGroup]]:
    """The split rule with near-duplicate groups kept together: hash the files, group them, apply ``group_split``.

    What ``data.load_dataset(..., dedupe=True)`` calls; unreadable files pair with nothing and
    keep the rule's answer.
    """
    groups = groups_of(len(files), near_pairs(hash_images(files)))
    return group_split(names, groups, is_valid), groups
