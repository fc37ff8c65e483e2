"""Download the images behind per-class URL lists, so a user never has to guess what happened.

The lesson saves image-search URLs into ``urls_<class>.txt`` files and downloads them. Here:

* every URL ends up as exactly one row of ``DEST/downloads.csv`` (saved, duplicate, failed or
  refused, with the HTTP status and a reason), appended as it completes, so a killed run
  loses nothing and a second run resumes where the first stopped;
* images land in ``DEST/<class>/00000000.jpg``... written to a temporary name and renamed, so
  there is never a partial image; the extension is the real format sniffed from the bytes
  (``.jpg``, ``.png``, ``.gif``, ``.webp``...), or ``.jpg`` when the image was shrunk;
* the type is decided from the bytes and a full decode (``ursa.vision.images.open_image``), never
  from the Content-Type header: an HTML page is a failure, not a file;
* fetching is concurrent (asyncio + httpx) and polite: at most ``per_host`` requests to one
  host at a time, retries with backoff on timeouts, 429 (honouring Retry-After, capped) and
  5xx, a size cap checked while streaming, and a deadline per URL;
* identical content within a class is stored once (sha256) and recorded as ``duplicate``.

Failed URLs are retried on the next run (``retry_failed=False`` keeps them as they are);
saved, duplicate and refused URLs are never fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import email.utils
import hashlib
import io
import json
import os
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from ursa.errors import ImageError, UrsaError
from ursa.vision.images import MAX_PIXELS, open_image, sniff_format

MANIFEST_NAME = "downloads.csv"
MANIFEST_COLUMNS = ("url", "class", "file", "status", "http_status", "error", "bytes", "sha256")
STATUSES = ("saved", "duplicate", "failed", "refused")
DONE_STATUSES = frozenset({"saved", "duplicate", "refused"})
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
USER_AGENT = "Mozilla/5.0 (compatible; ursa-download/0.1; image classifier course tool)"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_URL_FILE_RE = re.compile(r"urls?_(?P<cls>.+)\.(txt|csv)", re.IGNORECASE)
_ESCAPED_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.\-]*%3a", re.IGNORECASE)
_NAME_RE = re.compile(r"(\d{8})\.[A-Za-z0-9]+")
_CSV_URL_HEADERS = ("url", "urls", "image_url", "image url")

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


class DownloadError(UrsaError):
    """The download input (a URL list, a CLASS=FILE pair, an option) cannot be used as given."""


# ----------------------------------------------------------------------------- URL lists


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
        try:
            dialect: Any = csv.Sniffer().sniff(line, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        names = [h.strip().strip("\ufeff").lower() for h in next(csv.reader([line], dialect))]
        for wanted in _CSV_URL_HEADERS:
            if wanted in names:
                return i, names.index(wanted), dialect
        return None  # the first line is data (a plain list whose URL holds a comma)
    return None


def parse_url_text(text: str) -> list[str]:
    """Turn the text of a URL list into unique URLs in file order (non-http lines kept, to be refused)."""
    lines = text.splitlines()
    found = _csv_url_column(lines)
    if found is not None:
        header_at, col, dialect = found
        body = [ln for ln in lines[header_at + 1 :] if ln.strip()]
        candidates = [row[col] for row in csv.reader(body, dialect) if len(row) > col]
    else:
        candidates = lines
    seen: set[str] = set()
    urls: list[str] = []
    for raw in candidates:
        url = clean_url_line(raw)
        if url and url not in seen:
            seen.add(url)
            urls.append(url)
    return urls


def parse_url_file(path: str | Path) -> list[str]:
    """Read one URL list as the browser snippets save it (plain lines or a CSV with a url column)."""
    p = Path(path)
    if not p.is_file():
        raise DownloadError(f"{p}: URL file not found; save the image-search URLs there first")
    return parse_url_text(p.read_bytes().decode("utf-8-sig", errors="replace"))


def _check_class_name(cls: str, spec: str) -> str:
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
        cls = _check_class_name(cls, s)
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
        cls = _check_class_name(m.group("cls"), s)
    if not p.is_file():
        raise DownloadError(f"{p}: URL file not found (from {s!r}); check the path")
    return cls, p


def load_url_lists(url_files: Mapping[str, Any] | Iterable[str | Path]) -> dict[str, list[str]]:
    """Resolve every accepted input form to {class: [urls]}, failing early on a bad or empty list."""
    if isinstance(url_files, Mapping):
        pairs: list[tuple[str, Any]] = [(_check_class_name(str(k), str(k)), v) for k, v in url_files.items()]
    else:
        pairs = [parse_source(s) for s in url_files]
    if not pairs:
        raise DownloadError("no URL lists given; pass urls_<class>.txt files or CLASS=FILE pairs")
    out: dict[str, list[str]] = {}
    for cls, src in pairs:
        if isinstance(src, (str, Path)):
            urls = parse_url_file(src)
            where = str(src)
        else:
            urls = [u for u in (clean_url_line(str(x)) for x in src) if u]
            where = f"the URL list for {cls}"
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
    return out


def parse_size(text: str | int) -> int:
    """Read a byte size like 20MB, 512KB, 1.5GB or 1000000 (KB/MB/GB are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?i?b?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise DownloadError(f"--max-bytes {text!r}: write a size such as 20MB, 500KB or 1000000")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    return int(float(m.group(1)) * mult)


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Read downloads.csv, dropping a torn last line left by a killed run."""
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]  # a kill mid-write: the last line is incomplete
    lines = raw.decode("utf-8", errors="replace").splitlines()
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    if tuple(header) != MANIFEST_COLUMNS:
        raise DownloadError(
            f"{p}: not an ursa download manifest (columns {','.join(header)}); "
            "move it away or choose another --dest"
        )
    rows = []
    for row in csv.reader(lines[1:]):
        if len(row) == len(MANIFEST_COLUMNS) and row[3] in STATUSES:
            rows.append(dict(zip(MANIFEST_COLUMNS, row)))
    return rows


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _write_file_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temp name, fsync, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ManifestWriter:
    """Append one CSV line per finished URL with a single write; fsync at most once a second."""

    def __init__(self, path: Path, keep: list[dict[str, str]], rewrite: bool) -> None:
        self.path = path
        if rewrite or not path.exists():
            text = _csv_line(MANIFEST_COLUMNS) + "".join(_csv_line([r[c] for c in MANIFEST_COLUMNS]) for r in keep)
            _write_file_atomic(path, text.encode("utf-8"))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.synced = time.monotonic()

    def write(self, row: Mapping[str, Any]) -> None:
        values = ["" if row.get(c) is None else row.get(c) for c in MANIFEST_COLUMNS]
        os.write(self.fd, _csv_line(values).encode("utf-8"))
        if time.monotonic() - self.synced > 1.0:
            os.fsync(self.fd)
            self.synced = time.monotonic()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


# ----------------------------------------------------------------------------- summary


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
    failures: Counter = field(default_factory=Counter)  # failure kind -> count
    per_class: dict[str, Counter] = field(default_factory=dict)
    elapsed: float = 0.0

    def add(self, cls: str, status: str, kind: str | None = None) -> None:
        setattr(self, status, getattr(self, status) + 1)
        self.per_class.setdefault(cls, Counter())[status] += 1
        if kind:
            self.failures[kind] += 1

    @property
    def images_per_s(self) -> float:
        return self.saved / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dest": str(self.dest),
            "manifest": str(self.manifest),
            "saved": self.saved,
            "duplicate": self.duplicate,
            "failed": self.failed,
            "refused": self.refused,
            "skipped": self.skipped,
            "over_cap": self.over_cap,
            "failures": dict(self.failures.most_common()),
            "per_class": {k: dict(v) for k, v in self.per_class.items()},
            "elapsed_s": round(self.elapsed, 3),
        }

    def to_json(self) -> str:
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


# ----------------------------------------------------------------------------- fetching


@dataclass
class _Options:
    timeout: float
    deadline: float
    retries: int
    backoff: float
    max_retry_after: float
    max_bytes: int
    max_size: int
    max_pixels: int


@dataclass
class _Fetched:
    data: bytes | None
    http_status: int | None
    kind: str | None = None
    detail: str = ""
    content_type: str = ""


@dataclass
class _Prepared:
    sha256: str
    out: bytes
    file_sha256: str
    ext: str


@dataclass
class _ClassState:
    saved: int
    next_index: int
    hashes: dict[str, str]  # sha256 of downloaded bytes -> file (relative to dest)
    orphans: dict[str, str]  # sha256 of file bytes -> file, for files a killed run left unrecorded
    inflight: int = 0
    cond: asyncio.Condition | None = None


class _Retry(Exception):
    def __init__(self, fetched: _Fetched, wait: float | None = None) -> None:
        self.fetched = fetched
        self.wait = wait


def _retry_after_seconds(value: str | None) -> float | None:
    """Read Retry-After as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _one_line(text: object, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _describe_transport_error(e: BaseException) -> str:
    """Name the root cause of a network error (httpx wraps it two or three levels deep)."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(x, ConnectionResetError) for x in chain):
        return "connection reset by peer"
    if any(isinstance(x, ConnectionRefusedError) for x in chain):
        return "connection refused"
    for x in chain:
        text = _one_line(x)
        if text:
            return f"{text} ({type(e).__name__})"
    return f"connection lost ({type(e).__name__})"


async def _attempt(client: Any, url: str, opt: _Options) -> _Fetched:
    """One GET, streamed under the size cap; raises _Retry for what is worth trying again."""
    import httpx

    received = 0
    expected: int | None = None
    try:
        async with client.stream("GET", url) as resp:
            status = resp.status_code
            ctype = resp.headers.get("content-type", "")
            if status in RETRY_STATUSES:
                kind = "rate_limited" if status == 429 else ("timeout" if status == 408 else f"http_{status}")
                wait = _retry_after_seconds(resp.headers.get("retry-after")) if status in (429, 503) else None
                raise _Retry(_Fetched(None, status, kind, f"HTTP {status} {resp.reason_phrase}".strip()), wait)
            if status >= 400:
                return _Fetched(None, status, f"http_{status}", f"HTTP {status} {resp.reason_phrase}".strip())
            length = resp.headers.get("content-length")
            if length and length.isdigit():
                expected = int(length)
                if expected > opt.max_bytes:
                    return _Fetched(
                        None, status, "too_large", f"Content-Length {expected:,} bytes is over --max-bytes {opt.max_bytes:,}"
                    )
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                received = len(buf)
                if received > opt.max_bytes:
                    return _Fetched(None, status, "too_large", f"over --max-bytes {opt.max_bytes:,} while downloading")
            return _Fetched(bytes(buf), status, content_type=ctype)
    except _Retry:
        raise
    except httpx.TooManyRedirects:
        return _Fetched(None, None, "redirect", "too many redirects (a redirect loop?)")
    except httpx.UnsupportedProtocol as e:
        return _Fetched(None, None, "redirect", f"redirected to a URL that is not http(s): {_one_line(e)}")
    except (httpx.InvalidURL, httpx.LocalProtocolError) as e:
        return _Fetched(None, None, "bad_url", _one_line(e) or "malformed URL")
    except httpx.TimeoutException as e:
        raise _Retry(_Fetched(None, None, "timeout", f"no answer within {opt.timeout:g} s ({type(e).__name__})"))
    except httpx.RemoteProtocolError as e:
        if expected is not None and received < expected:
            detail = f"connection closed after {received:,} of {expected:,} bytes"
            raise _Retry(_Fetched(None, None, "truncated", detail))
        raise _Retry(_Fetched(None, None, "connection", _one_line(e) or "server closed the connection"))
    except (httpx.TransportError, OSError) as e:
        raise _Retry(_Fetched(None, None, "connection", _describe_transport_error(e)))


async def _fetch(client: Any, url: str, host_sem: asyncio.Semaphore, opt: _Options) -> _Fetched:
    """Fetch with retries and backoff, never more than the per-host limit, within the URL deadline."""
    loop = asyncio.get_running_loop()
    deadline_at: float | None = None
    last = _Fetched(None, None, "timeout", "not attempted")
    attempts = opt.retries + 1
    for attempt in range(attempts):
        wait: float | None = None
        async with host_sem:
            if deadline_at is None:
                deadline_at = loop.time() + opt.deadline  # the clock starts once a host slot is free
            try:
                async with asyncio.timeout_at(deadline_at):
                    return await _attempt(client, url, opt)
            except _Retry as r:
                last, wait = r.fetched, r.wait
            except TimeoutError:
                return _Fetched(None, None, "timeout", f"no complete answer within the {opt.deadline:g} s deadline")
        if attempt == attempts - 1:
            break
        if wait is None:
            wait = opt.backoff * (2**attempt) * (1 + 0.25 * random.random())
        else:
            wait = min(wait, opt.max_retry_after)
        if loop.time() + wait >= deadline_at:
            last.detail += f"; a retry in {wait:.1f} s would pass the {opt.deadline:g} s deadline"
            return last
        await asyncio.sleep(wait)
    if attempts > 1:
        last.detail += f" (after {attempts} attempts)"
    return last


def _describe_non_image(data: bytes, content_type: str) -> str:
    head = data[:512].lstrip().lower()
    said = f" (server said Content-Type {content_type})" if content_type else ""
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return f"an HTML page, not an image{said}"
    if head.startswith((b"<", b"{", b"[")):
        return f"text ({head[:20]!r}...), not an image{said}"
    return f"unknown content starting {data[:8]!r}, not an image{said}"


def _prepare(data: bytes, content_type: str, opt: _Options) -> _Prepared:
    """Decide from the bytes whether this is an image, decode it fully, and shrink it if asked."""
    if not data:
        raise ImageError("<download>", "empty response (0 bytes)", "empty")
    if sniff_format(data[:16]) is None:
        raise ImageError("<download>", _describe_non_image(data, content_type), "not_image")
    im, info = open_image(data, max_pixels=opt.max_pixels, with_info=True)  # type: ignore[misc]
    sha = hashlib.sha256(data).hexdigest()
    if opt.max_size and max(info.size) > opt.max_size:
        from PIL import Image

        im.thumbnail((opt.max_size, opt.max_size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out = buf.getvalue()
        return _Prepared(sha, out, hashlib.sha256(out).hexdigest(), ".jpg")
    return _Prepared(sha, data, sha, EXTENSIONS.get(info.format, ".jpg"))


# ----------------------------------------------------------------------------- the run


def make_progress(unit: str) -> Any:
    """A rich progress bar on stderr with count, rate and ETA (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:6.1f} {unit}/s" if speed else f"     - {unit}/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeRemainingColumn(), console=Console(stderr=True),
    )


def _interleave_by_host(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Round-robin over hosts so the per-host limit never idles the workers while others wait."""
    groups: dict[str, deque[tuple[str, str]]] = {}
    for item in items:
        groups.setdefault(urlsplit(item[1]).netloc.lower(), deque()).append(item)
    out: list[tuple[str, str]] = []
    queues = list(groups.values())
    while queues:
        for q in queues:
            out.append(q.popleft())
        queues = [q for q in queues if q]
    return out


class _HostPool:
    """One semaphore and one small httpx client per host.

    The semaphore keeps at most ``per_host`` requests on a site. A client per host (sharing
    one SSL context) keeps each connection pool small: httpcore scans every pooled connection
    on every request, which costs more CPU than the download itself once a pool holds dozens.
    """

    def __init__(self, per_host: int, timeout: float) -> None:
        import httpx

        self.per_host = per_host
        self.ssl = httpx.create_ssl_context()
        self.timeout = httpx.Timeout(timeout, pool=None)
        self.hosts: dict[str, tuple[Any, asyncio.Semaphore]] = {}

    def get(self, url: str) -> tuple[Any, asyncio.Semaphore]:
        import httpx

        host = urlsplit(url).netloc.lower()
        if host not in self.hosts:
            client = httpx.AsyncClient(
                follow_redirects=True, max_redirects=5, timeout=self.timeout, verify=self.ssl,
                limits=httpx.Limits(max_connections=self.per_host, max_keepalive_connections=self.per_host),
                headers={"User-Agent": USER_AGENT},
            )
            self.hosts[host] = (client, asyncio.Semaphore(self.per_host))
        return self.hosts[host]

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client, _ in self.hosts.values()), return_exceptions=True)


def _scan_class(dest: Path, cls: str, rows: list[dict[str, str]]) -> _ClassState:
    """Rebuild a class's state from its manifest rows and folder; clean what a killed run left."""
    folder = dest / cls
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*.part"):
        tmp.unlink(missing_ok=True)
    indexes = [-1]
    recorded: set[str] = set()
    hashes: dict[str, str] = {}
    saved = 0
    for r in rows:
        if r["class"] != cls or not r["file"]:
            continue
        m = _NAME_RE.fullmatch(Path(r["file"]).name)
        if m:
            indexes.append(int(m.group(1)))
        if r["status"] == "saved":
            recorded.add(r["file"])
            if r["sha256"]:
                hashes.setdefault(r["sha256"], r["file"])
            if (dest / r["file"]).exists():
                saved += 1
    orphans: dict[str, str] = {}
    for f in folder.iterdir():
        m = _NAME_RE.fullmatch(f.name)
        if not m or not f.is_file():
            continue
        indexes.append(int(m.group(1)))
        rel = f"{cls}/{f.name}"
        if rel not in recorded:
            orphans.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), rel)
    return _ClassState(saved, max(indexes) + 1, hashes, orphans)


