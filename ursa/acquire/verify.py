"""Find the images a training run would choke on, and move them aside with a written record.

Every file with an image extension under the folder is decoded fully through
``ursa.vision.images.open_image`` (the same function the data loader uses, so verify and training
agree on what "readable" means). A file that does not decode -- empty, truncated, corrupt, not
an image, a decompression bomb, an unsupported format -- is

* moved to ``FOLDER/_quarantine/<class>/`` under its own name (never overwriting: ``name-1.jpg``), or
* deleted with ``delete=True``,

and either way gets a row in ``FOLDER/verify.csv`` (file, status, reason). Rows are appended as
files are handled and rows of earlier runs that moved, deleted or fixed something are kept,
so nothing ever disappears without a record. A file verify may not read (permission denied) is
not called broken: it gets an ``unreadable`` row saying what to do and stays where it is.

With ``fix=True``, images that decode but are not plain RGB/greyscale (CMYK, palette, RGBA,
16-bit...) or are longer than ``max_size`` get an RGB copy (JPEG stays JPEG, anything else
becomes PNG) written atomically, and the original goes to quarantine with the reason
``fixed: converted from MODE``.

Left alone: the ``_quarantine`` folder, hidden files and folders, and files without an image
extension (``notes.txt``, the CSVs): training never reads them, so verify does not move them;
the summary lists them. Running verify twice is idempotent.
"""

from __future__ import annotations

import csv
import io
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ursa.acquire.manifest import MANIFEST_NAME
from ursa.acquire.verify_summary import QUARANTINE, UNREADABLE, VerifySummary
from ursa.errors import ImageError, UrsaError
from ursa.util.files import (NAME_ERRORS, atomic_write_csv, csv_line, free_name, link_no_clobber, no_space_line,
                             write_new, write_staged)
from ursa.util.names import printable
from ursa.util.progress import progress_bar
from ursa.vision.dedupe import find_duplicates
from ursa.vision.images import MAX_PIXELS, is_image_file, open_image

