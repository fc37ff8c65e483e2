"""Files: atomic writes (temp file in the same folder, then rename) and CSV lines; the one home for both.

Every CSV ursa writes goes through `csv_line` / `csv_text` / `atomic_write_csv`, which escape
cells a spreadsheet would run as formulas (a leading ', OWASP's advice); every reader of those
files takes the quote back off with `csv_cell_value` / `csv_row_values`, so names round-trip.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ursa.errors import NoSpaceError, WriteError

# The errors a full disk (or a full quota) gives: every writer turns them into one NoSpaceError line.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _read_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else set-and-restore once, at import.

    Never on each write: os.umask(0)-then-restore from one thread while another thread creates a
    file gives that file (or the process, when two threads interleave) the wrong mask.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - systems without /proc; import runs in one thread
    os.umask(mask)
    return mask


UMASK = _read_umask()
# Every file ursa writes gets the ordinary permissions of a new file (0644 with the usual umask 022):
# model files and checkpoints too (a model file is meant to be copied and served).
FILE_MODE = 0o666 & ~UMASK


@contextlib.contextmanager
def no_space_line(path: str | Path) -> Iterator[None]:
    """Turn a full disk while writing `path` into the one NoSpaceError line (exit 2); other errors pass through."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            raise NoSpaceError(f"no space left writing {path}: free some disk space (or write elsewhere) "
                               "and run again") from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename, else vanishes.

    keep_suffix: the temp file ends like `path` (for writers that pick the format from the name).
    A full disk while writing raises NoSpaceError naming `path` (the temp file is removed).
    """
    path = Path(path)
    with no_space_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix if keep_suffix else ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            os.chmod(tmp_path, FILE_MODE)  # mkstemp makes 0600; give the file normal permissions
            yield tmp_path
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


# atomic_path's temp name for NAME: ".NAME.XXXXXXXX.tmp" (mkstemp: eight of [a-z0-9_]); a kill -9 leaves it.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_target(name: str) -> str | None:
    """The file an atomic_path temp file of this name was for, or None when the name is not one of ursa's temps."""
    m = TEMP_NAME.match(name)
    return m["target"] if m else None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes so readers see the old file or the new one, never half of one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_new(path: str | Path, data: bytes) -> Path:
    """Write bytes under `path`, or `stem-2.ext`, `stem-3.ext`, ... when taken: whole (fsynced, then hard-linked into
    place, which fails rather than replace), never over a file that is already there. The path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        for n in range(1, 100_000):
            target = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: reserve the name, then move the whole file onto it
                try:
                    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                except FileExistsError:
                    continue
                os.replace(tmp, target)
                return target
        raise FileExistsError(f"{path}: no free name beside it")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written atomically by Python (so a full disk is an OSError with its errno, and the
    file gets FILE_MODE: safetensors' own writer makes 0600 files and raises its own error type)."""
    from safetensors import SafetensorError
    from safetensors.torch import save

    try:
        data = save(dict(tensors), metadata=metadata)
    except SafetensorError as e:
        raise WriteError(f"could not write {path}: safetensors refused the tensors ({e})") from None
    atomic_write_bytes(path, data)
    return Path(path)


def write_staged(path: str | Path, data: bytes, tag: str = "part") -> Path:
    """The first half of a two-phase atomic write: data fsynced under a hidden name beside path.

    The caller moves it into place later with os.replace (after recording why, say); until then
    readers see only the old file. The name is unique per process and target.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{tag}")
    try:
        with no_space_line(path), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave half a staged file in the user's folder
        raise
    return tmp


# A file name that is not valid UTF-8 reaches Python surrogate-escaped (PEP 383); ursa's own files
# (CSV, HTML) carry it as its bytes on disk, so it round-trips to the same file, never crashes a writer.
NAME_ERRORS = "surrogateescape"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of atomic_write_bytes (UTF-8; names that are not UTF-8 as their own bytes, ``NAME_ERRORS``)."""
    atomic_write_bytes(path, text.encode("utf-8", NAME_ERRORS))


