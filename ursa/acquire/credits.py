"""`ursa credits DIR`: CREDITS.md for the images a data folder holds now, from what downloads.csv recorded.

Only images still in their class folders are credited: those ``verify`` quarantined (moved away)
are gone from there, and when ``DIR/cleaned.csv`` exists (``ursa clean``) only the images it lists
(the ones not excluded). An image in a class folder with no row in downloads.csv (copied in by
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
    """Text safe inside a Markdown table cell: one line, Markdown's characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def md_link(label: str, url: str) -> str:
    """``[label](url)`` for an http(s) URL (spaces and brackets encoded); the label alone otherwise."""
    if not url.lower().startswith(("http://", "https://")):
        return md(label)
    return f"[{md(label)}]({quote(url, safe=':/?#&=%+@;,.~-_')})"


def kept_images(root: Path) -> list[Path]:
    """The images in the class folders now, restricted to cleaned.csv's names when `ursa clean` wrote one."""
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(("_", "."))]
    files = [f for d in folders for f in sorted(d.rglob("*")) if f.is_file() and is_image_file(f)]
    cleaned = root / CLEANED_NAME
    if cleaned.is_file():
        with open(cleaned, newline="", encoding="utf-8-sig", errors=NAME_ERRORS) as fh:
            names = {csv_cell_value((r.get("name") or "").strip()) for r in csv.DictReader(fh)}
        keep = {(root / n).resolve() for n in names if n}
        files = [f for f in files if f.resolve() in keep]
    return files


def write_credits(root: str | Path, out: str | Path | None = None) -> CreditsSummary:
    """Write CREDITS.md (default ``ROOT/CREDITS.md``) for the images kept in ROOT; refuses a file ursa did not write."""
    root = Path(root)
    if not root.is_dir():
        raise CreditsError(f"{root}: not a folder; give the folder `ursa download --dest` wrote")
    if not (root / MANIFEST_NAME).is_file():
        raise CreditsError(f"{root}: no {MANIFEST_NAME} there, so no record of where its images came from; "
                          "give the folder `ursa download --dest` wrote")
    out = Path(out) if out is not None else root / CREDITS_NAME
    if out.exists() and MARK not in out.read_text(encoding="utf-8", errors="replace")[:400]:
        raise CreditsError(f"{out}: exists and was not written by `ursa credits`; move it away or give another --out")
    known = credits_by_file(root)
    summary = CreditsSummary(out)
    body: dict[str, list[str]] = {}
    for f in kept_images(root):
        rel = f.relative_to(root).as_posix()
        row = known.get(f.resolve())
        code = license_code(row["license"], row["license_url"]) if row else ""
        summary.images += 1
        summary.by_license[license_label(code)] += 1
        summary.per_class[rel.split("/")[0]] += 1
        if row is None:
            cells = [md(rel), "", f"{UNKNOWN} (no row in {MANIFEST_NAME})", ""]
        else:
            shown = row["license"] or (license_label(code) if code else UNKNOWN)
            cells = [md(rel), md(row["creator"]), md_link(shown, row["license_url"]),
                     md_link("source", row["source_page"] or row["url"])]
        body.setdefault(rel.split("/")[0], []).append("| " + " | ".join(cells) + " |")
    lines = [MARK, "", "# Image credits", "",
             f"The {summary.images} images in `{md(root.name)}`'s class folders, with their creators and licences as "
             f"the search provider gave them ({MANIFEST_NAME}). Check each licence's terms before you publish them.",
             "", "| licence | images |", "|---|---|"]
    lines += [f"| {md(lic)} | {n} |" for lic, n in summary.by_license.most_common()]
    for cls, rows in body.items():
        lines += ["", f"## {md(cls)} ({len(rows)})", "", "| file | creator | licence | source |", "|---|---|---|---|",
                  *rows]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return summary
