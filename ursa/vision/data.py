"""From files to a dataset: readers for three layouts and a stable split (no pixels yet).

Layouts: folder-per-class (the lesson's ``train='.'``), ``train/`` + ``valid/`` folders of class
folders, and a CSV of ``name,label`` relative to the folder (fastai's ``cleaned.csv``).
The validation split hashes each file's relative path with the seed, so an image stays on its
side when other images are added or removed.

Links: a class folder may be a symlink to a folder elsewhere (users keep images on another disk),
but two class folders that are one folder on disk (``teddy_link -> teddy``) are refused, since the
same images would train as two classes; a file reached twice through links is counted once (with
a warning), or refused when the two paths give it different labels.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ursa.errors import DataError
from ursa.util.files import NAME_ERRORS, csv_cell_value
from ursa.util.names import printable, same_when_normalised
from ursa.vision.images import is_image_file

log = logging.getLogger("ursa")

VALID_PCT = 0.2  # share of images held out for validation, unless told otherwise
SEED = 42  # seed of the split, unless told otherwise
VALID_NAMES = ("valid", "val", "validation", "test")
SKIP_DIRS = {"_quarantine", "__pycache__", "models"}


def dedupe_setting(config: dict | None) -> bool:
    """Whether a run's config asked for --dedupe-split (so later stages see the same split)."""
    return bool((config or {}).get("dedupe_split", False))


def split_settings(config: dict | None) -> tuple[float, int]:
    """(valid_pct, split seed) of a run's config: its split_seed, else its seed; the defaults for a model without one."""
    config = config or {}
    seed = config.get("split_seed")
    if seed is None:
        seed = config.get("seed", SEED)
    pct = config.get("valid_pct", VALID_PCT)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise DataError(f"the run's split seed: expected a whole number from 0 to {2**32 - 1}, got {reprlib.repr(seed)}; "
                        "give --split-seed or train again")
    if not (isinstance(pct, (int, float)) and not isinstance(pct, bool) and 0 < pct < 1):
        raise DataError(f"the run's valid_pct: expected a number between 0 and 1, got {reprlib.repr(pct)}; train again")
    return float(pct), seed


def is_valid_split(rel_path: str, valid_pct: float, seed: int) -> bool:
    """Stable split: depends only on this file's path and the seed, never on the other files."""
    # os.fsencode: the name's bytes on disk (the same as UTF-8 for every valid name, so splits stay as they were;
    # a name that is not UTF-8 arrives surrogate-escaped and hashes by its raw bytes instead of crashing)
    h = hashlib.sha256(f"{seed}:".encode() + os.fsencode(rel_path)).digest()
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
    multi_label: bool = False  # labels are label sets, each one int (``vision.labelsets.encode``)
    label_delim: str = " "  # between a multi-label item's labels in a CSV cell (and in split.csv)

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

    def label_indices(self, i: int) -> list[int]:
        """The class indices item i carries: its one class, or (multi-label) each label of its set."""
        if not self.multi_label:
            return [self.labels[i]]
        return [k for k in range(len(self.classes)) if self.labels[i] >> k & 1]

    def label_text(self, i: int) -> str:
        """Item i's label as written: its class, or (multi-label) its labels joined by the separator ("" for none)."""
        return self.label_delim.join(self.classes[k] for k in self.label_indices(i))

    def class_counts(self, idx: Sequence[int] | None = None) -> dict[str, int]:
        """Images per class (multi-label: images carrying each label), to spot imbalance."""
        idx = range(len(self)) if idx is None else idx
        counts = {c: 0 for c in self.classes}
        for i in idx:
            for k in self.label_indices(i):
                counts[self.classes[k]] += 1
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
        from ursa.util.files import atomic_write_text, csv_line

        lines = ["name,label,is_valid"]
        for i in range(len(self)):
            lines.append(csv_line([self.rel(i), self.label_text(i), str(self.is_valid[i])], end=""))
        atomic_write_text(path, "\n".join(lines) + "\n")


def read_split(path: Path) -> list[tuple[str, str, bool]]:
    """split.csv back as (name, label, is_valid): the one reader of what ``ImageDataset.write_split`` wrote."""
    with open(path, newline="", encoding="utf-8", errors=NAME_ERRORS) as f:  # names as their bytes on disk
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"name", "label", "is_valid"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected columns name,label,is_valid")
        return [(csv_cell_value(r["name"]), csv_cell_value(r["label"]),
                 (r["is_valid"] or "").strip().lower() in ("true", "1", "yes")) for r in reader]


def _skipped_why(name: str) -> str | None:
    """Why a sub-folder is not a class: ursa's own folders, hidden ones, and names starting with _ (or None)."""
    if name == "_quarantine":
        return "ursa's quarantine"
    if name in SKIP_DIRS:
        return "ursa's"
    if name.startswith("."):
        return "hidden"
    if name.startswith("_"):
        return "starts with _"
    return None


