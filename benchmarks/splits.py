"""benchmarks/recipes.py's data: where each set is, and its one 80/20 split, made once and only read after (stdlib only)."""

from __future__ import annotations

import csv
import io
import os
import random
import tempfile
from pathlib import Path

SETS = ("bears", "eurosat_dev", "mnist_dev", "cub_grebes")  # ../shared/datasets
SPLIT_SEED, VALID_PCT = 42, 0.2
IMG_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}  # the anchor's list


class InputError(Exception):
    """Bad input or usage: one line on stderr, exit 2."""


def write_atomic(path: Path, text: str) -> None:
    """Write text so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def csv_text(header: list[str], rows: list[tuple]) -> str:
    """CSV of the rows as they are (a bool as True/False: what pandas writes and both readers take)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *(tuple(map(str, r)) for r in rows)])
    return buf.getvalue()


def make_split(set_dir: Path) -> list[tuple[str, str, bool]]:
    """The one split of a set: sorted image files (relative path, class folder), 20% valid by random.Random(42)."""
    rows = []
    for c in sorted(d.name for d in set_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
        for f in sorted((set_dir / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMG_EXTS and not f.name.startswith("."):
                rows.append((f.relative_to(set_dir).as_posix(), c))
    rows.sort()
    if not rows:
        raise InputError(f"{set_dir}: no images in class folders; expected {set_dir}/<class>/<image>")
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    valid = set(order[: int(round(VALID_PCT * len(rows)))])
    return [(p, c, i in valid) for i, (p, c) in enumerate(rows)]


def read_split(path: Path, cols: tuple[str, str, str]) -> list[tuple[str, str, bool]]:
    """A split file back as (path, label, is_valid) rows."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not set(cols) <= set(reader.fieldnames):
            raise InputError(f"{path}: expected columns {','.join(cols)}; delete it to make it again")
        return [(r[cols[0]], r[cols[1]], r[cols[2]].strip().lower() in ("true", "1", "yes")) for r in reader]


def split_paths(results: Path, name: str) -> tuple[Path, Path]:
    """(anchor's path,label,is_valid file, ursa's name,label,is_valid file) of a set."""
    return results / "splits" / f"{name}.csv", results / "splits" / f"{name}.ursa.csv"


def train_split_path(results: Path, name: str) -> Path:
    """The name,label file of the 80% ursa trains on (the 20% test images are not in it)."""
    return results / "splits" / f"{name}.train.csv"


def ensure_split(set_dir: Path, results: Path, write: bool = True) -> list[tuple[str, str, bool]]:
    """Read the set's split files, or make them once; refuse two files that disagree."""
    anchor_csv, ursa_csv = split_paths(results, set_dir.name)
    train_csv = train_split_path(results, set_dir.name)
    rows = read_split(anchor_csv, ("path", "label", "is_valid")) if anchor_csv.is_file() else make_split(set_dir)
    if ursa_csv.is_file() and read_split(ursa_csv, ("name", "label", "is_valid")) != rows:
        raise InputError(f"{ursa_csv} and {anchor_csv} assign different images; delete both to make them again")
    train_text = csv_text(["name", "label"], [(p, c) for p, c, v in rows if not v])
    if train_csv.is_file() and train_csv.read_text(encoding="utf-8") != train_text:
        raise InputError(f"{train_csv} is not the training part of {anchor_csv}; delete it to make it again")
    for path, text in ((anchor_csv, csv_text(["path", "label", "is_valid"], rows)),
                       (ursa_csv, csv_text(["name", "label", "is_valid"], rows)), (train_csv, train_text)):
        if write and not path.is_file():
            write_atomic(path, text)
    return rows


def find_sets(names: str, roots: list[Path]) -> dict[str, Path]:
    """Each named set's folder, from the first root that has it; no names: every set found (shared ones first)."""
    if names.strip():
        found = {}
        for n in (s.strip() for s in names.split(",") if s.strip()):
            where = [r / n for r in roots if (r / n).is_dir()]
            if not where:
                raise InputError(f"set {n} not found in {', '.join(map(str, roots))}; build it "
                                 f"(benchmarks/datasets/build.py) or give --root/--sets")
            found[n] = where[0]
        return found
    found = {s: roots[0] / s for s in SETS if (roots[0] / s).is_dir()}
    for r in roots[1:]:
        for d in sorted(r.iterdir()) if r.is_dir() else []:
            if d.is_dir() and not d.name.startswith((".", "_")) and d.name not in found:
                found[d.name] = d
    if not found:
        raise InputError(f"no sets in {', '.join(map(str, roots))}; build them with benchmarks/datasets/build.py")
    return found
