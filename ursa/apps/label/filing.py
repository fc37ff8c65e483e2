"""Filing labelled pictures into their class folders: an append-only log first, then a move that never overwrites.

``POOL/label_log.csv`` is the source of truth: one row per picture filed (the picture in the pool,
the model's guess, the class given, where it went in DATA). A move is done in three steps, each
safe to be killed after:

1. the row is appended (flushed, fsynced), naming the destination: a free name in
   ``DATA/<class>/`` (``name-1.jpg`` ... when the name is taken; nothing is overwritten);
2. the picture gets its new name (a hard link: it now exists in both places; on a file system
   without hard links a whole copy, written beside it under a temp name, then renamed);
3. its old name in the pool is removed.

On start ``replay`` reads the log and finishes what a kill left half done: a row whose picture is
still in the pool is linked (if not yet) and unlinked from the pool; a destination that holds another
picture means the pool's one is a new picture under a reused name: it stays in the pool, unfiled.
So after any crash every picture is in exactly one place, and a picture filed twice (two tabs) is moved once.
"""

from __future__ import annotations

import csv
import filecmp
import io
import os
import stat
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from ursa.errors import DataError, UrsaError
from ursa.util.files import NAME_ERRORS, append_csv_row, copy_synced, csv_row_values, free_name

LOG_NAME = "label_log.csv"
LABEL_LOCK = ".ursa-label.lock"  # one labelling page per pool (util.lock)
LOCK_WHAT = "pool folder (ursa suggest --label files its pictures)"
LOG_COLUMNS = ["time", "file", "guess", "label", "dest"]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths hold the same picture (one inode, or the same bytes: a copy on a file system without links)."""
    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def place(src: Path, dest: Path) -> None:
    """Give src the name dest (which must not exist): a hard link, else a whole copy renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # no hard links here (another file system, FAT, some network shares): copy
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)  # swept on start if left
    os.close(fd)
    try:
        copy_synced(src, tmp)  # whole on disk before the pool's name goes
        if dest.exists():
            raise FileExistsError(dest)
        os.rename(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Filing:
    """Which pool pictures went where; files a picture when told, replays the log on start."""

    def __init__(self, pool: Path, data: Path, classes: Sequence[str]) -> None:
        self.pool, self.data = Path(pool), Path(data)
        self.classes = list(classes)
        self.filed: dict[str, tuple[str, str]] = {}  # pool name -> (label, dest inside DATA)
        self.skipped_rows = 0
        self._lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        return self.pool / LOG_NAME

    def rows(self) -> list[list[str]]:
        """The log's rows (header checked; a line cut short by a crash skipped and counted)."""
        path = self.log_path
        if not path.exists():
            return []
        try:
            text = path.read_text(encoding="utf-8", errors=NAME_ERRORS)
        except OSError as e:
            raise UrsaError(f"{path}: cannot read the labelling log ({e}); move it aside to start afresh") from None
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        if [h.strip() for h in rows[0]] != LOG_COLUMNS:
            raise UrsaError(f"{path}: not a log written by `ursa suggest --label` (header {','.join(rows[0])!r}); "
                            "move it aside, ursa will not overwrite it")
        out = []
        for row in rows[1:]:
            if len(row) != len(LOG_COLUMNS):
                self.skipped_rows += 1
                continue
            out.append(csv_row_values(row))
        return out

    def replay(self) -> int:
        """Read the log and finish every move a kill left half done; returns how many it finished."""
        finished = 0
        self.filed, self.skipped_rows = {}, 0
        for _, name, guess, label, dest in self.rows():
            if label not in self.classes or not self._safe(name, dest, label) or self._not_a_picture(name):
                self.skipped_rows += 1
                continue
            self.filed[name] = (label, dest)  # the last row for a picture wins
        for name, (label, dest) in list(self.filed.items()):
            src, target = self.pool / name, self.data / dest
            if not src.exists():
                continue  # done (or the user took it away: nothing of ours to do)
            if target.exists() and not same_file(src, target):
                # Not a move a kill left half done: the pool picture is another one under a reused name
                # (IMG_0001.jpg again). Filing it under the old row's label would be a guess: it stays, to be labelled.
                del self.filed[name]
                continue
            if not target.exists():
                try:
                    self.class_folder(label)
                except NotADirectoryError as e:
                    raise DataError(str(e)) from None  # at start: one line, exit 2
                place(src, target)
            os.unlink(src)
            finished += 1
        return finished

    def _safe(self, name: str, dest: str, label: str) -> bool:
        """A row names a picture inside the pool and a destination inside DATA/<label>/ (a hand-edited log may not)."""
        try:
            (self.pool / name).resolve().relative_to(self.pool.resolve())
            target = (self.data / dest).resolve()
            return target.parent == (self.data / label).resolve()
        except (ValueError, OSError, RuntimeError):
            return False

    def picture(self, name: str) -> Path | None:
        """The pool picture by that name: a plain file (not a link, a folder, the log or the lock) inside the pool; else None."""
        src = self.pool / name
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or parts[-1] in (LOG_NAME, LABEL_LOCK):
            return None
        try:
            if not stat.S_ISREG(os.lstat(src).st_mode):
                return None  # a link would be filed as a link (dangling, once moved), a folder cannot be
            src.resolve().relative_to(self.pool.resolve())
        except (OSError, ValueError, RuntimeError):
            return None
        return src

    def _not_a_picture(self, name: str) -> bool:
        """Something by that name is in the pool but is no picture ursa may move (the log, a folder, a link)."""
        return not Path(name).parts or (os.path.lexists(self.pool / name) and self.picture(name) is None)

    def class_folder(self, label: str) -> Path:
        """DATA/<label>/, made when missing; a file or a dangling link by that name is refused, never replaced."""
        folder = self.data / label
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise NotADirectoryError(f"{folder}: is not a folder, so {label!r} pictures cannot go there; "
                                     "move it aside and file again")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def file(self, name: str, label: str, guess: str = "") -> tuple[str, bool]:
        """Move one pool picture into DATA/<label>/: (its path inside DATA, whether this call moved it).

        Filing a picture already filed changes nothing (a second tab, a double key press).
        """
        if label not in self.classes:
            raise ValueError(f"unknown class {label!r}; one of {', '.join(self.classes)}")
        with self._lock:
            if name in self.filed and not os.path.lexists(self.pool / name):
                return self.filed[name][1], False  # moved already (a second tab, a double key press)
            src = self.picture(name)
            if src is None and os.path.lexists(self.pool / name):
                raise ValueError(f"{name!r} is a link or not a plain file in the pool; ursa moves only the pictures "
                                 "themselves (move the picture it points to into the pool)")
            if src is None:
                raise FileNotFoundError(name)
            self.class_folder(label)
            target = free_name(self.data / label / Path(name).name)
            while True:
                dest = target.relative_to(self.data).as_posix()
                self._append([now(), name, guess, label, dest])  # 1. the intent, on disk first
                try:
                    place(src, target)  # 2. the second name
                    break
                except FileExistsError:  # taken between the check and the link: a fresh name, a new row
                    target = free_name(target)
            self.filed[name] = (label, dest)
            os.unlink(src)  # 3. the old name goes
            return dest, True

    def _append(self, row: list[str]) -> None:
        append_csv_row(self.log_path, LOG_COLUMNS, row)

    def summary(self) -> dict[str, Any]:
        """Counts per class of what was filed."""
        per = {c: 0 for c in self.classes}
        for label, _ in self.filed.values():
            per[label] += 1
        return {"filed": len(self.filed), "per_class": per}


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")