def _class_dirs(folder: Path) -> list[Path]:
    """The class folders in `folder`, sorted; the sub-folders skipped are said once (a class named `.x` or `_x` is not one)."""
    dirs, skipped = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            continue
        why = _skipped_why(p.name)
        if why is None:
            dirs.append(p)
        elif why != "hidden" or p.name not in (".git", ".ipynb_checkpoints", ".DS_Store"):
            skipped.append(f"{printable(p.name)} ({why})")
    if skipped and dirs:
        log.warning("%s: not class folders, skipped: %s; rename a folder (without a leading . or _) to train on it",
                    printable(str(folder)), ", ".join(skipped))
    return dirs


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p) and "_quarantine" not in p.parts)


def check_distinct_folders(dirs: Sequence[Path], root: Path) -> None:
    """Refuse class folders that are one folder on disk (or one inside another) through a link: the same images as two classes."""
    real = [(d, d.resolve()) for d in dirs]
    for i, (a, ra) in enumerate(real):
        for b, rb in real[i + 1:]:
            if ra == rb:
                link = b if b.is_symlink() else a
                raise DataError(
                    f"{root}: class folders {_shown(a, root)!r} and {_shown(b, root)!r} are the same folder "
                    f"({_shown(link, root)} is a link to {os.readlink(link) if link.is_symlink() else ra}), so the "
                    f"same images would train as two classes; remove the link, or make {link.name!r} a folder of its own images"
                )
            for outer, inner, r_in, r_out in ((a, b, rb, ra), (b, a, ra, rb)):
                if r_out in r_in.parents:
                    raise DataError(
                        f"{root}: class folder {_shown(inner, root)!r} is inside class folder {_shown(outer, root)!r} "
                        f"(through a link, {r_in}), so its images would have two labels; remove the link"
                    )


def drop_repeated_files(ds: ImageDataset) -> ImageDataset:
    """Count a file reached twice (through a symlinked file or folder) once, with a warning; refuse it with two labels."""
    first: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []
    for i, f in enumerate(ds.files):
        j = first.setdefault(os.path.realpath(f), i)
        if j == i:
            continue
        if ds.labels[j] != ds.labels[i]:
            raise DataError(
                f"{ds.root}: {ds.rel(j)} and {ds.rel(i)} are the same file (through a link) with two labels, "
                f"{ds.label_text(j)!r} and {ds.label_text(i)!r}; remove it from the class it does not belong to"
            )
        repeats.append((i, j))
    if not repeats:
        return ds
    i, j = repeats[0]
    log.warning("%s: %d image(s) reached twice through links are counted once (e.g. %s is %s); remove the links to silence this",
                ds.root, len(repeats), ds.rel(i), ds.rel(j))
    dropped = {r for r, _ in repeats}
    keep = [i for i in range(len(ds)) if i not in dropped]
    ds.files = [ds.files[i] for i in keep]
    ds.labels = [ds.labels[i] for i in keep]
    ds.is_valid = [ds.is_valid[i] for i in keep]
    return ds


