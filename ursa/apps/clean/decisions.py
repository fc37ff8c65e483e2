"""The user's decisions: clean_log.csv is the source of truth, cleaned.csv its current consequence.

Every decision is appended to ``DATA/clean_log.csv`` (replayed on start, last decision wins) and
mirrored in ``DATA/cleaned.csv`` (fastai's ``name,label``). No image is ever moved, rewritten or deleted.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from ursa.apps.web import clip
from ursa.errors import UrsaError
from ursa.util.files import NAME_ERRORS, append_csv_row, atomic_write_csv, csv_row_values

LOG_NAME = "clean_log.csv"
CLEANED_NAME = "cleaned.csv"
CLEAN_LOCK = ".ursa-clean.lock"  # one cleaner per data folder (`ursa clean`, the notebook's cleaner): util.lock
LOCK_WHAT = "data folder (ursa clean saves cleaned.csv there)"
LOG_COLUMNS = ["time", "file", "old_label", "action", "new_label"]
ACTIONS = ("keep", "exclude", "relabel", "undo")


class Decisions:
    """Keep / exclude / relabel per item, replayed from the log (last decision wins) and saved as made."""

    def __init__(self, root: Path, names: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.labels = dict(zip(self.names, labels))  # label as loaded, before any decision
        self.classes = list(classes)
        self.state: dict[str, tuple[str, str]] = {}  # name -> (action, label); absent = undecided
        self.skipped_rows = 0  # damaged rows, unknown actions or classes
        self.other_rows = 0  # rows about files not in the data as loaded (e.g. excluded, then loaded from cleaned.csv)
        self._lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        """DATA/clean_log.csv: every decision ever made, in order."""
        return self.root / LOG_NAME

    @property
    def cleaned_path(self) -> Path:
        """DATA/cleaned.csv: what the next training run reads."""
        return self.root / CLEANED_NAME

    def replay(self) -> int:
        """Forget the state and replay the whole log again (what any process appended is in it)."""
        self.state, self.skipped_rows, self.other_rows = {}, 0, 0
        return self.load()

    def load(self) -> int:
        """Replay clean_log.csv; returns how many rows applied (rows for other files or classes are kept but ignored)."""
        path = self.log_path
        if not path.exists():
            return 0
        try:
            text = path.read_text(encoding="utf-8", errors=NAME_ERRORS)  # names as their bytes on disk
        except (OSError, UnicodeDecodeError) as e:
            raise UrsaError(f"{path}: cannot read the cleaning log ({e}); move it aside to start afresh") from None
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return 0
        if [h.strip() for h in rows[0]] != LOG_COLUMNS:
            raise UrsaError(f"{path}: not a log written by `ursa clean` (header {','.join(rows[0])!r}); "
                            "move it aside, ursa will not overwrite it")
        applied = 0
        for row in rows[1:]:
            if len(row) != len(LOG_COLUMNS):  # e.g. a line cut short by a crash
                self.skipped_rows += 1
                continue
            _, name, _, action, new_label = csv_row_values(row)
            if name not in self.labels:
                self.other_rows += 1
            elif self._apply(name, action, new_label):
                applied += 1
            else:
                self.skipped_rows += 1
        return applied

    def _apply(self, name: str, action: str, label: str) -> bool:
        if name not in self.labels or action not in ACTIONS:
            return False
        if action == "undo":
            self.state.pop(name, None)
        elif action == "keep":
            self.state[name] = ("keep", self.labels[name])
        elif action == "exclude":
            self.state[name] = ("exclude", "")
        else:
            if not self.is_label(label):
                return False
            self.state[name] = ("keep", label) if label == self.labels[name] else ("relabel", label)
        return True

    def is_label(self, label: str) -> bool:
        """Whether a relabel may give this label: one of the classes (``label_sets`` allows a set of them)."""
        return label in self.classes

    def decide(self, name: str, action: str, label: str = "") -> dict[str, Any]:
        """Record one decision: validate, append to the log (flushed, fsynced), then rewrite cleaned.csv."""
        if name not in self.labels:
            raise KeyError(name)
        if action not in ACTIONS:
            raise ValueError(f"unknown action {clip(action)!r}; one of {', '.join(ACTIONS)}")
        if action == "relabel" and not self.is_label(label):
            raise ValueError(f"unknown class {clip(label)!r}; one of {', '.join(self.classes)}")
        old = self.labels[name]
        new = {"keep": old, "exclude": "", "relabel": label, "undo": old}[action]
        with self._lock:
            self._append_log([now(), name, old, action, new])
            # cleaned.csv is rebuilt from the whole log, not from this process's memory: every decision
            # in the log is in it, whoever appended it (the folder lock keeps a second cleaner out anyway).
            self.replay()
            self.write_cleaned()
            return self.item(name)

    def _append_log(self, row: list[str]) -> None:
        append_csv_row(self.log_path, LOG_COLUMNS, row)

    def label_of(self, name: str) -> str | None:
        """The label the item will train with, or None when excluded."""
        action, label = self.state.get(name, ("", self.labels[name]))
        return None if action == "exclude" else label

    def item(self, name: str) -> dict[str, Any]:
        """The item's decision as the page shows it."""
        action, label = self.state.get(name, ("", self.labels[name]))
        return {"name": name, "status": action or None, "label": label or None}

    def summary(self) -> dict[str, int]:
        """Counts for the page's header and the CLI."""
        acts = [a for a, _ in self.state.values()]
        return {"total": len(self.names), "decided": len(acts), "kept": acts.count("keep"),
                "excluded": acts.count("exclude"), "relabelled": acts.count("relabel")}

    def write_cleaned(self) -> Path:
        """cleaned.csv: every item not excluded, with its current or new label; atomic."""
        rows = [[n, lab] for n in self.names if (lab := self.label_of(n)) is not None]
        return atomic_write_csv(self.cleaned_path, ["name", "label"], rows)


def now() -> str:
    """Local time with its offset, to the second: the log's time column."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def check_writable(root: Path, csv_path: Path | None = None) -> None:
    """Refuse, before the slow pass, a folder the cleaner cannot write to or a cleaned.csv it did not write."""
    root = Path(root)
    if not os.access(root, os.W_OK):
        raise UrsaError(f"{root}: folder is read-only; the cleaner saves cleaned.csv and clean_log.csv there "
                        "(copy the folder, or use --export DIR to only write the rankings)")
    cleaned, log_path = root / CLEANED_NAME, root / LOG_NAME
    is_input = csv_path is not None and Path(csv_path).resolve() == cleaned.resolve()
    if cleaned.exists() and not log_path.exists() and not is_input:
        raise UrsaError(f"{cleaned} exists but {LOG_NAME} does not, so ursa clean did not write it and will not "
                        f"overwrite it: start from it with --csv {cleaned}, or move it aside")