async def _run(
    items: list[tuple[str, str]],
    states: dict[str, _ClassState],
    dest: Path,
    writer: _ManifestWriter,
    summary: DownloadSummary,
    opt: _Options,
    workers: int,
    per_host: int,
    max_pics: int,
    progress: Any,
) -> None:
    for st in states.values():
        st.cond = asyncio.Condition()
    hosts = _HostPool(per_host, opt.timeout)
    queue = deque(_interleave_by_host(items))
    task_id = progress.add_task("downloading", total=len(queue)) if progress else None

    def record(cls: str, url: str, status: str, *, file: str = "", http_status: int | None = None,
               kind: str | None = None, detail: str = "", nbytes: int | None = None, sha: str = "") -> None:
        error = f"{kind}: {_one_line(detail)}" if kind else ""
        writer.write({"url": url, "class": cls, "file": file, "status": status, "http_status": http_status,
                      "error": error, "bytes": nbytes, "sha256": sha})
        summary.add(cls, status, kind if status == "failed" else None)

    def advance() -> None:
        if progress:
            progress.update(
                task_id, advance=1,
                description=f"saved {summary.saved} · dup {summary.duplicate} · failed {summary.failed}",
            )

    async def handle(cls: str, url: str) -> None:
        st = states[cls]
        assert st.cond is not None
        if max_pics:
            async with st.cond:
                await st.cond.wait_for(lambda: st.saved + st.inflight < max_pics or st.inflight == 0)
                if st.saved >= max_pics:
                    summary.over_cap += 1
                    return
                st.inflight += 1
        try:
            client, sem = hosts.get(url)
            got = await _fetch(client, url, sem, opt)
            if got.data is None:
                record(cls, url, "failed", http_status=got.http_status, kind=got.kind, detail=got.detail)
                return
            try:
                prep = await asyncio.to_thread(_prepare, got.data, got.content_type, opt)
            except ImageError as e:
                record(cls, url, "failed", http_status=got.http_status, kind=e.kind, detail=e.reason,
                       nbytes=len(got.data))
                return
            n = len(got.data)
            if prep.sha256 in st.hashes:
                record(cls, url, "duplicate", file=st.hashes[prep.sha256], http_status=got.http_status,
                       nbytes=n, sha=prep.sha256)
                return
            if max_pics and st.saved >= max_pics:
                summary.over_cap += 1
                return
            adopted = st.orphans.pop(prep.file_sha256, None)
            if adopted:  # a killed run wrote this file but not its row: claim it, write nothing
                st.hashes[prep.sha256] = adopted
                st.saved += 1
                record(cls, url, "saved", file=adopted, http_status=got.http_status, nbytes=n, sha=prep.sha256)
                return
            rel = f"{cls}/{st.next_index:08d}{prep.ext}"
            st.next_index += 1
            st.hashes[prep.sha256] = rel
            st.saved += 1
            try:
                await asyncio.to_thread(_write_file_atomic, dest / rel, prep.out)
            except OSError as e:
                st.hashes.pop(prep.sha256, None)
                st.saved -= 1
                record(cls, url, "failed", http_status=got.http_status, kind="write", detail=f"{rel}: {e}",
                       nbytes=n)
                return
            record(cls, url, "saved", file=rel, http_status=got.http_status, nbytes=n, sha=prep.sha256)
        finally:
            if max_pics:
                async with st.cond:
                    st.inflight -= 1
                    st.cond.notify_all()

    async def worker() -> None:
        while queue:
            cls, url = queue.popleft()
            try:
                await handle(cls, url)
            except Exception as e:  # one bad URL never stops the run
                record(cls, url, "failed", kind="unexpected", detail=f"{type(e).__name__}: {e}")
            advance()

    try:
        await asyncio.gather(*(worker() for _ in range(min(workers, max(1, len(queue))))))
    finally:
        await hosts.aclose()


