"""benchmarks/recipes.py's finished runs, one JSON file each: an interrupted benchmark keeps what it measured, a rerun
skips what is there (so a later session adds seeds, sets or recipes without measuring the rest again).

A run is `<store>/<set>/<recipe>.seed<S>.<K>.json`: the record recipes.py made, plus the key it was made with (the
`ursa train` flags, the split file and its sha256; K is the key's short hash, so runs with other flags sit beside it). A stored run is reused only when its key is the one the rerun
would use and it produced a held-out error; a failed run, a changed split or other flags (--train-args) measure
again. `--remeasure default,lrfind` measures those recipes again (after a change to the recipe's rules), and
the commit each run was measured at is in its record. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from splits import write_atomic

TIMING = "recipes_timing.json"  # benchmarks/recipes_timing.py's idle walls, by set


def run_key(split: Path, flags: list[str] | str, extra: list[str]) -> dict:
    """What a run's figure depends on besides ursa's code: its flags, the extra flags, the split file's name and bytes."""
    sha = hashlib.sha256(split.read_bytes()).hexdigest() if split.is_file() else None
    return {"flags": flags if isinstance(flags, str) else list(flags), "train_args": list(extra), "split": split.name,
            "split_sha256": sha}


def commit_of(root: Path) -> str | None:
    """The checkout's commit (and '+dirty' when it has changes), recorded with every run."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "ursa"], capture_output=True,
                               text=True, cwd=root, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


class RunStore:
    """Finished runs on disk, configured once: the folder, the recipes to measure again, the commit to record."""

    def __init__(self, folder: Path, remeasure: set[str] = frozenset(), commit: str | None = None):
        self.folder, self.remeasure, self.commit = folder, set(remeasure), commit

    def path(self, set_name: str, recipe: str, seed: int, key: dict) -> Path:
        k = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        return self.folder / set_name / f"{recipe}.seed{seed}.{k}.json"

    def get(self, set_name: str, recipe: str, seed: int, key: dict) -> dict | None:
        """The stored run when it can stand for this one (same key, a held-out error, not asked to measure again)."""
        p = self.path(set_name, recipe, seed, key)
        if recipe in self.remeasure or not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("key") != key or rec.get("error_rate") is None:
            return None
        return {**rec, "stored": True}

    def put(self, rec: dict, key: dict) -> None:
        """Keep one finished run (atomic: a killed benchmark leaves the file whole or absent)."""
        p = self.path(rec["set"], rec["recipe"], rec["seed"], key)
        p.parent.mkdir(parents=True, exist_ok=True)
        body = {**{k: v for k, v in rec.items() if k != "stored"}, "key": key, "commit": self.commit}
        write_atomic(p, json.dumps(body, indent=1, default=str) + "\n")


def read_timing(results: Path) -> dict | None:
    """The idle timings by set (recipes_timing.py): {} when there is no file, None when it is unreadable; entries that
    are not objects are dropped."""
    path = results / TIMING
    if not path.is_file():
        return {}
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in got.items() if isinstance(v, dict)} if isinstance(got, dict) else None
