"""One process per folder: an advisory lock (``fcntl.flock``) on a lock file that says who holds it.

A second ``ursa train`` into the same run folder (or ``--resume`` of a run that is going on), or a
second ``ursa clean`` on the same data folder, is refused with one line naming the first process
(pid, host, start time, command) instead of racing it. The kernel drops the lock when the holder
exits, however it exits (kill -9 too), so a stale lock file never blocks anyone: only a live holder
does. The lock file is removed on release; a process that opened a file just removed checks that it
locked the file still at that name and tries again otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from types import TracebackType

from ursa.errors import BusyError, WriteError


class FolderLock:
    """``with FolderLock(folder, ".ursa.lock", "run folder"):`` held for the block, or BusyError at once."""

    def __init__(self, folder: str | Path, name: str, what: str) -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / name
        self.fd: int | None = None
        self.created = False  # the folder was made for the lock: removed again on release when left empty

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise BusyError naming the holder; never waits."""
        try:
            return self._acquire()
        except OSError as e:  # a read-only folder, a link at the lock's name: the user's to fix, one line
            raise WriteError(f"{self.path}: cannot create ursa's lock file there ({e.strerror or e}); "
                             f"give a {self.what} ursa can write to") from None

    def _acquire(self) -> "FolderLock":
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self.created = False
                raise BusyError(f"{self.folder}: another ursa process is using this {self.what} ({holder}); "
                                "wait for it to finish, or stop it, then run again") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same and not _ursa_lock_file(fd):  # a user's own file at the lock's name: never overwritten
                os.close(fd)
                self.created = False
                raise WriteError(f"{self.path}: a file ursa did not write has the name of ursa's lock file; "
                                 "move or rename it, then run again")
            if same:
                self.fd = fd
                _write_holder(fd)
                return self
            os.close(fd)  # the holder removed the file between our open and our lock: try the new one
        raise BusyError(f"{self.folder}: could not lock {self.path} (it keeps being replaced); run again")

    def release(self) -> None:
        """Remove the lock file and drop the lock (removal first, while still held)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
        if self.created:
            try:
                self.folder.rmdir()  # nothing was written there (bad input stopped the run first)
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().astimezone().isoformat(
        timespec="seconds"), "command": " ".join(["ursa", *sys.argv[1:]])[:300]}
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _ursa_lock_file(fd: int) -> bool:
    """Empty (just made) or a holder record ``_write_holder`` wrote (a dead holder's): ursa's to reuse."""
    data = os.pread(fd, 4097, 0)
    if not data:
        return True
    try:
        info = json.loads(data.decode("utf-8"))
    except ValueError:
        return False
    return isinstance(info, dict) and {"pid", "host", "started", "command"} <= set(info)


def _read_holder(fd: int) -> str:
    """'pid 123 on host h since 2026-...: ursa train ...', from the lock file (what is there, if it is damaged)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return (f"pid {int(info['pid'])} on {str(info['host'])[:80]} since {str(info['started'])[:40]}: "
                f"{str(info.get('command', ''))[:200]!s}")
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