def _plan_resume(
    manifest: Path, lists: Mapping[str, list[str]], retry_failed: bool
) -> tuple[list[dict[str, str]], bool]:
    """Rows to keep from an earlier run (one per URL; failed ones to retry dropped) and whether to rewrite."""
    latest: dict[tuple[str, str], dict[str, str]] = {}
    old_rows = read_manifest(manifest)
    for r in old_rows:
        key = (r["class"], r["url"])
        if key in latest and latest[key]["status"] in DONE_STATUSES and r["status"] == "failed":
            continue  # a finished row is never replaced by a failed one
        latest[key] = r
    wanted = {(cls, u) for cls, urls in lists.items() for u in urls}
    keep = [r for k, r in latest.items() if not (retry_failed and r["status"] == "failed" and k in wanted)]
    torn = manifest.exists() and manifest.stat().st_size > 0 and not manifest.read_bytes().endswith(b"\n")
    return keep, len(keep) != len(old_rows) or torn


@contextlib.contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
    """One download per folder at a time: two runs would number and de-duplicate files independently."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    fd = os.open(dest / ".downloads.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(
                f"{dest}: another ursa download is writing there; wait for it to finish or choose another --dest"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock; a killed run's lock goes with its process


def download_images(
    url_files: Mapping[str, Any] | Iterable[str | Path],
    dest: str | Path,
    *,
    max_pics: int = 200,
    workers: int = 16,
    timeout: float = 10.0,
    max_size: int = 1024,
    max_bytes: int | str = "20MB",
    per_host: int = 4,
    retries: int = 3,
    backoff: float = 0.5,
    max_retry_after: float = 30.0,
    deadline: float | None = None,
    retry_failed: bool = True,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
) -> DownloadSummary:
    """Download every URL of every class into ``dest/<class>/`` and account for each one in downloads.csv.

    ``url_files``: ``{class: file or [urls]}``, or a list of ``CLASS=FILE`` / ``urls_<class>.txt``.
    ``max_pics``: most images saved per class (0 = no cap). ``max_size``: shrink the long side to
    this (0 = keep). ``deadline``: most seconds spent on one URL, retries included (default 6 x
    ``timeout``). Failed URLs of an earlier run are retried unless ``retry_failed`` is False.
    """
    lists = load_url_lists(url_files)
    max_bytes = parse_size(max_bytes)
    for name, value, low in (("--workers", workers, 1), ("--per-host", per_host, 1), ("--max-pics", max_pics, 0),
                             ("--max-size", max_size, 0), ("--retries", retries, 0), ("--max-bytes", max_bytes, 1)):
        if value < low:
            raise DownloadError(f"{name} {value}: must be at least {low}")
    if timeout <= 0 or (deadline is not None and deadline <= 0):
        raise DownloadError("--timeout and --deadline must be positive numbers of seconds")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest}: exists and is not a folder; choose another --dest")
    manifest = dest / MANIFEST_NAME
    if dest.is_dir() and not dest.stat().st_mode & 0o222:  # a read-only mark, honoured even as root
        raise DownloadError(f"{dest}: the folder is read-only; choose another --dest")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        probe = dest / f".ursa-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DownloadError(f"{dest}: cannot write there ({e.strerror or e}); choose another --dest") from None

    with _dest_lock(dest):
        keep, rewrite = _plan_resume(manifest, lists, retry_failed)
        done = {(r["class"], r["url"]) for r in keep}
        summary = DownloadSummary(dest=dest, manifest=manifest)
        for cls in lists:
            summary.per_class.setdefault(cls, Counter())
        states = {cls: _scan_class(dest, cls, keep) for cls in lists}
        opt = _Options(
            timeout=float(timeout),
            deadline=float(deadline) if deadline else 6.0 * float(timeout),
            retries=retries,
            backoff=backoff,
            max_retry_after=max_retry_after,
            max_bytes=max_bytes,
            max_size=max_size,
            max_pixels=max_pixels,
        )
        started = time.perf_counter()
        writer = _ManifestWriter(manifest, keep, rewrite)
        items: list[tuple[str, str]] = []
        try:
            for cls, urls in lists.items():
                for url in urls:
                    if (cls, url) in done:
                        summary.skipped += 1
                        summary.per_class[cls]["skipped"] += 1
                        continue
                    scheme = urlsplit(url).scheme.lower()
                    if scheme not in ("http", "https"):
                        what = f"{scheme}: URL" if scheme else "no scheme (not a full URL)"
                        writer.write({"url": url, "class": cls, "file": "", "status": "refused", "http_status": "",
                                      "error": f"refused: {what}; only http and https are downloaded",
                                      "bytes": "", "sha256": ""})
                        summary.add(cls, "refused")
                        continue
                    items.append((cls, url))
            bar = make_progress("URLs") if progress and items else None
            with bar or contextlib.nullcontext():
                if items:
                    asyncio.run(_run(items, states, dest, writer, summary, opt, workers, per_host, max_pics, bar))
        finally:
            writer.close()
            summary.elapsed = time.perf_counter() - started
    return summary
