"""Licences as data: one short code per licence however a provider spells it, the ``--license`` filter, and
the summary of a folder's licences that the model file and the report carry.

Providers spell the same licence many ways: Openverse says ``by-sa`` (with ``license_version``
``4.0``), Wikimedia Commons ``CC BY-SA 4.0``, a URL ``https://creativecommons.org/licenses/by-sa/4.0/``.
``license_code`` maps each to one code (``by-sa``), which is what ``--license`` compares and what
the summaries count; the text as the provider gave it stays in the CSV files.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from ursa.acquire.manifest import MANIFEST_NAME, read_manifest
from ursa.acquire.urls import DownloadError
from ursa.errors import UrsaError

# code -> how people write it. Creative Commons' six, CC0 and the Public Domain Mark, as Openverse names them.
LABELS = {
    "cc0": "CC0", "pdm": "Public Domain", "by": "CC BY", "by-sa": "CC BY-SA", "by-nd": "CC BY-ND",
    "by-nc": "CC BY-NC", "by-nc-sa": "CC BY-NC-SA", "by-nc-nd": "CC BY-NC-ND",
}
UNKNOWN = "unknown"  # no licence recorded for the image (not downloaded by ursa, or the list did not say)
_ALIASES = {
    "zero": "cc0", "cc-zero": "cc0", "publicdomain-zero": "cc0", "public-domain": "pdm", "pd": "pdm",
    "publicdomain": "pdm", "publicdomain-mark": "pdm", "public-domain-mark": "pdm", "mark": "pdm",
    "attribution": "by", "attribution-sharealike": "by-sa",
}
# CC's elements spelled out, and the code they make (by, then nc, then sa or nd), followed by a version or nothing.
_CC_WORDS = (("attribution", "by"), ("share-alike", "sa"), ("sharealike", "sa"), ("non-commercial", "nc"),
             ("noncommercial", "nc"), ("no-derivatives", "nd"), ("noderivatives", "nd"), ("no-derivs", "nd"),
             ("noderivs", "nd"))
_CC_ELEMENTS = re.compile(r"^by(-nc)?(-sa|-nd)?(?=[-,;]|$)")
_CC_LOOKALIKE = re.compile(r"^(cc|by)|^(sa|nc|nd|pd)([-\d]|$)")  # a code meant as a CC one (cco, ccby, sa)
_CC_URL = re.compile(r"creativecommons\.org/(?:licenses/(?P<lic>[a-z-]+)|publicdomain/(?P<pd>zero|mark))", re.I)


class LicenseError(UrsaError):
    """A ``--license`` filter that names no licence."""


def license_code(name: str, url: str = "") -> str:
    """One short code for a licence as any provider writes it (``CC BY-SA 4.0`` -> ``by-sa``); "" when neither says.

    A Creative Commons name is read by its elements whatever follows them (``CC BY-SA 3.0 igo``,
    ``CC BY 4.0 International``, ``cc-by-sa-2.5,2.0,1.0``, ``Creative Commons Attribution-ShareAlike 4.0``);
    a name that is no CC licence but comes with a CC deed's URL takes the URL's code.
    """
    s = re.sub(r"[\s_/]+", "-", (name or "").strip().lower()).strip("-")
    if s.startswith(("cc0", "cc-0", "cc-zero")):
        return "cc0"
    rest = re.sub(r"^(creative-commons|cc)-", "", s)
    if rest != s:  # the long names of the elements, as in "Creative Commons Attribution-NonCommercial 4.0"
        for long, short in _CC_WORDS:
            rest = rest.replace(long, short)
    m = _CC_ELEMENTS.match(rest)
    if m:
        return m.group(0)
    s = re.sub(r"-?\d+(\.\d+)*(-[a-z]{2})?$", "", s)  # the version, and a port such as 2.0-de
    s = re.sub(r"^(creative-commons|cc)-", "", s)
    s = _ALIASES.get(s, s)
    m = _CC_URL.search(url or "")
    if m and s not in LABELS:
        return m.group("lic").lower() if m.group("lic") else ("cc0" if m.group("pd").lower() == "zero" else "pdm")
    return s


def license_label(code: str) -> str:
    """How a code is shown in a summary: ``CC BY-SA`` for ``by-sa``; other codes as they are; "" as unknown."""
    return LABELS.get(code, code) if code else UNKNOWN


def parse_license_filter(text: str | Iterable[str] | None) -> frozenset[str]:
    """``--license cc0,by`` as a set of codes; empty (no filter) for None or ""."""
    if text is None:
        return frozenset()
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    codes = frozenset(license_code(p) for p in items if p.strip())
    if not codes and any(p.strip() for p in items):
        raise LicenseError(f"--license {text!r}: names no licence; expected codes such as cc0,by,by-sa")
    typos = sorted(c for c in codes if c not in LABELS and _CC_LOOKALIKE.match(c))
    if typos:  # "cco", "ccby", "sa": a filter no picture passes, which would silently drop every result
        raise LicenseError(f"--license {text!r}: {typos[0]!r} is no Creative Commons code; expected "
                           f"{', '.join(LABELS)} (or a licence name as a list writes it, such as gfdl)")
    return codes


def license_allowed(codes: frozenset[str], name: str, url: str = "") -> bool:
    """Whether a picture with this licence passes the filter (no filter: every picture; no licence: none)."""
    return not codes or license_code(name, url) in codes


def credits_by_file(root: str | Path, files: Iterable[str | Path] = ()) -> dict[Path, dict[str, str]]:
    """The saved rows of ``ROOT/downloads.csv`` by the image file they wrote (resolved path), credits included.

    Each of ``files`` found under no recorded path (moved to another class folder, renamed) is matched
    by its content: the sha256 download recorded (of the bytes as downloaded, so an image download or
    ``verify --fix`` re-encoded is matched by its path alone).
    """
    root = Path(root)
    rows = [r for r in read_manifest(root / MANIFEST_NAME) if r["status"] == "saved" and r["file"]]
    known = {(root / r["file"]).resolve(): r for r in rows}
    by_hash = {r["sha256"]: r for r in rows if r["sha256"]}
    for f in files:
        path = Path(f).resolve()
        if path not in known and by_hash:
            try:
                row = by_hash.get(hashlib.sha256(path.read_bytes()).hexdigest())
            except OSError:  # gone or unreadable: its licence stays unknown
                row = None
            if row is not None:
                known[path] = row
    return known


def license_summary(files: Iterable[str | Path], root: str | Path,
                    known: Mapping[Path, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """What licences these images are under, from ``ROOT/downloads.csv``: the model file's ``licenses`` field.

    ``{"images": n, "unknown": k, "by_license": {"CC BY": 12, ...}}`` (most common first); ``{}``
    when the folder has no downloads.csv (or one ursa did not write), so a model trained on pictures ursa did
    not download says nothing.
    """
    if known is None:
        if not (Path(root) / MANIFEST_NAME).is_file():
            return {}
        files = list(files)
        try:
            known = credits_by_file(root, files)
        except DownloadError:  # a downloads.csv ursa did not write: no record of these images' licences
            return {}
    counts: Counter[str] = Counter()
    n = 0
    for f in files:
        n += 1
        row = known.get(Path(f).resolve())
        counts[license_label(license_code(row.get("license", ""), row.get("license_url", ""))) if row else UNKNOWN] += 1
    unknown = counts.pop(UNKNOWN, 0)
    return {"images": n, "unknown": unknown, "by_license": dict(counts.most_common())}


def summary_line(summary: Mapping[str, Any]) -> str:
    """The summary as one line for the report and the console: ``120 images: CC BY 60, CC0 40, unknown 20``."""
    if not summary:
        return ""
    parts = [f"{k} {v}" for k, v in summary.get("by_license", {}).items()]
    if summary.get("unknown"):
        parts.append(f"{UNKNOWN} {summary['unknown']}")
    return f"{summary.get('images', 0)} images: " + (", ".join(parts) or "none")