REPORT_NAME = "verify.csv"
REPORT_COLUMNS = ("file", "status", "reason")
OK_MODES = frozenset({"RGB", "L"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif"})
MAX_BATCH = 64
# Below this many bytes of images a worker pool's start-up (~0.5 s) outweighs its gain.
IN_PROCESS_BYTES = 16 * 1024 * 1024


class VerifyError(UrsaError):
    """The folder or an option given to verify cannot be used."""


@dataclass
class _Result:
    """What a worker found about one file (plain data so it crosses process boundaries)."""

    rel: str
    ok: bool
    kind: str = ""
    reason: str = ""
    note: str = ""
    fixed_tmp: str = ""  # a fixed copy written next to the original, waiting to be renamed
    fixed_name: str = ""  # the name the fixed copy should get


# ----------------------------------------------------------------------------- scanning


def iter_images(folder: Path) -> Iterator[tuple[Path, bool]]:
    """Yield (path, is_image) for every file to consider, skipping quarantine and hidden entries."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here == folder and d == QUARANTINE)
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = here / name
            if here == folder and name in (REPORT_NAME, MANIFEST_NAME):
                continue
            yield p, is_image_file(p)


QUARANTINE_MARK = ".ursa-quarantine"  # inside FOLDER/_quarantine: verify made it (a user's class of that name has none)


def check_quarantine(root: Path) -> None:
    """Refuse to move files into a ``_quarantine`` folder that is the user's own, not one verify made.

    Verify's has the mark file, or sits beside verify.csv, or (made before the mark) holds only
    folders named like the data's class folders; a user's class of that name holds images, and
    mixing broken files into it would lose track of both.
    """
    q = root / QUARANTINE
    if not q.is_dir() or (q / QUARANTINE_MARK).exists() or (root / REPORT_NAME).is_file():
        return
    if any(not (p.is_dir() and (root / p.name).is_dir()) for p in q.iterdir()):
        raise VerifyError(f"{q}: a folder of yours, not ursa's quarantine (verify moves broken images there, and "
                          f"never trains on a folder of that name); rename it and run verify again")


def _quarantine_target(folder: Path, rel: str) -> Path:
    """Where a file of `rel` goes in the quarantine, the folder marked as verify's on first use."""
    q = folder / QUARANTINE
    if not (q / QUARANTINE_MARK).exists():
        q.mkdir(exist_ok=True)
        (q / QUARANTINE_MARK).write_bytes(b"")
    return q / rel


def _fix_target(path: Path, fmt: str) -> tuple[str, str]:
    """Output format and file name for a fixed copy: JPEG stays JPEG, anything else becomes PNG."""
    if fmt in ("JPEG", "MPO"):
        name = path.name if path.suffix.lower() in JPEG_SUFFIXES else path.stem + ".jpg"
        return "JPEG", name
    name = path.name if path.suffix.lower() == ".png" else path.stem + ".png"
    return "PNG", name


def _check_one(path: Path, root: Path, fix: bool, max_size: int | None, max_pixels: int) -> _Result:
    """Decode one file fully; with fix, also write its RGB copy to a temporary name."""
    rel = path.relative_to(root).as_posix()
    try:
        with open(path, "rb"):  # a file we may not read is not a broken image: say so, touch nothing
            pass
    except PermissionError:
        return _Result(rel, False, UNREADABLE, "permission denied: verify cannot read it, so it is left where it is; "
                       "make it readable (chmod u+r on the file) and run verify again")
    except OSError:
        pass  # missing, a folder...: open_image says what it is
    try:
        im, info = open_image(path, max_pixels=max_pixels, with_info=True)  # type: ignore[misc]
    except ImageError as e:
        return _Result(rel, False, e.kind, e.reason)
    notes = []
    if info.frames > 1:
        notes.append(f"{info.format} with {info.frames} frames: only the first is used")
    ext_fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".gif": "GIF", ".webp": "WEBP",
               ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    if ext_fmt and ext_fmt != info.format and not (ext_fmt == "JPEG" and info.format == "MPO"):
        notes.append(f"content is {info.format}, the name says {path.suffix}")
    result = _Result(rel, True, note="; ".join(notes))
    if not fix:
        return result
    changes = []
    if info.mode not in OK_MODES:
        changes.append(f"converted from {info.mode}")
    if max_size and max(im.size) > max_size:
        from PIL import Image

        before = im.size
        im.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        changes.append(f"shrunk from {before[0]}x{before[1]} to {im.size[0]}x{im.size[1]}")
    if not changes:
        return result
    fmt, name = _fix_target(path, info.format)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    tmp = write_staged(path, buf.getvalue(), "fixed.part")  # moved into place once the report row is written
    result.reason = "fixed: " + ", ".join(changes)
    result.fixed_tmp, result.fixed_name = str(tmp), name
    return result


def _check_batch(paths: list[str], root: str, fix: bool, max_size: int | None, max_pixels: int) -> list[_Result]:
    """Worker entry point: one round trip per batch keeps process overhead small."""
    return [_check_one(Path(p), Path(root), fix, max_size, max_pixels) for p in paths]


# ----------------------------------------------------------------------------- moving


class _Report:
    """verify.csv: earlier runs' moves are kept, this run's rows are appended as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        history: list[list[str]] = []
        if path.exists():
            raw = path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                raw = raw[: raw.rfind(b"\n") + 1]
            rows = list(csv.reader(raw.decode("utf-8", errors=NAME_ERRORS).splitlines()))
            if rows and tuple(rows[0]) != REPORT_COLUMNS:
                raise VerifyError(f"{path}: not an ursa verify report; move it away and run verify again")
            history = [r for r in rows[1:] if len(r) == 3 and r[1] in ("quarantined", "deleted", "fixed")]
        atomic_write_csv(path, REPORT_COLUMNS, history)
        self.fh = open(path, "a", newline="", encoding="utf-8", errors=NAME_ERRORS)

    def write(self, file: str, status: str, reason: str) -> None:
        with no_space_line(self.path):
            # a report for people: every name on its one line, raw bytes and control characters visibly escaped
            self.fh.write(csv_line([printable(file), status, printable(" ".join(reason.split()))]))
            self.fh.flush()  # survives a killed process; fsync on close

    def close(self) -> None:
        try:
            with no_space_line(self.path):
                self.fh.flush()
                os.fsync(self.fh.fileno())
        finally:
            self.fh.close()


def _apply(res: _Result, folder: Path, delete: bool, report: _Report, summary: VerifySummary) -> None:
    """Act on one result; a folder we may not change is the user's to fix, so say so in one line."""
    try:
        _apply_one(res, folder, delete, report, summary)
    except OSError as e:
        raise VerifyError(
            f"{folder / res.rel}: could not move, delete or replace it ({e.strerror or e}); "
            "make the folder writable (or copy it) and run verify again"
        ) from None


def _apply_one(res: _Result, folder: Path, delete: bool, report: _Report, summary: VerifySummary) -> None:
    """Record first, then move, delete or swap in the fix, so nothing changes without a row."""
    src = folder / res.rel
    if res.ok and not res.fixed_tmp:
        report.write(res.rel, "ok", res.note)
        summary.ok += 1
        return
    if res.kind == UNREADABLE:  # not corrupt as far as anyone knows: recorded, never moved or deleted
        report.write(res.rel, UNREADABLE, res.reason)
        summary.unreadable += 1
        return
    if not res.ok:
        summary.problems[res.kind] += 1
        if delete:
            report.write(res.rel, "deleted", f"{res.kind}: {res.reason}")
            src.unlink(missing_ok=True)
            summary.deleted += 1
            return
        # Link first, record, then drop the old name: at every moment the file exists somewhere.
        moved = link_no_clobber(src, _quarantine_target(folder, res.rel))
        report.write(res.rel, "quarantined", f"{res.kind}: {res.reason}; moved to {moved.relative_to(folder).as_posix()}")
        src.unlink(missing_ok=True)
        summary.quarantined += 1
        return
    # A fixed copy: keep the original in quarantine (a hard link first, so it always exists
    # somewhere), swap the copy in atomically, then drop the original's old name.
    tmp = Path(res.fixed_tmp)
    target = src.with_name(res.fixed_name)
    if target != src:
        target = free_name(target)
    kept = link_no_clobber(src, _quarantine_target(folder, res.rel))
    fixed_rel = target.relative_to(folder).as_posix()
    note = f"; copy saved as {fixed_rel}" if target != src else ""
    report.write(res.rel, "fixed", f"{res.reason}; original kept as {kept.relative_to(folder).as_posix()}{note}")
    os.replace(tmp, target)
    if target != src:
        src.unlink(missing_ok=True)
    summary.fixed += 1


def _default_workers(paths: list[Path]) -> int:
    """min(4, CPUs), except for small folders: starting processes costs more than they save there."""
    total = 0
    for p in paths:
        total += p.stat().st_size
        if total >= IN_PROCESS_BYTES:
            return min(4, os.cpu_count() or 1)
    return 1


def quarantine_bytes(folder: Path, rel: str, data: bytes, error: ImageError) -> str:
    """Keep bytes that do not decode (an upload) in the quarantine as verify would have moved them: a row, never lost.

    Returns the quarantined file's path relative to folder."""
    check_quarantine(folder)
    report = _Report(folder / REPORT_NAME)
    try:
        kept = write_new(_quarantine_target(folder, rel), data)
        shown = kept.relative_to(folder).as_posix()
        report.write(rel, "quarantined", f"{error.kind}: {error.reason}; moved to {shown}")
    finally:
        report.close()
    return shown


def _sweep_staged(root: Path) -> None:
    """Remove the hidden fixed copies (``.NAME.PID.fixed.part``, write_staged's names) not yet moved into place."""
    for stale in root.rglob(".*.fixed.part"):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)


def verify_images(
    folder: str | Path,
    delete: bool = False,
    fix: bool = False,
    max_size: int | None = None,
    workers: int | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
    duplicates: bool = True,
) -> VerifySummary:
    """Decode every image under ``folder`` and set aside (or delete) the broken ones, with a record.

    ``fix``: replace CMYK/palette/RGBA/16-bit images (and, with ``max_size``, oversized ones) by
    RGB copies, keeping the originals in quarantine. ``workers``: processes (1 runs in this
    process; default min(4, CPUs), or in-process when the images add up to under 16 MB).
    """
    root = Path(folder)
    if not root.is_dir():
        raise VerifyError(f"{root}: folder not found; give the folder that holds your class folders")
    if not root.stat().st_mode & 0o222:  # honour a read-only mark even when running as root
        raise VerifyError(f"{root}: the folder is read-only; copy it somewhere writable and verify the copy")
    if max_size is not None and max_size < 0:
        raise VerifyError(f"--max-size {max_size}: must be 0 (keep) or a positive number of pixels")
    if max_size and not fix:
        raise VerifyError("--max-size shrinks images, so it only works together with --fix")
    if workers is not None and workers < 1:
        raise VerifyError(f"--workers {workers}: must be at least 1")
    check_quarantine(root)
    started = time.perf_counter()
    summary = VerifySummary(folder=root, report=root / REPORT_NAME)
    paths: list[Path] = []
    for p, is_image in iter_images(root):
        if is_image:
            paths.append(p)
        else:
            summary.ignored.append(p.relative_to(root).as_posix())
    _sweep_staged(root)  # left by a killed --fix run
    n_workers = workers if workers is not None else _default_workers(paths)

    try:
        report = _Report(summary.report)
    except OSError as e:
        raise VerifyError(
            f"{summary.report}: cannot write the report ({e.strerror or e}); verify needs a writable "
            "folder: copy it somewhere writable first"
        ) from None
    bar = progress_bar(transient=False, unit="img") if progress and paths else None
    try:
        if bar:
            bar.start()
            task = bar.add_task("verifying", total=len(paths))
        # About 8 batches per worker: few round trips, yet the work still evens out across processes.
        size = max(1, min(MAX_BATCH, -(-len(paths) // (n_workers * 8))))
        batches = [[str(p) for p in paths[i : i + size]] for i in range(0, len(paths), size)]
        args = (str(root), fix, max_size or None, max_pixels)

        def handle(results: list[_Result]) -> None:
            for res in results:
                _apply(res, root, delete, report, summary)
            if bar:
                bar.update(task, advance=len(results),
                           description=f"ok {summary.ok} · moved {summary.quarantined + summary.deleted}")

        if n_workers == 1 or len(batches) <= 1:
            for b in batches:
                handle(_check_batch(b, *args))
        else:
            import multiprocessing

            # spawn, not fork: the progress bar's thread (and the caller's) must not be forked.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(n_workers, len(batches)), mp_context=ctx) as pool:
                futures = [pool.submit(_check_batch, b, *args) for b in batches]
                for fut in as_completed(futures):
                    handle(fut.result())
    except BaseException:
        _sweep_staged(root)  # a full disk (or Ctrl-C) mid-run: no half-done fixed copies left in the data folder
        raise
    finally:
        if bar:
            bar.stop()
        report.close()
    if duplicates:
        kept = [p for p, is_image in iter_images(root) if is_image]
        names = [p.relative_to(root).as_posix() for p in kept]
        summary.duplicates = find_duplicates(kept, names, [n.split("/")[0] if "/" in n else "" for n in names])
    summary.elapsed = time.perf_counter() - started
    return summary
