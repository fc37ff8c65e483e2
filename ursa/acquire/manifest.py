"""``DEST/downloads.csv``, one row per URL, and the closing summary of a download run.

The manifest is appended to as URLs finish (one write per row), so a killed run loses at most
the rows in flight; a torn last line is dropped when it is read back.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ursa.acquire.urls import CREDIT_COLUMNS, DownloadError, redacted
from ursa.util.files import NAME_ERRORS, atomic_write_text, csv_line, csv_row_values, csv_text

MANIFEST_NAME = "downloads.csv"
# The columns before the credits existed: such a manifest is still read (credits empty) and rewritten whole on the next run.
LEGACY_COLUMNS = ("url", "class", "file", "status", "http_status", "error", "bytes", "sha256")
MANIFEST_COLUMNS = (*LEGACY_COLUMNS, *CREDIT_COLUMNS)
STATUSES = ("saved", "duplicate", "failed", "refused")
DONE_STATUSES = frozenset({"saved", "duplicate", "refused"})

# What each failure kind means, for the closing summary.
FAILURE_LABELS = {
    "timeout": "timed out",
    "connection": "connection failed or reset",
    "truncated": "truncated (incomplete body or image)",
    "not_image": "not an image (e.g. an HTML page)",
    "empty": "empty response",
    "corrupt": "image data corrupt",
    "unsupported": "unsupported image format",
    "too_large": "too large",
    "redirect": "too many redirects / redirect loop",
    "rate_limited": "rate limited (429)",
    "bad_url": "malformed URL",
    "write": "could not write the file",
    "unexpected": "unexpected error (please report it)",
}


def is_legacy(path: str | Path) -> bool:
    """A downloads.csv written before the credit columns existed (rewritten with them by the next run)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, encoding="utf-8", errors=NAME_ERRORS, newline="") as f:
        return tuple(next(csv.reader([f.readline()]), [])) == LEGACY_COLUMNS


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Read downloads.csv, dropping a torn last line left by a killed run (a legacy one's credits read as empty)."""
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]  # a kill mid-write: the last line is incomplete
    lines = raw.decode("utf-8", errors=NAME_ERRORS).splitlines()
    if not lines:
        return []
    header = tuple(next(csv.reader([lines[0]])))
    if header not in (MANIFEST_COLUMNS, LEGACY_COLUMNS):
        raise DownloadError(
            f"{p}: not an ursa download manifest (columns {','.join(header)}); "
            "move it away or choose another --dest"
        )
    rows = []
    for row in csv.reader(lines[1:]):
        if len(row) == len(header) and row[3] in STATUSES:
            rows.append({**dict.fromkeys(CREDIT_COLUMNS, ""), **dict(zip(header, csv_row_values(row)))})
    return rows


class ManifestWriter:
    """Append one CSV line per finished URL with a single write; fsync at most once a second."""

    def __init__(self, path: Path, keep: list[dict[str, str]], rewrite: bool) -> None:
        self.path = path
        if rewrite or not path.exists():
            atomic_write_text(path, csv_text(MANIFEST_COLUMNS, ([redacted(r[c]) if c in ("url", "error") else r[c]
                                                                  for c in MANIFEST_COLUMNS] for r in keep)))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.synced = time.monotonic()

    def write(self, row: Mapping[str, Any]) -> None:
        """One os.write per row, so a killed run leaves whole rows (or one torn last line)."""
        values = ["" if row.get(c) is None else row.get(c) for c in MANIFEST_COLUMNS]
        for c in ("url", "error"):  # credentials in a URL stay out of the file (the run still used them)
            i = MANIFEST_COLUMNS.index(c)
            values[i] = redacted(str(values[i]))
        os.write(self.fd, csv_line(values).encode("utf-8", NAME_ERRORS))
        if time.monotonic() - self.synced > 1.0:
            os.fsync(self.fd)
            self.synced = time.monotonic()

    def close(self) -> None:
        """Flush every row to disk before the summary claims them."""
        os.fsync(self.fd)
        os.close(self.fd)


@dataclass
class DownloadSummary:
    """What one run did, class by class, and why anything failed."""

    dest: Path
    manifest: Path
    saved: int = 0
    duplicate: int = 0
    failed: int = 0
    refused: int = 0
    skipped: int = 0  # done by an earlier run (saved, duplicate or refused there)
    over_cap: int = 0  # not fetched: the class already had --max-pics images
    refused_address: int = 0  # refused for pointing at this machine, a private network or metadata
    filtered: int = 0  # not fetched: the list gives no licence of --license
    failures: Counter = field(default_factory=Counter)  # failure kind -> count
    per_class: dict[str, Counter] = field(default_factory=dict)
    elapsed: float = 0.0

    def add(self, cls: str, status: str, kind: str | None = None) -> None:
        """Count one finished URL, so the totals and the per-class table agree with the manifest."""
        setattr(self, status, getattr(self, status) + 1)
        self.per_class.setdefault(cls, Counter())[status] += 1
        if kind:
            self.failures[kind] += 1

    @property
    def images_per_s(self) -> float:
        """Saved images per second of the run, for the benchmark."""
        return self.saved / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data, for --json."""
        return {
            "dest": str(self.dest),
            "manifest": str(self.manifest),
            "saved": self.saved,
            "duplicate": self.duplicate,
            "failed": self.failed,
            "refused": self.refused,
            "skipped": self.skipped,
            "over_cap": self.over_cap,
            "refused_address": self.refused_address,
            "filtered": self.filtered,
            "failures": dict(self.failures.most_common()),
            "per_class": {k: dict(v) for k, v in self.per_class.items()},
            "elapsed_s": round(self.elapsed, 3),
        }

    def to_json(self) -> str:
        """The summary as JSON text, for --json."""
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """Plain-text closing summary: a per-class table, failures by reason, what to do next."""
        cols = ("saved", "duplicate", "failed", "refused", "skipped")
        width = max([5, *(len(c) for c in self.per_class)])
        lines = [f"Downloaded into {self.dest} in {self.elapsed:.1f} s (manifest: {self.manifest})", ""]
        lines.append(f"  {'class':<{width}}  " + "  ".join(f"{c:>9}" for c in cols))
        for cls in sorted(self.per_class):
            counts = self.per_class[cls]
            lines.append(f"  {cls:<{width}}  " + "  ".join(f"{counts[c]:>9}" for c in cols))
        lines.append(f"  {'total':<{width}}  " + "  ".join(f"{getattr(self, c):>9}" for c in cols))
        if self.over_cap:
            lines.append(f"\n{self.over_cap} URLs not fetched: their class already has --max-pics images.")
        if self.filtered:
            lines.append(f"\n{self.filtered} URLs not fetched: their list gives no licence of --license.")
        if self.refused_address:
            lines.append(
                f"\n{self.refused_address} URLs refused: they lead to this machine, a private network or a "
                "cloud metadata address (reason in downloads.csv); --allow-private fetches from your own network."
            )
        if self.failures:
            lines.append("\nFailed by reason:")
            for kind, n in self.failures.most_common():
                label = FAILURE_LABELS.get(kind) or (f"HTTP {kind[5:]}" if kind.startswith("http_") else kind)
                lines.append(f"  {n:>6}  {kind:<14} {label}")
            lines.append(
                f"\n{self.failed} downloads failed (see the 'error' column of {self.manifest.name}); "
                "run the same command again to retry them."
            )
        elif self.saved or self.duplicate or self.refused:
            lines.append("\nNo download failed.")
        else:
            lines.append("\nNothing new to download.")
        return "\n".join(lines)
