"""What one verify run found and did, as the closing summary and as JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUARANTINE = "_quarantine"
# A file verify may not read (permission denied): reported, left where it is, never called corrupt.
UNREADABLE = "unreadable"


@dataclass
class VerifySummary:
    """What one verify run found and did."""

    folder: Path
    report: Path
    ok: int = 0
    quarantined: int = 0
    deleted: int = 0
    fixed: int = 0
    unreadable: int = 0  # could not be read (permission denied): left in place
    problems: Counter = field(default_factory=Counter)  # kind -> count of broken files
    ignored: list[str] = field(default_factory=list)  # files without an image extension, left alone
    elapsed: float = 0.0
    duplicates: Any = None  # vision.dedupe.DuplicateReport of the images left: exact and near copies, per class

    @property
    def checked(self) -> int:
        return self.ok + self.quarantined + self.deleted + self.fixed + self.unreadable

    @property
    def images_per_s(self) -> float:
        return self.checked / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "report": str(self.report),
            "checked": self.checked,
            "ok": self.ok,
            "quarantined": self.quarantined,
            "deleted": self.deleted,
            "fixed": self.fixed,
            "unreadable": self.unreadable,
            "problems": dict(self.problems.most_common()),
            "ignored": self.ignored,
            "elapsed_s": round(self.elapsed, 3),
            "duplicates": self.duplicates.to_dict() if self.duplicates is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """Plain-text summary: counts, problems by kind, where things went."""
        lines = [
            f"Checked {self.checked} images in {self.folder} in {self.elapsed:.1f} s "
            f"({self.images_per_s:.0f} images/s)",
            f"  ok           {self.ok:>6}",
            f"  fixed        {self.fixed:>6}",
            f"  quarantined  {self.quarantined:>6}",
            f"  deleted      {self.deleted:>6}",
        ]
        if self.unreadable:
            lines.append(f"  unreadable   {self.unreadable:>6}")
        if self.problems:
            lines.append("Broken files by reason:")
            for kind, n in self.problems.most_common():
                lines.append(f"  {n:>6}  {kind}")
        if self.quarantined or self.fixed:
            lines.append(f"Moved files are in {self.folder / QUARANTINE} (originals of fixed files too).")
        if self.unreadable:
            n = self.unreadable
            lines.append(
                f"{n} file{'s' if n != 1 else ''} could not be read (permission denied) and stayed where "
                f"{'they are' if n != 1 else 'it is'}; training cannot read them either: make them readable "
                "(chmod u+r) and run verify again."
            )
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (", ..." if len(self.ignored) > 5 else "")
            n = len(self.ignored)
            lines.append(f"Left alone {n} file{'s' if n != 1 else ''} without an image extension: {shown}")
        dup = self.duplicates.lines() if self.duplicates is not None else []
        if dup:
            lines.append(f"Duplicates ({len(dup)} group{'s' if len(dup) != 1 else ''}, left in place: `ursa clean` shows "
                         "them side by side, `ursa train --dedupe-split` keeps each group on one side of the split):")
            lines += [f"  {line}" for line in dup[:20]]
            if len(dup) > 20:
                lines.append(f"  ... {len(dup) - 20} more (--json lists them all)")
        lines.append(f"Record of every file: {self.report}")
        return "\n".join(lines)