def _shown(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _check_classes(classes: list[str], counts: dict[str, int], where: Path) -> None:
    same = same_when_normalised(classes)
    if same:
        raise DataError(f"{printable(str(where))}: classes '{printable(same[0])}' and '{printable(same[1])}' are one name "
                        "in two Unicode forms (NFC and NFD): they would train as two classes that print alike; "
                        "merge them into one (one folder, or one spelling in the CSV)")
    if len(classes) < 2:
        found = f"only one class ({classes[0]!r})" if classes else "no class folders"
        raise DataError(f"{where}: {found}; a classifier needs at least two class folders, one per label")


def from_folder(root: str | Path, valid_pct: float = VALID_PCT, seed: int = SEED) -> ImageDataset:
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
    check_distinct_folders(class_dirs, root)
    classes = [d.name for d in class_dirs]
    files, labels = [], []
    for li, d in enumerate(class_dirs):
        imgs = _images_in(d)
        if not imgs:
            raise DataError(f"{d}: class folder {d.name!r} has no images; add some or remove the folder")
        files += imgs
        labels += [li] * len(imgs)
    _check_classes(classes, {}, root)
    ds = drop_repeated_files(ImageDataset(root, files, labels, classes, [False] * len(files)))
    ds.is_valid = [is_valid_split(ds.rel(i), valid_pct, seed) for i in range(len(ds))]
    ensure_both_sides(ds, valid_pct)
    return ds


def _from_train_valid(root: Path, train: Path, valid: Path) -> ImageDataset:
    tdirs, vdirs = _class_dirs(train), _class_dirs(valid)
    check_distinct_folders(tdirs + vdirs, root)
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
    return drop_repeated_files(ImageDataset(root, files, labels, classes, is_valid))


def read_csv_rows(root: str | Path, csv_path: str | Path,
                  valid_pct: float) -> tuple[Path, Path, list[dict[str, str]], list[str]]:
    """The rows of a name,label CSV (names relative to root), every named file checked present: (root, csv, rows, columns)."""
    root = _existing_dir(root)
    _check_pct(valid_pct)
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: CSV file not found")
    with open(csv_path, newline="", encoding="utf-8-sig", errors=NAME_ERRORS) as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "name" not in cols or "label" not in cols:
            raise DataError(f"{csv_path}: needs columns 'name' and 'label' (found: {', '.join(cols) or 'none'})")
        # csv_cell_value: ursa writes a name such as "=x" as "'=x" (spreadsheet safety); take that back off
        rows = [{k.strip().lower(): csv_cell_value((v or "").strip()) for k, v in r.items() if k} for r in reader]
    rows = [r for r in rows if r.get("name")]
    if not rows:
        raise DataError(f"{csv_path}: no rows; expected one line per image: name,label")
    missing = [r["name"] for r in rows if not (root / r["name"]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DataError(f"{csv_path}: {len(missing)} file(s) named in the CSV are missing under {root}: {shown}")
    return root, csv_path, rows, cols


def from_csv(root: str | Path, csv_path: str | Path, valid_pct: float = VALID_PCT, seed: int = SEED) -> ImageDataset:
    """A CSV of name,label (optional is_valid) with names relative to root: fastai's cleaned.csv."""
    root, csv_path, rows, cols = read_csv_rows(root, csv_path, valid_pct)
    no_label = [r["name"] for r in rows if not r.get("label")]
    if no_label:
        raise DataError(f"{csv_path}: {len(no_label)} row(s) have no label, e.g. {no_label[0]}")
    classes = sorted({r["label"] for r in rows})
    _check_classes(classes, {}, csv_path)
    files = [root / r["name"] for r in rows]
    labels = [classes.index(r["label"]) for r in rows]
    return split_csv_rows(ImageDataset(root, files, labels, classes, [False] * len(rows)), rows, cols, valid_pct, seed)


def split_csv_rows(ds: ImageDataset, rows: list[dict[str, str]], cols: list[str], valid_pct: float,
                   seed: int) -> ImageDataset:
    """A CSV's dataset split: its is_valid column when it has one, else the stable split; files reached twice once."""
    if "is_valid" in cols:
        ds.is_valid = [r.get("is_valid", "").lower() in ("1", "true", "yes") for r in rows]
    else:
        ds.is_valid = [is_valid_split(ds.rel(i), valid_pct, seed) for i in range(len(rows))]
    ds = drop_repeated_files(ds)
    ensure_both_sides(ds, valid_pct)
    return ds


def load_dataset(root: str | Path, csv_path: str | Path | None = None, valid_pct: float = VALID_PCT, seed: int = SEED,
                 dedupe: bool = False) -> ImageDataset:
    """Pick the reader for the layout given; ``dedupe`` keeps near-duplicate groups on one side (--dedupe-split).

    Label sets (--multi-label) are read by ``vision.labelsets.load_labelled``.
    """
    ds = from_csv(root, csv_path, valid_pct, seed) if csv_path is not None else from_folder(root, valid_pct, seed)
    if dedupe:
        dedupe_split(ds, valid_pct, seed)
    return ds


def dedupe_split(ds: ImageDataset, valid_pct: float, seed: int) -> tuple[int, int] | None:
    """Keep each near-duplicate group where the split rule puts its smallest name: (groups, items moved).

    None, and the split left alone, when the folder layout or a CSV's is_valid column set it: that
    split is the user's. Stable like the rule itself: a group's side depends only on its members.
    """
    from ursa.vision.dedupe import stable_group_split

    names = [ds.rel(i) for i in range(len(ds))]
    if [is_valid_split(n, valid_pct, seed) for n in names] != list(ds.is_valid):
        return None
    new, groups = stable_group_split(ds.files, names, lambda n: is_valid_split(n, valid_pct, seed))
    moved = sum(a != b for a, b in zip(new, ds.is_valid))
    ds.is_valid = new
    ensure_both_sides(ds, valid_pct)
    return len(groups), moved


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


def ensure_both_sides(ds: ImageDataset, valid_pct: float) -> None:
    if not any(ds.is_valid) or all(ds.is_valid):
        side = "validation" if not any(ds.is_valid) else "training"
        raise DataError(
            f"{ds.root}: {len(ds)} images leave the {side} set empty at valid_pct={valid_pct}; add images or change --valid-pct"
        )


# ---------------------------------------------------------------------------------------------
