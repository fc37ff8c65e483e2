"""Label sets (multi-label): the planet CSV read into a dataset, and one item's set of labels as one integer.

fastai's planet format: ``name,label`` where the label cell holds several labels separated by a
space (``--label-delim`` for another separator); an empty cell is an image with none of the labels.
An item's set travels through the loaders, the feature cache and torchrun's gathers as one int64,
bit k set when label k is present (``encode``; 0 is the empty set), so everything that moves labels
moves sets unchanged, and a negative value still marks an item that could not be read
(``loaders.failed_label``). ``multi_hot`` turns a batch of them into the targets of the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ursa.errors import DataError
from ursa.util.names import printable, same_when_normalised
from ursa.vision.data import ImageDataset, dedupe_split, load_dataset, read_csv_rows, split_csv_rows

MAX_LABELS = 62  # bits of a non-negative int64


def encode(indices: Sequence[int]) -> int:
    """A set of label indices as one non-negative integer (bit k: label k)."""
    mask = 0
    for k in indices:
        mask |= 1 << int(k)
    return mask


def decode(mask: int) -> list[int]:
    """The label indices of ``encode``'s integer, in index order."""
    return [k for k in range(MAX_LABELS) if mask >> k & 1]


def multi_hot(y: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Encoded sets [N] -> float targets [N, n_labels]; an unreadable item's (negative) row is all zeros."""
    bits = torch.arange(n_labels, device=y.device)
    return ((y.clamp_min(0).unsqueeze(1) >> bits) & 1).float()


def split_labels(cell: str, delim: str) -> list[str]:
    """One CSV cell's labels: split on the separator, blanks dropped, each once, in the order given."""
    parts = cell.split(delim) if delim != " " else cell.split()
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def from_multilabel_csv(root: str | Path, csv_path: str | Path, valid_pct: float, seed: int,
                        delim: str = " ") -> ImageDataset:
    """A CSV of name,labels (several per cell, ``delim`` between them; optional is_valid): a multi-label dataset."""
    if not delim:
        raise DataError("--label-delim: expected one or more characters, got an empty string")
    root, csv_path, rows, cols = read_csv_rows(root, csv_path, valid_pct)
    sets = [split_labels(r.get("label", ""), delim) for r in rows]
    classes = sorted({c for s in sets for c in s})
    if not classes:
        raise DataError(f"{csv_path}: no labels in any row; the label column holds each image's labels separated by "
                        f"{'a space' if delim == ' ' else repr(delim)}")
    if len(classes) > MAX_LABELS:
        raise DataError(f"{csv_path}: {len(classes)} different labels, ursa's multi-label models take at most "
                        f"{MAX_LABELS}; check --label-delim (got {delim!r})")
    same = same_when_normalised(classes)
    if same:
        raise DataError(f"{printable(str(csv_path))}: labels '{printable(same[0])}' and '{printable(same[1])}' are one "
                        "name in two Unicode forms (NFC and NFD); use one spelling")
    index = {c: i for i, c in enumerate(classes)}
    ds = ImageDataset(root, [root / r["name"] for r in rows], [encode(index[c] for c in s) for s in sets], classes,
                      [False] * len(rows), multi_label=True, label_delim=delim)
    return split_csv_rows(ds, rows, cols, valid_pct, seed)


def load_labelled(root: str | Path, csv_path: str | Path | None, valid_pct: float, seed: int, dedupe: bool = False,
                  label_delim: str | None = None) -> ImageDataset:
    """``data.load_dataset``, or with ``label_delim`` (--multi-label) a CSV of label sets with that separator."""
    if label_delim is None:
        return load_dataset(root, csv_path, valid_pct, seed, dedupe)
    if csv_path is None:
        raise DataError(f"{root}: --multi-label reads a CSV of name,labels; give --csv labels.csv "
                        "(a folder per class gives each image one label)")
    ds = from_multilabel_csv(root, csv_path, valid_pct, seed, label_delim)
    if dedupe:
        dedupe_split(ds, valid_pct, seed)
    return ds
