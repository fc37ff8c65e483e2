"""The run folder around a training run: one process at a time, ursa's own files tracked, leftovers cleared.

``RunFolder(out, say)`` is held for the whole of ``ursa train`` (and ``--resume``) by the process
that writes the folder: it takes the folder's lock (a second run into it, or a second ``--resume``
of it, is refused with one line naming the first), sweeps the hidden temp files a killed write left
(``.model.safetensors.XXXXXXXX.tmp``: ursa's own temp names, for files a run writes, only), says
when an earlier run there is being overwritten, and at the end records what this run wrote in the
folder's manifest. After a run that wrote its model file, the files the earlier run wrote and this
one did not (its ``model.int8.onnx``, ``best.safetensors``, ``curve.png`` ...) are removed, so
nothing stale sits beside the new model; anything ursa did not write is never touched. The feature
cache's spilled ``features/*.npy`` are deleted when the run ends, however it ends.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import TracebackType
from typing import Callable

from ursa.util.files import temp_target
from ursa.util.lock import FolderLock
from ursa.util.manifest import MANIFEST, Manifest

LOCK = ".ursa.lock"
CHECKPOINT = "checkpoint"  # training.checkpoint.FOLDER (kept in step by a test)
FEATURES = "features"
# What a run writes at the top of its folder (the run writer, the recipe, the report), besides *.png.
RUN_FILES = frozenset({
    "model.safetensors", "model.onnx", "model.int8.onnx", "best.safetensors", "config.json", "split.csv",
    "history.csv", "recipe.json", "advice.txt", "report.html", "report.json", "curve.json",
})
CHECKPOINT_FILE = re.compile(r"^(e\d+\.(weights|state|best)\.safetensors|checkpoint\.json|" + re.escape(MANIFEST) + ")$")
SPILL_FILE = re.compile(r"^(all_)?(train_view\d+|valid)\.npy$")
MIN_TEMP_AGE = 10.0  # seconds: a write in progress (`ursa export` into the folder, say) takes far less


def is_run_file(name: str) -> bool:
    """A file name a training run writes at the top of its folder."""
    return name in RUN_FILES or name.endswith(".png")


class RunFolder:
    """``with RunFolder(out, say) as run: ... run.finish(model_written)``; see the module's docstring."""

    def __init__(self, out: str | Path, say: Callable[[str], None], resume: bool = False) -> None:
        self.out = Path(out)
        self.say, self.resume = say, resume
        self.lock = FolderLock(self.out, LOCK, "run folder")
        self.started_ns = 0
        self.earlier: dict[str, list[int]] = {}

    def __enter__(self) -> "RunFolder":
        self.lock.acquire()
        try:
            self.started_ns = time.time_ns() - 50_000_000  # file times come from a coarser clock
            sweep_temps(self.out)
            manifest = Manifest(self.out)
            self.earlier = dict(manifest.files)
            if not self.resume and (manifest.files or (self.out / "model.safetensors").exists()):
                self.say(f"note: {self.out} holds an earlier run; this run overwrites it (ursa's own files only: "
                         "anything else there stays)")
        except BaseException:
            self.lock.release()
            raise
        return self

    def finish(self, model_written: bool) -> list[str]:
        """Record this run's files; after a model file was written, remove the earlier run's leftovers. Returns them."""
        manifest = Manifest(self.out)
        mine = [e.name for e in os.scandir(self.out) if is_run_file(e.name) and e.is_file(follow_symlinks=False)
                and e.stat(follow_symlinks=False).st_mtime_ns >= self.started_ns]
        stale = [n for n in manifest.files if n not in mine] if model_written else []
        gone = manifest.remove(stale)
        manifest.add(mine)
        if gone:
            self.say(f"removed what the earlier run in {self.out} wrote and this one did not: {', '.join(sorted(gone))}")
        if model_written and not self.earlier and not self.resume:  # a folder from before manifests: say, never delete
            old = sorted(e.name for e in os.scandir(self.out) if is_run_file(e.name) and e.name not in mine
                         and e.is_file(follow_symlinks=False))
            if old:
                self.say(f"warning: {', '.join(old)} in {self.out} are not from this run (left as they are)")
        return gone

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            remove_spill(self.out / FEATURES)
        finally:
            self.lock.release()


def sweep_temps(out: Path, min_age: float = MIN_TEMP_AGE, now: float | None = None) -> list[Path]:
    """Remove the temp files a killed write left for a run file (untouched for min_age) or a checkpoint file."""
    return _sweep(out, is_run_file, min_age, now) + sweep_checkpoint_temps(out / CHECKPOINT)


def sweep_checkpoint_temps(folder: Path) -> list[Path]:
    """The checkpoint folder's: at any age (only the run that holds the run folder's lock writes there)."""
    return _sweep(folder, lambda name: bool(CHECKPOINT_FILE.match(name)), 0.0, None)


def _sweep(folder: Path, known: Callable[[str], bool], min_age: float, now: float | None) -> list[Path]:
    now = time.time() if now is None else now
    removed: list[Path] = []
    if folder.is_symlink() or not folder.is_dir():
        return removed
    for e in os.scandir(folder):
        target = temp_target(e.name)
        if target is None or not (known(target) or target == MANIFEST) or not e.is_file(follow_symlinks=False):
            continue
        if now - e.stat(follow_symlinks=False).st_mtime >= min_age:
            os.unlink(e.path)
            removed.append(Path(e.path))
    return removed


def remove_spill(folder: Path) -> list[Path]:
    """Delete the feature cache's memory-mapped files (its own names, in features/, features/rankN/ and features/refit/)."""
    removed: list[Path] = []
    if folder.is_symlink() or not folder.is_dir():
        return removed
    subs = [Path(e.path) for e in os.scandir(folder) if re.fullmatch(r"rank\d+|refit", e.name)
            and e.is_dir(follow_symlinks=False)]
    for d in [*subs, folder]:
        for e in os.scandir(d):
            if SPILL_FILE.match(e.name) and e.is_file(follow_symlinks=False):
                os.unlink(e.path)
                removed.append(Path(e.path))
        try:
            d.rmdir()  # only when empty: anything else there stays
        except OSError:
            pass
    return removed
