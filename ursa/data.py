"""From files to batches: readers for three layouts, a stable split, transforms and loaders.

Layouts: folder-per-class (the lesson's ``train='.'``), ``train/`` + ``valid/`` folders of class
folders, and a CSV of ``name,label`` relative to the folder (fastai's ``cleaned.csv``).
The validation split hashes each file's relative path with the seed, so an image stays on its
side when other images are added or removed.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ursa.errors import DataError, ImageError
from ursa.images import Source, is_image_file, open_image

log = logging.getLogger("ursa")

VALID_NAMES = ("valid", "val", "validation", "test")
SKIP_DIRS = {"_quarantine", "__pycache__", "models"}
# Images are decoded once, to this multiple of the input size on the short side.
DECODE_SCALE = 1.15
# Decode everything into memory when the estimate is below this many bytes.
MEMORY_BUDGET = 1_500_000_000


def is_valid_split(rel_path: str, valid_pct: float, seed: int) -> bool:
    """Stable split: depends only on this file's path and the seed, never on the other files."""
    h = hashlib.sha256(f"{seed}:{rel_path}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < valid_pct


@dataclass
class ImageDataset:
    """Which files, which labels, which side of the split: the dataset, before any pixels."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]
    is_valid: list[bool]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def rel(self, i: int) -> str:
        """Path of item i relative to the data folder, with forward slashes."""
        try:
            return self.files[i].relative_to(self.root).as_posix()
        except ValueError:
            return self.files[i].as_posix()

    @property
    def train_idx(self) -> list[int]:
        return [i for i, v in enumerate(self.is_valid) if not v]

    @property
    def valid_idx(self) -> list[int]:
        return [i for i, v in enumerate(self.is_valid) if v]

    def class_counts(self, idx: Sequence[int] | None = None) -> dict[str, int]:
        """Images per class, to spot imbalance."""
        idx = range(len(self)) if idx is None else idx
        counts = {c: 0 for c in self.classes}
        for i in idx:
            counts[self.classes[self.labels[i]]] += 1
        return counts

    def drop(self, bad: set[int], reasons: dict[int, str]) -> None:
        """Remove unreadable items, keeping a record of each."""
        if not bad:
            return
        self.skipped += [(self.rel(i), reasons.get(i, "unreadable")) for i in sorted(bad)]
        keep = [i for i in range(len(self)) if i not in bad]
        self.files = [self.files[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.is_valid = [self.is_valid[i] for i in keep]

    def write_split(self, path: Path) -> None:
        """Record the exact train/valid assignment used (name,label,is_valid)."""
        from ursa.util import atomic_write_text

        lines = ["name,label,is_valid"]
        for i in range(len(self)):
            lines.append(_csv_row([self.rel(i), self.classes[self.labels[i]], str(self.is_valid[i])]))
        atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_row(values: list[str]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in SKIP_DIRS
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p) and "_quarantine" not in p.parts)


def _check_classes(classes: list[str], counts: dict[str, int], where: Path) -> None:
    if len(classes) < 2:
        found = f"only one class ({classes[0]!r})" if classes else "no class folders"
        raise DataError(f"{where}: {found}; a classifier needs at least two class folders, one per label")


def from_folder(root: str | Path, valid_pct: float = 0.2, seed: int = 42) -> ImageDataset:
    """One sub-folder per class (or train/ and valid/ folders of class folders)."""
    root = _existing_dir(root)
    _check_pct(valid_pct)
    sub = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    valid_dir = next((sub[n] for n in VALID_NAMES if n in sub), None)
    if "train" in sub and valid_dir is not None:
        return _from_train_valid(root, sub["train"], valid_dir)
    class_dirs = _class_dirs(root)
    if not class_dirs:
        if _images_in(root):
            raise DataError(f"{root}: images but no class folders; put each class's images in its own sub-folder (e.g. {root}/grizzly/)")
        raise DataError(f"{root}: no images found; expected one sub-folder of images per class")
    classes = [d.name for d in class_dirs]
    files, labels = [], []
    for li, d in enumerate(class_dirs):
        imgs = _images_in(d)
        if not imgs:
            raise DataError(f"{d}: class folder {d.name!r} has no images; add some or remove the folder")
        files += imgs
        labels += [li] * len(imgs)
    _check_classes(classes, {}, root)
    ds = ImageDataset(root, files, labels, classes, [False] * len(files))
    ds.is_valid = [is_valid_split(ds.rel(i), valid_pct, seed) for i in range(len(files))]
    _ensure_both_sides(ds, valid_pct)
    return ds


def _from_train_valid(root: Path, train: Path, valid: Path) -> ImageDataset:
    tdirs, vdirs = _class_dirs(train), _class_dirs(valid)
    classes = sorted({d.name for d in tdirs} | {d.name for d in vdirs})
    _check_classes(classes, {}, root)
    files, labels, is_valid = [], [], []
    for side, dirs in ((False, tdirs), (True, vdirs)):
        for d in dirs:
            imgs = _images_in(d)
            if not imgs:
                raise DataError(f"{d}: class folder {d.name!r} has no images; add some or remove the folder")
            files += imgs
            labels += [classes.index(d.name)] * len(imgs)
            is_valid += [side] * len(imgs)
    missing = [c for c in classes if c not in {d.name for d in tdirs}]
    if missing:
        raise DataError(f"{train}: no training images for class(es) {', '.join(missing)}")
    return ImageDataset(root, files, labels, classes, is_valid)


def from_csv(root: str | Path, csv_path: str | Path, valid_pct: float = 0.2, seed: int = 42) -> ImageDataset:
    """A CSV of name,label (optional is_valid) with names relative to root: fastai's cleaned.csv."""
    root = _existing_dir(root)
    _check_pct(valid_pct)
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "name" not in cols or "label" not in cols:
            raise DataError(f"{csv_path}: needs columns 'name' and 'label' (found: {', '.join(cols) or 'none'})")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    rows = [r for r in rows if r.get("name")]
    if not rows:
        raise DataError(f"{csv_path}: no rows; expected one line per image: name,label")
    missing = [r["name"] for r in rows if not (root / r["name"]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DataError(f"{csv_path}: {len(missing)} file(s) named in the CSV are missing under {root}: {shown}")
    no_label = [r["name"] for r in rows if not r.get("label")]
    if no_label:
        raise DataError(f"{csv_path}: {len(no_label)} row(s) have no label, e.g. {no_label[0]}")
    classes = sorted({r["label"] for r in rows})
    _check_classes(classes, {}, csv_path)
    files = [root / r["name"] for r in rows]
    labels = [classes.index(r["label"]) for r in rows]
    ds = ImageDataset(root, files, labels, classes, [False] * len(rows))
    if "is_valid" in cols:
        ds.is_valid = [r.get("is_valid", "").lower() in ("1", "true", "yes") for r in rows]
    else:
        ds.is_valid = [is_valid_split(ds.rel(i), valid_pct, seed) for i in range(len(rows))]
    _ensure_both_sides(ds, valid_pct)
    return ds


def load_dataset(root: str | Path, csv_path: str | Path | None = None, valid_pct: float = 0.2, seed: int = 42) -> ImageDataset:
    """Pick the reader for the layout given."""
    if csv_path is not None:
        return from_csv(root, csv_path, valid_pct, seed)
    return from_folder(root, valid_pct, seed)


def _existing_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: folder not found; give the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the folder that holds one sub-folder per class")
    return root


def _check_pct(valid_pct: float) -> None:
    if not 0.0 < valid_pct < 1.0:
        raise DataError(f"valid_pct must be between 0 and 1 (got {valid_pct})")


def _ensure_both_sides(ds: ImageDataset, valid_pct: float) -> None:
    if not any(ds.is_valid) or all(ds.is_valid):
        side = "validation" if not any(ds.is_valid) else "training"
        raise DataError(
            f"{ds.root}: {len(ds)} images leave the {side} set empty at valid_pct={valid_pct}; add images or change --valid-pct"
        )


# ---------------------------------------------------------------------------------------------
# Pixels: decode once at reduced size, augment, normalise.


def decode_size(size: int) -> int:
    """Short side images are decoded to: a little above the input size, room for crops."""
    return int(round(size * DECODE_SCALE))


def load_pixels(source: Source, short_side: int) -> torch.Tensor:
    """Decode (JPEG draft at reduced size), resize so the short side is short_side, as uint8 CHW.

    Training, evaluation and prediction all decode through here, so they see identical pixels.
    """
    im = open_image(source, min_size=short_side)
    return pil_to_tensor(resize_short(im, short_side))


def resize_short(im: Image.Image, short_side: int) -> Image.Image:
    """Resize keeping the aspect ratio so the short side is short_side (only ever shrinking a lot is cheap)."""
    w, h = im.size
    s = short_side / min(w, h)
    if abs(s - 1) < 1e-3:
        return im
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None if s > 0.5 else 2.0)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """uint8 CHW tensor sharing nothing with PIL."""
    a = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """fastai's get_transforms in spirit: random resized crop, flip, small rotation and warp, lighting."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomAffine(degrees=10, scale=(1.0, 1.1))], p=0.75),
        v2.RandomPerspective(distortion_scale=0.2, p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.75),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Deterministic: short side to size, centre crop, normalise. Predict uses this too."""
    return v2.Compose([
        v2.Resize(size, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


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
            except ImageError:
                # Found bad after the scan (changed on disk): a grey image keeps the batch shape.
                x = torch.full((3, self.short_side, self.short_side), 128, dtype=torch.uint8)
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

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def short_side(self) -> int:
        return decode_size(self.size)

    def loader(self, idx: Sequence[int], train: bool, size: int | None = None, bs: int | None = None,
               shuffle: bool | None = None, generator: torch.Generator | None = None,
               drop_last: bool | None = None) -> DataLoader:
        """A DataLoader over items idx, augmented when train, at size (default: self.size)."""
        size = size or self.size
        tfm = train_transform(size, self.mean, self.std) if train else eval_transform(size, self.mean, self.std)
        ps = PixelSet(self.dataset, idx, tfm, self.short_side, self.pixels)
        shuffle = train if shuffle is None else shuffle
        bs = bs or self.bs
        # Training drops a last small batch (BatchNorm dislikes tiny batches); evaluation never does.
        drop_last = (shuffle and len(ps) > bs) if drop_last is None else drop_last
        nw = self.num_workers
        return DataLoader(
            ps, batch_size=bs, shuffle=shuffle, drop_last=drop_last,
            num_workers=nw, collate_fn=collate, persistent_workers=False, generator=generator,
            worker_init_fn=_worker_init if nw else None,
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
) -> DataLoaders:
    """Decode once into memory when it fits (skipping and naming unreadable files), then build loaders.

    When the set is too big for memory, images are decoded per batch in worker processes.
    """
    short = decode_size(size)
    if cache is None:
        cache = estimate_bytes(len(ds), short) <= MEMORY_BUDGET
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
    _ensure_both_sides(ds, 0.2)
    if num_workers is None:
        num_workers = 0 if pixels is not None else min(4, os.cpu_count() or 1)
    return DataLoaders(ds, size, tuple(mean), tuple(std), bs, pixels, num_workers, seed)


def iter_batches(items: Sequence, bs: int) -> Iterator[Sequence]:
    """Consecutive slices of at most bs items."""
    for i in range(0, len(items), bs):
        yield items[i:i + bs]
