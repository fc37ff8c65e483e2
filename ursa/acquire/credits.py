"""`ursa credits DIR`: CREDITS.md for the images a data folder holds now, from what downloads.csv recorded.

Only images still in their class folders are credited: those ``verify`` quarantined (moved away)
are gone from there, and when ``DIR/cleaned.csv`` exists (``ursa clean``) only the images it lists
(the ones not excluded), each under the label it gives. An image moved or renamed since the download
is found by its content (the sha256 downloads.csv recorded); one with no row there (copied in by
hand) is listed with its licence unknown, so nothing is silently claimed as free to use.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ursa.acquire.licenses import UNKNOWN, credits_by_file, license_code, license_label
from ursa.acquire.manifest import MANIFEST_NAME
from ursa.errors import UrsaError
from ursa.util.files import NAME_ERRORS, atomic_write_text, csv_cell_value
from ursa.util.names import printable
from ursa.vision.images import is_image_file

CREDITS_NAME = "CREDITS.md"
MARK = "<!-- written by `ursa credits`: run it again to update this file -->"
CLEANED_NAME = "cleaned.csv"  # `ursa clean`'s list of the images not excluded (name,label)


class CreditsError(UrsaError):
    """A folder credits cannot be written for (no downloads.csv), or a CREDITS.md ursa did not write."""


@dataclass
class CreditsSummary:
    """What CREDITS.md says: images credited per licence, per class, and where it was written."""

    out: Path
    images: int = 0
    by_license: Counter = field(default_factory=Counter)
    per_class: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {"out": str(self.out), "images": self.images, "by_license": dict(self.by_license.most_common()),
                "per_class": dict(self.per_class)}

    def format(self) -> str:
        """One line per licence and where the file is."""
        lines = [f"Credited {self.images} images in {self.out}"]
        lines += [f"  {n:>6}  {lic}" for lic, n in self.by_license.most_common()]
        return "\n".join(lines)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, control characters visibly escaped, Markdown's escaped."""
    return _MD_SPECIAL.sub(r"\\\1", printable(" ".join(str(text).split())))


def md_link(label: str, url: str) -> str:
    """``[label](url)`` for an http(s) URL (spaces and brackets encoded); the label alone otherwise."""
    if not url.lower().startswith(("http://", "https://")):
        return md(label)
    return f"[{md(label)}]({quote(url, safe=':/?#&=%+@;,.~-_')})"


def kept_images(root: Path) -> dict[Path, str]:
    """The images in the class folders now, each with its class: restricted to cleaned.csv's names, under the
    label it gives (a picture the cleaner relabelled is credited under its new class), when `ursa clean` wrote one."""
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(("_", "."))]
    files = {f: f.relative_to(root).parts[0] for d in folders for f in sorted(d.rglob("*"))
             if f.is_file() and is_image_file(f)}
    cleaned = root / CLEANED_NAME
    if cleaned.is_file():
        with open(cleaned, newline="", encoding="utf-8-sig", errors=NAME_ERRORS) as fh:
            reader = csv.DictReader(fh)
            cols = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            if "name" not in cols:
                raise CreditsError(f"{cleaned}: no 'name' column (found: {', '.join(cols) or 'none'}); expected "
                                   "`ursa clean`'s list of the images kept (name,label): move it away or fix it")
            label = {(root / csv_cell_value((r.get(cols["name"]) or "").strip())).resolve():
                     csv_cell_value((r.get(cols.get("label", "")) or "").strip())
                     for r in reader if (r.get(cols["name"]) or "").strip()}
        files = {f: label[f.resolve()] or cls for f, cls in files.items() if f.resolve() in label}
    return files


def _written_by_credits(path: Path) -> bool:
    """A regular file that starts with MARK (its first bytes alone are read: --out /dev/zero reads forever)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return MARK in f.read(400).decode("utf-8", errors="replace")


def write_credits(root: str | Path, out: str | Path | None = None) -> CreditsSummary:
    """Write CREDITS.md (default ``ROOT/CREDITS.md``) for the images kept in ROOT; refuses a file ursa did not write."""
    root = Path(root)
    if not root.is_dir():
        raise CreditsError(f"{root}: not a folder; give the folder `ursa download --dest` wrote")
    if not (root / MANIFEST_NAME).is_file():
        raise CreditsError(f"{root}: no {MANIFEST_NAME} there, so no record of where its images came from; "
                          "give the folder `ursa download --dest` wrote")
    out = Path(out) if out is not None else root / CREDITS_NAME
    if (out.exists() or out.is_symlink()) and not _written_by_credits(out):
        raise CreditsError(f"{out}: exists and was not written by `ursa credits`; move it away or give another --out")
    kept = kept_images(root)
    known = credits_by_file(root, kept)
    summary = CreditsSummary(out)
    body: dict[str, list[str]] = {}
    for f, cls in kept.items():
        rel = f.relative_to(root).as_posix()
        row = known.get(f.resolve())
        code = license_code(row["license"], row["license_url"]) if row else ""
        summary.images += 1
        summary.by_license[license_label(code)] += 1
        summary.per_class[cls] += 1
        if row is None:
            cells = [md(rel), "", f"{UNKNOWN} (no row in {MANIFEST_NAME})", ""]
        else:
            shown = row["license"] or (license_label(code) if code else UNKNOWN)
            cells = [md(rel), md(row["creator"]), md_link(shown, row["license_url"]),
                     md_link("source", row["source_page"] or row["url"])]
        body.setdefault(cls, []).append("| " + " | ".join(cells) + " |")
    lines = [MARK, "", "# Image credits", "",
             f"The {summary.images} images in `{md(root.name)}`'s class folders, with their creators and licences as "
             f"the search provider gave them ({MANIFEST_NAME}). Check each licence's terms before you publish them.",
             "", "| licence | images |", "|---|---|"]
    lines += [f"| {md(lic)} | {n} |" for lic, n in summary.by_license.most_common()]
    for cls, rows in sorted(body.items()):
        lines += ["", f"## {md(cls)} ({len(rows)})", "", "| file | creator | licence | source |", "|---|---|---|---|",
                  *rows]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return summary
