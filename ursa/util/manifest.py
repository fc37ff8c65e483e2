"""What ursa wrote in a folder: a manifest, so ursa removes or replaces only its own files.

``Manifest(folder, ".ursa-files.json")`` records each file ursa wrote there (name relative to the
folder, its size and modification time when written). ``remove`` deletes a recorded file only while
it is still the plain file ursa wrote (same size and time: a file the user replaced, or a link or
folder put at that name, is left alone); a file that was never recorded is never touched. The
checkpoint folder and the run folder each keep one.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable

from ursa.util.files import atomic_write_text

MANIFEST = ".ursa-files.json"
ANY = [-1, -1]  # a file ursa rewrites in place of itself (recorded by name): see Manifest.add(rewritten=True)


class Manifest:
    """The files ursa wrote in one folder, read once, saved atomically after each change."""

    def __init__(self, folder: str | Path, name: str = MANIFEST) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.files: dict[str, list[int]] = self._read()  # name -> [size, mtime_ns] when ursa wrote it

    def _read(self) -> dict[str, list[int]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if _plain_name(k) and isinstance(v, list) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def add(self, names: Iterable[str], rewritten: bool = False) -> None:
        """Record files ursa has just written (names inside the folder); saved at once.

        ``rewritten``: a file ursa replaces again and again (an index), recorded by name alone: it is
        ursa's while it is a plain file, whatever its size and time.
        """
        for name in names:
            st = _stat(self.folder / name)
            if _plain_name(name) and (rewritten or st is not None):
                self.files[name] = ANY if rewritten else [st.st_size, st.st_mtime_ns]  # type: ignore[union-attr]
        self.save()

    def ours(self, name: str) -> bool:
        """The file at name is still the plain file ursa wrote there."""
        want = self.files.get(name)
        st = _stat(self.folder / name)
        return want is not None and st is not None and (want == ANY or [st.st_size, st.st_mtime_ns] == want)

    def remove(self, names: Iterable[str], save: bool = True) -> list[str]:
        """Delete the named files that are still ursa's own (see ``ours``); forget them all. Returns what went.

        ``save=False``: the manifest file is not rewritten (one write fewer for a kill to interrupt); an
        entry for a file that is gone is harmless and dropped at the next save.
        """
        gone = []
        for name in list(names):
            if self.ours(name):
                (self.folder / name).unlink(missing_ok=True)
                gone.append(name)
            self.files.pop(name, None)
        if save:
            self.save()
        return gone

    def save(self) -> None:
        if not self.files and not self.path.exists():
            return
        atomic_write_text(self.path, json.dumps({"written_by": "ursa", "files": self.files}, indent=1) + "\n")

    def drop(self) -> None:
        """Delete the manifest file itself (after its files are gone)."""
        self.path.unlink(missing_ok=True)
        self.files = {}


def _plain_name(name: object) -> bool:
    """A name inside the folder: relative, no '..', no empty parts (one level of subfolder at most)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return len(parts) <= 2 and all(p not in ("", ".", "..") for p in parts)


def _stat(path: Path) -> os.stat_result | None:
    """The file's stat when it is a plain file (not a link, not a folder), else None."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None
