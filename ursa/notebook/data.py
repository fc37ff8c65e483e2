"""``ursa.ImageDataLoaders``: fastai's name for "this folder (or CSV) of labelled images, split for validation".

It holds the dataset as ``ursa.vision.data`` reads it (the same readers, the same stable hash
split as ``ursa train``) and the settings a learner is built with; the pixels are decoded once,
when ``vision_learner`` builds the learner (at the size the recipe picks for the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from ursa.notebook.pictures import Picture, show
from ursa.training.plan import choose_flips, choose_size
from ursa.vision import DEFAULT_ARCH
from ursa.vision.data import SEED, VALID_PCT, ImageDataset, load_dataset
from ursa.vision.models import get_spec
from ursa.vision.probe import probe_images
from ursa.vision.show import batch_grid


@dataclass
class ImageDataLoaders:
    """A labelled image folder (or CSV), its validation split and batch size."""

    path: Path
    dataset: ImageDataset
    csv: Path | None = None
    valid_pct: float = VALID_PCT
    seed: int = SEED
    bs: int = 32

    @classmethod
    def from_folder(cls, path: str | Path, valid_pct: float = VALID_PCT, seed: int = SEED,
                    bs: int = 32) -> "ImageDataLoaders":
        """One sub-folder per class (or train/ and valid/ folders of class folders), as ``ursa train DATA``."""
        return cls(Path(path), load_dataset(path, None, valid_pct, seed), None, valid_pct, seed, bs)

    @classmethod
    def from_csv(cls, path: str | Path, csv_fname: str | Path = "cleaned.csv", valid_pct: float = VALID_PCT,
                 seed: int = SEED, bs: int = 32) -> "ImageDataLoaders":
        """``name,label[,is_valid]`` rows, names relative to ``path`` (``ursa clean``'s cleaned.csv), as ``--csv``."""
        csv = Path(csv_fname)
        csv = csv if csv.is_absolute() or csv.exists() else Path(path) / csv
        return cls(Path(path), load_dataset(path, csv, valid_pct, seed), csv, valid_pct, seed, bs)

    @property
    def classes(self) -> list[str]:
        """The class names, in label order."""
        return list(self.dataset.classes)

    @property
    def counts(self) -> dict[str, tuple[int, int]]:
        """class -> (training images, validation images)."""
        ds = self.dataset
        train, valid = ds.class_counts(ds.train_idx), ds.class_counts(ds.valid_idx)
        return {c: (train.get(c, 0), valid.get(c, 0)) for c in ds.classes}

    def choose(self, arch: str = DEFAULT_ARCH, size: int | None = None, flips: str = "auto") -> tuple[int, str]:
        """The input size and flips the recipe picks for this data and network (``training.plan``)."""
        ds = self.dataset
        probe = probe_images([ds.files[i] for i in ds.train_idx], self.seed)
        return choose_size(probe, get_spec(arch).input_size, size)[0], choose_flips(probe, flips)[0]

    def batch_picture(self, n: int = 16, arch: str = DEFAULT_ARCH) -> Picture:
        """The grid of augmented training images, labelled: the picture ``ursa train`` writes as batch.png."""
        size, flips = self.choose(arch)
        spec = get_spec(arch)
        return Picture.from_image(batch_grid(self.dataset, size, spec.mean, spec.std, n, self.seed, flips=flips),
                                  "show_batch")

    def show_batch(self, n: int = 16, arch: str = DEFAULT_ARCH) -> Any:
        """Show n training images as the model sees them (augmented), inline in a notebook."""
        return show(self.batch_picture(n, arch))

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{escape(c)}</td><td>{t}</td><td>{v}</td></tr>" for c, (t, v) in self.counts.items())
        ds = self.dataset
        return (f"<div><b>{escape(str(self.path))}</b>: {len(ds)} images, {len(ds.classes)} classes, "
                f"{len(ds.train_idx)} train / {len(ds.valid_idx)} valid"
                f"<table><tr><th>class</th><th>train</th><th>valid</th></tr>{rows}</table></div>")

    def __repr__(self) -> str:
        ds = self.dataset
        return (f"ImageDataLoaders({str(self.path)!r}: {len(ds)} images, classes {self.classes}, "
                f"{len(ds.train_idx)} train / {len(ds.valid_idx)} valid)")
