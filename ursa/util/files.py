"""Files: atomic writes (temp file in the same folder, then rename) and CSV lines; the one home for both.

Every CSV ursa writes goes through `csv_line` / `csv_text` / `atomic_write_csv`, which escape
cells a spreadsheet would run as formulas (a leading ', OWASP's advice); every reader of those
files takes the quote back off with `csv_cell_value` / `csv_row_values`, so names round-trip.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename, else vanishes.

    keep_suffix: the temp file ends like `path` (for writers that pick the format from the name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if keep_suffix else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_umask())
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


def write_staged(path: str | Path, data: bytes, tag: str = "part") -> Path:
    """The first half of a two-phase atomic write: data fsynced under a hidden name beside path.

    The caller moves it into place later with os.replace (after recording why, say); until then
    readers see only the old file. The name is unique per process and target.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{tag}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of atomic_write_bytes (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
