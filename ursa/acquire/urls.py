"""Per-class URL lists as the course's browser snippets save them, read into {class: [urls]}.

Accepted: one URL per line (blank lines, spaces, quotes, trailing commas, a BOM, lines escaped
by JavaScript's ``escape()``, ``#`` comments), or a CSV with a ``url`` column. Non-http lines are
kept so the run can record them as refused. A class comes from ``CLASS=FILE`` or from a file
named ``urls_<class>.txt`` / ``urls_<class>.csv``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from ursa.errors import UrsaError

_URL_FILE_RE = re.compile(r"urls?_(?P<cls>.+)\.(txt|csv)", re.IGNORECASE)
_ESCAPED_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.\-]*%3a", re.IGNORECASE)
_CSV_URL_HEADERS = ("url", "urls", "image_url", "image url")
# Where a picture comes from and under what licence: the columns `ursa search` writes after `url`, which
# download carries into downloads.csv and credits into CREDITS.md (empty when a list does not say).
CREDIT_COLUMNS = ("source_page", "creator", "license", "license_url", "provider")
SEARCH_COLUMNS = ("url", *CREDIT_COLUMNS)
Credit = dict  # {column of CREDIT_COLUMNS: text}; an empty dict when the list gives none
# user:password@ in a URL's authority (up to its last @): never written to downloads.csv nor printed
_CREDENTIALS_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s]*@")
REDACTED = "***"


def redacted(text: str) -> str:
    """A URL (or a message holding URLs) with any user name and password replaced by ***: safe to write and show."""
    return _CREDENTIALS_RE.sub(rf"\1{REDACTED}@", text) if "@" in text else text


class DownloadError(UrsaError):
    """The download input (a URL list, a CLASS=FILE pair, an option) cannot be used as given."""


def clean_url_line(raw: str) -> str:
    """Undo what browser snippets do to a URL line: spaces, quotes, trailing commas, %-escaping."""
    s = raw.strip().strip("\ufeff").strip()
    if s[:1] in ("'", '"'):
        s = s.rstrip(",;").strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in ("'", '"'):
        s = s[1:-1].strip()
    if s.startswith("#"):
        return ""
    if _ESCAPED_SCHEME_RE.match(s):  # a whole line escaped by JS escape(): https%3A//...
        s = unquote(s).strip()
    return s


def _csv_url_column(lines: Sequence[str]) -> tuple[int, int, Any] | None:
    """Find a CSV header with a url column: (header line index, column index, dialect), or None."""
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if line.strip().strip("\ufeff\"'").lower() in _CSV_URL_HEADERS:
            return i, 0, csv.excel  # a one-column CSV: just a "url" header line
        if "," not in line and ";" not in line and "\t" not in line:
            return None
        try:  # the delimiter alone: from a header line the sniffer cannot judge quoting, and its guess
            # (doublequote off) would read a cell holding "" (a quote in a creator's name) shifted into the next columns
            delimiter = csv.Sniffer().sniff(line, delimiters=",;\t").delimiter
        except csv.Error:
            delimiter = ","
        dialect: Any = type("UrlListDialect", (csv.excel,), {"delimiter": delimiter})
        names = [h.strip().strip("\ufeff").lower() for h in next(csv.reader([line], dialect))]
        for wanted in _CSV_URL_HEADERS:
            if wanted in names:
                return i, names.index(wanted), dialect
        return None  # the first line is data (a plain list whose URL holds a comma)
    return None


def url_rows(text: str) -> list[tuple[str, Credit]]:
    """The unique URLs of a URL list in file order, each with the credit columns its CSV row gives (or {})."""
    lines = text.splitlines()
    found = _csv_url_column(lines)
    candidates: list[tuple[str, Credit]]
    if found is not None:
        header_at, col, dialect = found
        names = [h.strip().strip("\ufeff").lower() for h in next(csv.reader([lines[header_at]], dialect))]
        wanted = {c: names.index(c) for c in CREDIT_COLUMNS if c in names}
        body = [ln for ln in lines[header_at + 1 :] if ln.strip()]
        candidates = [(row[col], {c: row[i].strip() for c, i in wanted.items() if i < len(row) and row[i].strip()})
                      for row in csv.reader(body, dialect) if len(row) > col]
    else:
        candidates = [(line, {}) for line in lines]
    seen: set[str] = set()
    out: list[tuple[str, Credit]] = []
    for raw, credit in candidates:
        url = clean_url_line(raw)
        if url and url not in seen:
            seen.add(url)
            out.append((url, credit))
    return out


def parse_url_text(text: str) -> list[str]:
    """Turn the text of a URL list into unique URLs in file order (non-http lines kept, to be refused)."""
    return [url for url, _ in url_rows(text)]


def _port_problem(netloc: str) -> str | None:
    """Why the port of host[:port] cannot be used, or None (no port, or a number in 1-65535)."""
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):
        port = hostport.partition("]")[2]
        if port and not port.startswith(":"):
            return f"text after the IPv6 address {hostport!r}; write http://[ADDRESS]:PORT/..."
        port = port[1:]
    else:
        port = hostport.rpartition(":")[2] if ":" in hostport else ""
    if not port:
        return None
    if not port.isdigit():
        return f"port {port!r} is not a number"
    if not 1 <= int(port) <= 65535:
        return f"port {int(port)} is out of range 1-65535"
    return None


def url_problem(url: str) -> tuple[str, str] | None:
    """Why a URL cannot be downloaded, as (status, reason): 'refused' for a scheme, 'failed' for a malformed URL."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. http://[::1/x.jpg: an unclosed IPv6 bracket
        return "failed", f"malformed URL ({e})"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        what = f"{scheme}: URL" if scheme else "no scheme (not a full URL)"
        return "refused", f"{what}; only http and https are downloaded"
    port = _port_problem(parts.netloc)
    if port:
        return "failed", f"malformed URL: {port}"
    try:
        host = parts.hostname
    except ValueError as e:
        return "failed", f"malformed URL ({e})"
    if not host:
        return "failed", "malformed URL: no host name after http(s)://"
    if any(c.isspace() or ord(c) < 32 for c in host):
        return "failed", f"malformed URL: the host name {host!r} contains spaces or control characters"
    try:
        import httpx

        httpx.URL(url).host  # what the request will parse: catches bad IDNA names, bad IPv6 literals
    except (httpx.InvalidURL, ValueError) as e:  # IDNA errors are UnicodeErrors, hence ValueErrors
        return "failed", f"malformed URL ({e})"
    return None