# Spreadsheets run a cell that starts with one of these as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_ESCAPE = "'"


def csv_cell(value: Any) -> Any:
    """A cell as written: text a spreadsheet would run as a formula gets a leading ' (numbers stay as they are).

    Idempotent (an escaped cell is not escaped again), so a reader that rewrites what it read
    cannot stack quotes; `csv_cell_value` takes the quote back off.
    """
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)  # "-0.5", "-1e-05", "-inf": a number, not a formula
        return value
    except ValueError:
        return CSV_ESCAPE + value


def csv_cell_value(text: str) -> str:
    """What a cell written by `csv_cell` said: every reader of ursa's own CSV files calls this on each cell."""
    if text.startswith(CSV_ESCAPE) and text[1:].startswith(FORMULA_START):
        return text[1:]
    return text


def csv_row_values(row: Sequence[str]) -> list[str]:
    """`csv_cell_value` of every cell of a row read with csv.reader."""
    return [csv_cell_value(v) for v in row]


def csv_line(values: Sequence[Any], end: str = "\n") -> str:
    """One CSV record (quoted as the csv module does, formula-like text escaped), so every writer agrees.

    Quoting is decided with a CRLF terminator whatever `end` is, so a cell holding a CR or LF is
    always quoted (with "\n" alone, or "", the csv module leaves such a cell bare and the file torn).
    """
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow([csv_cell(v) for v in values])
    return buf.getvalue()[:-2] + end


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A whole CSV file's text: header then rows, each as `csv_line` writes it."""
    return csv_line(header) + "".join(csv_line(row) for row in rows)


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file atomically."""
    atomic_write_text(path, csv_text(header, rows))
    return Path(path)


def check_outside(out: str | Path, data: str | Path, what: str = "output folder") -> None:
    """Refuse an output folder inside the user's data folder: ursa never writes into your data."""
    from ursa.errors import DataError

    d, o = Path(data).resolve(), Path(out).resolve()
    if o == d or d in o.parents:
        raise DataError(f"{out}: the {what} must be outside the data folder {data} (ursa never writes into your data)")


def free_name(target: str | Path) -> Path:
    """The first of name, name-1, name-2... that does not exist yet."""
    target = Path(target)
    if not target.exists():
        return target
    i = 1
    while True:
        cand = target.with_name(f"{target.stem}-{i}{target.suffix}")
        if not cand.exists():
            return cand
        i += 1


def copy_synced(src: str | Path, dest: str | Path) -> None:
    """Copy src's bytes and times onto dest and fsync it: whole on disk before the caller drops src's name."""
    shutil.copy2(src, dest)
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())


def link_no_clobber(src: str | Path, target: str | Path) -> Path:
    """Give src a second name under target (or target-1...), never replacing an existing file; the name it got.

    Verify's quarantine and the labelling page's filing: link first, record, then drop the old
    name, so at every moment the file exists somewhere.
    """
    src, target = Path(src), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        dest = free_name(target)
        try:
            os.link(src, dest)
            return dest
        except FileExistsError:
            continue  # someone took the name between the check and the link: try the next one
        except OSError:
            try:  # a file system without hard links: reserve the name, then copy the whole file onto it
                os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            copy_synced(src, dest)
            return dest


def append_csv_row(path: str | Path, header: Sequence[str], row: Sequence[Any]) -> None:
    """Append one row to an append-only CSV log (the header first when it is new), flushed and fsynced.

    A line a killed process left cut short is ended first, so a new row is never glued onto it
    (the reader skips the cut line). The cleaner's and the labelling page's logs.
    """
    path = Path(path)
    fresh = not path.exists() or path.stat().st_size == 0
    text = (csv_line(header) if fresh else "") + csv_line(row)
    with open(path, "a+b") as f:
        if not fresh:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a previous run died mid-line: never glue onto it
                f.write(b"\n")
        f.write(text.encode("utf-8", NAME_ERRORS))
        f.flush()
        os.fsync(f.fileno())
