"""Temp files an interrupted save left in the data folder: found by ursa's own naming, removed on the next start.

``util.files.atomic_path`` writes ``.NAME.XXXXXXXX.tmp`` beside ``NAME`` (``tempfile.mkstemp``:
eight characters of ``[a-z0-9_]``) and renames it over ``NAME``; a kill -9 between the two
leaves it behind. Only files named exactly so, for a file ursa writes into a data folder (the
cleaner's two CSVs, verify's and download's reports, a downloaded image), plain files (not
links) and untouched for ``min_age`` seconds (a save in progress takes milliseconds) are
removed; nothing else in the folder is ever touched.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ursa.util.files import temp_target
from ursa.vision.images import IMAGE_EXTENSIONS

log = logging.getLogger("ursa.apps.clean")

# Files ursa writes at the top of a data folder: clean's, verify's report, download's manifest.
DATA_FILES = frozenset({"cleaned.csv", "clean_log.csv", "verify.csv", "downloads.csv"})
MIN_AGE = 10.0


def is_ursa_temp(name: str, top: bool) -> bool:
    """Whether a file name is atomic_path's temp file for a file ursa writes there (a top-level CSV, or an image)."""
    target = temp_target(name)  # atomic_path's temp name for target
    if target is None:
        return False
    if top and target in DATA_FILES:
        return True
    return Path(target).suffix.lower() in IMAGE_EXTENSIONS and not target.startswith(".")


def sweep_temp_files(root: Path, min_age: float = MIN_AGE, now: float | None = None) -> list[Path]:
    """Remove ursa's abandoned temp files from root and its class folders (one level down); returns what went."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    folders = [(Path(root), True)]
    try:
        with os.scandir(root) as it:
            folders += [(Path(e.path), False) for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for folder, top in folders:
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if e.name.startswith(".") and is_ursa_temp(e.name, top)]
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                if not e.is_file(follow_symlinks=False) or now - st.st_mtime < min_age:
                    continue  # a link, or maybe a save in progress right now
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                continue  # gone meanwhile, or not ours to remove: leave it
    if removed:
        log.info("removed %d temp file(s) left by an interrupted save in %s", len(removed), root)
    return removed
