"""Small shared helpers: atomic writes (temp file in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename, else vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of atomic_write_bytes (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def smooth(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """fastai's debiased exponential moving average, so noisy batch losses read as a curve.

    NaN and inf pass through unchanged and do not enter the average.
    """
    out, avg, n = [], 0.0, 0
    for v in values:
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            out.append(v)
            continue
        n += 1
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**n))
    return out