def read_url_file(path: str | Path) -> list[tuple[str, Credit]]:
    """One URL list as the browser snippets (or `ursa search`) save it: (url, credit) pairs."""
    p = Path(path)
    if not p.is_file():
        raise DownloadError(f"{p}: URL file not found; save the image-search URLs there first")
    return url_rows(p.read_bytes().decode("utf-8-sig", errors="replace"))


def parse_url_file(path: str | Path) -> list[str]:
    """Read one URL list as the browser snippets save it (plain lines or a CSV with a url column)."""
    return [url for url, _ in read_url_file(path)]


def check_class_name(cls: str, spec: str) -> str:
    """Refuse a class name that is not one plain folder name, since it becomes DEST/<class>/."""
    cls = cls.strip()
    if not cls or cls in (".", "..") or cls[0] in "._" or any(c in cls for c in "/\\\0"):
        raise DownloadError(
            f"{spec}: {cls!r} is not a usable class name; use a plain folder name such as "
            "grizzly=urls_grizzly.txt (no slashes, not starting with '.' or '_')"
        )
    return cls


def parse_source(spec: str | Path) -> tuple[str, Path]:
    """Split one command-line URL source into (class, file): ``CLASS=FILE`` or ``urls_<class>.txt``."""
    s = str(spec)
    p = Path(s)
    if "=" in s and not p.exists():
        cls, _, file = s.partition("=")
        cls = check_class_name(cls, s)
        if not file.strip():
            raise DownloadError(f"{s}: no file after '='; write CLASS=FILE, e.g. grizzly=urls_grizzly.txt")
        p = Path(file.strip())
    else:
        m = _URL_FILE_RE.fullmatch(p.name)
        if not m:
            raise DownloadError(
                f"{s}: cannot tell the class from this file name; name it urls_<class>.txt "
                f"or write CLASS=FILE (e.g. grizzly={s})"
            )
        cls = check_class_name(m.group("cls"), s)
    if not p.is_file():
        raise DownloadError(f"{p}: URL file not found (from {s!r}); check the path")
    return cls, p


def load_url_lists(url_files: Mapping[str, Any] | Iterable[str | Path]) -> dict[str, list[str]]:
    """Resolve every accepted input form to {class: [urls]}, failing early on a bad or empty list."""
    return read_url_sources(url_files)[0]


def read_url_sources(
    url_files: Mapping[str, Any] | Iterable[str | Path],
) -> tuple[dict[str, list[str]], dict[tuple[str, str], Credit]]:
    """``load_url_lists``' {class: [urls]} and the credit columns of each (class, url) whose list gives them."""
    if isinstance(url_files, Mapping):
        pairs: list[tuple[str, Any]] = [(check_class_name(str(k), str(k)), v) for k, v in url_files.items()]
    else:
        pairs = [parse_source(s) for s in url_files]
    if not pairs:
        raise DownloadError("no URL lists given; pass urls_<class>.txt files or CLASS=FILE pairs")
    out: dict[str, list[str]] = {}
    credits: dict[tuple[str, str], Credit] = {}
    for cls, src in pairs:
        if isinstance(src, (str, Path)):
            rows = read_url_file(src)
            where = str(src)
        else:
            rows = [(u, {}) for u in (clean_url_line(str(x)) for x in src) if u]
            where = f"the URL list for {cls}"
        urls = [u for u, _ in rows]
        credits.update({(cls, u): c for u, c in rows if c})
        if not urls:
            raise DownloadError(
                f"{where}: no URLs found; expected one URL per line or a CSV with a 'url' column"
            )
        merged = out.setdefault(cls, [])  # the same class given twice: one list, no repeats
        known = set(merged)
        for u in urls:
            if u not in known:
                known.add(u)
                merged.append(u)
    return out, credits
