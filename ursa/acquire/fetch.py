"""Fetching one URL politely and deciding from its bytes whether it is an image worth saving.

HTTP goes through httpx: a GET streamed under a size cap, retries with backoff on timeouts,
429 (honouring Retry-After, capped) and 5xx, all within a deadline per URL; every connection,
redirect hops included, goes through the address rule of ``ursa.acquire.addresses``. The type is
decided from the bytes and a decode of every byte (``ursa.vision.images.open_image``), never from
Content-Type. The decode is at reduced size (what is saved is at most ``--max-size`` long), its
cost is read from the header first, and the run holds decodes to a memory budget
(``MemoryBudget``), so many large images at once cannot exhaust memory whatever the core count.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import io
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

from ursa.acquire.addresses import AddressPolicy, AddressRefused, GuardedTransport
from ursa.util.semaphore import WeightedSemaphore
from ursa.errors import ImageError
from ursa.vision.images import ImageInfo, decode_cost, open_image, read_header, sniff_format

USER_AGENT = "Mozilla/5.0 (compatible; ursa-download/0.1; image classifier course tool)"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The long side an image is checked at when it is kept as downloaded (--max-size 0): every byte is
# still decoded, at JPEG's reduced scale or reduced right after decoding.
CHECK_SIDE = 1024
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class FetchOptions:
    """The per-URL limits of a run, validated once by download_images."""

    timeout: float
    deadline: float
    retries: int
    backoff: float
    max_retry_after: float
    max_bytes: int
    max_size: int
    max_pixels: int
    decode_memory: int = 512 * 1024 * 1024

    @property
    def decode_side(self) -> int:
        """The long side images are decoded at: what is saved, or what is enough to check them."""
        return self.max_size or CHECK_SIDE


@dataclass
class Fetched:
    """One URL's answer: the bytes, or the failure kind and a reason for the manifest."""

    data: bytes | None
    http_status: int | None
    kind: str | None = None
    detail: str = ""
    content_type: str = ""
    by_rule: bool = False  # refused by the address rule (``AddressRefused.by_rule``)


@dataclass
class Prepared:
    """An image ready to save: sha256 of the downloaded bytes, the bytes to write, their sha256, extension."""

    sha256: str
    out: bytes
    file_sha256: str
    ext: str


# Pillow allocates a big image in blocks of this size. Blocks over glibc's largest mmap threshold
# (32 MiB) are mapped and unmapped on their own, so a decoded image goes back to the system when it
# is freed; Pillow's default 16 MiB blocks stay in each decoding thread's malloc arena instead,
# and six threads each keeping a 320 MB image's worth took the run to 1.3 GB where one needs 0.35.
DECODE_BLOCK_SIZE = 64 * 1024 * 1024


@contextlib.contextmanager
def decode_blocks() -> Iterator[None]:
    """Make Pillow allocate images in DECODE_BLOCK_SIZE blocks for the block, then restore its setting."""
    from PIL import Image

    core = Image.core
    get, put = getattr(core, "get_block_size", None), getattr(core, "set_block_size", None)
    if get is None or put is None:  # another Pillow: its own allocation, as before
        yield
        return
    before = get()
    put(max(before, DECODE_BLOCK_SIZE))
    try:
        yield
    finally:
        put(before)


@dataclass
class Inspected:
    """What the header says before any pixel is decoded: sha256 of the bytes, format and size, decode cost."""

    sha256: str
    info: ImageInfo
    cost: int


class MemoryBudget(WeightedSemaphore):
    """A semaphore weighted by bytes (``util.semaphore``): decodes run together only while their declared costs fit.

    One decode bigger than the whole budget still runs, alone. Bounding decodes by memory rather
    than by threads keeps a run of huge images small on any machine, and small images fast.
    """


class HostPool:
    """One semaphore and one small httpx client per host.

    The semaphore keeps at most ``per_host`` requests on a site. A client per host (sharing
    one SSL context) keeps each connection pool small: httpcore scans every pooled connection
    on every request, which costs more CPU than the download itself once a pool holds dozens.
    Every client connects through the address rule (``GuardedTransport``).
    """

    def __init__(self, per_host: int, timeout: float, policy: AddressPolicy) -> None:
        import httpx

        self.per_host = per_host
        self.policy = policy
        self.ssl = httpx.create_ssl_context()
        self.timeout = httpx.Timeout(timeout, pool=None)
        self.hosts: dict[str, tuple[Any, asyncio.Semaphore]] = {}

    def get(self, url: str) -> tuple[Any, asyncio.Semaphore]:
        """The client and the semaphore for this URL's host, made on first use."""
        import httpx

        host = urlsplit(url).netloc.lower()
        if host not in self.hosts:
            limits = httpx.Limits(max_connections=self.per_host, max_keepalive_connections=self.per_host)
            client = httpx.AsyncClient(
                follow_redirects=True, max_redirects=5, timeout=self.timeout, trust_env=False,
                transport=GuardedTransport(self.policy, verify=self.ssl, limits=limits),
                headers={"User-Agent": USER_AGENT}, event_hooks={"response": [check_redirect]},
            )
            self.hosts[host] = (client, asyncio.Semaphore(self.per_host))
        return self.hosts[host]

    async def aclose(self) -> None:
        """Close every client (and its connections) at the end of the run."""
        await asyncio.gather(*(client.aclose() for client, _ in self.hosts.values()), return_exceptions=True)


class BadRedirect(Exception):
    """A redirect whose Location is no URL: asking again will not help (raised before httpx would follow it)."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"malformed redirect target {location[:200]!r} ({reason})")


async def check_redirect(response) -> None:
    """Response hook: httpx parses a redirect's Location as URL(location) when it follows it; the same check here
    raises a typed error, so the caller decides from the exception's type, not from httpx's wording."""
    import httpx

    if response.has_redirect_location:
        location = response.headers["location"]
        try:
            httpx.URL(location)
        except (httpx.InvalidURL, ValueError) as e:
            raise BadRedirect(location, one_line(e)) from None


class _Retry(Exception):
    def __init__(self, fetched: Fetched, wait: float | None = None) -> None:
        self.fetched = fetched
        self.wait = wait


def retry_after_seconds(value: str | None) -> float | None:
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


def one_line(text: object, limit: int = 240) -> str:
    """Squash a message to one short line, so it fits one manifest cell."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe_transport_error(e: BaseException) -> str:
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
        text = one_line(x)
        if text:
            return f"{text} ({type(e).__name__})"
    return f"connection lost ({type(e).__name__})"


async def _attempt(client: Any, url: str, opt: FetchOptions) -> Fetched:
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
                wait = retry_after_seconds(resp.headers.get("retry-after")) if status in (429, 503) else None
                raise _Retry(Fetched(None, status, kind, f"HTTP {status} {resp.reason_phrase}".strip()), wait)
            if status >= 400:
                return Fetched(None, status, f"http_{status}", f"HTTP {status} {resp.reason_phrase}".strip())
            length = resp.headers.get("content-length")
            if length and length.isdigit():
                expected = int(length)
                if expected > opt.max_bytes:
                    return Fetched(
                        None, status, "too_large", f"Content-Length {expected:,} bytes is over --max-bytes {opt.max_bytes:,}"
                    )
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                received = len(buf)
                if received > opt.max_bytes:
                    return Fetched(None, status, "too_large", f"over --max-bytes {opt.max_bytes:,} while downloading")
            return Fetched(bytes(buf), status, content_type=ctype)
    except _Retry:
        raise
    except AddressRefused as e:  # refused before connecting: nothing of it was sent or received
        detail = e.reason
        if e.kind == "refused" and e.host != _host_of(url):
            detail += f" (a redirect from {_host_of(url)} led there)"
        return Fetched(None, None, e.kind, detail, by_rule=e.by_rule)
    except httpx.TooManyRedirects:
        return Fetched(None, None, "redirect", "too many redirects (a redirect loop?)")
    except httpx.UnsupportedProtocol as e:
        return Fetched(None, None, "redirect", f"redirected to a URL that is not http(s): {one_line(e)}")
    except (httpx.InvalidURL, httpx.LocalProtocolError) as e:
        return Fetched(None, None, "bad_url", one_line(e) or "malformed URL")
    except httpx.TimeoutException as e:
        raise _Retry(Fetched(None, None, "timeout", f"no answer within {opt.timeout:g} s ({type(e).__name__})"))
    except BadRedirect as e:  # a redirect to a malformed URL: asking again will not help
        return Fetched(None, None, "bad_url", one_line(e))
    except httpx.RemoteProtocolError as e:
        if expected is not None and received < expected:
            detail = f"connection closed after {received:,} of {expected:,} bytes"
            raise _Retry(Fetched(None, None, "truncated", detail))
        raise _Retry(Fetched(None, None, "connection", one_line(e) or "server closed the connection"))
    except (httpx.TransportError, OSError) as e:
        raise _Retry(Fetched(None, None, "connection", describe_transport_error(e)))
    except ValueError as e:  # a redirect to a URL httpx cannot parse (a bad IDNA name, say)
        return Fetched(None, None, "bad_url", f"malformed redirect target ({one_line(e)})")
    except ExceptionGroup as eg:  # anyio's connect raises groups; name the first real cause
        leaf: BaseException = eg
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, OverflowError):
            return Fetched(None, None, "bad_url", f"port out of range 1-65535 ({one_line(leaf)})")
        raise _Retry(Fetched(None, None, "connection", describe_transport_error(leaf)))


def _host_of(url: str) -> str:
    """The host of a URL already checked by urls.url_problem, as the connection sees it (ASCII, IDNA-encoded)."""
    import httpx

    return httpx.URL(url).raw_host.decode("ascii", errors="replace")


async def fetch(client: Any, url: str, host_sem: asyncio.Semaphore, opt: FetchOptions) -> Fetched:
    """Fetch with retries and backoff, never more than the per-host limit, within the URL deadline."""
    loop = asyncio.get_running_loop()
    deadline_at: float | None = None
    last = Fetched(None, None, "timeout", "not attempted")
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
                return Fetched(None, None, "timeout", f"no complete answer within the {opt.deadline:g} s deadline")
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


def inspect_image(data: bytes, content_type: str, opt: FetchOptions) -> Inspected:
    """Decide from the bytes and the header alone whether this may be an image, and what decoding it costs."""
    if not data:
        raise ImageError("<download>", "empty response (0 bytes)", "empty")
    if sniff_format(data[:16]) is None:
        raise ImageError("<download>", _describe_non_image(data, content_type), "not_image")
    info = read_header(data, max_pixels=opt.max_pixels)
    return Inspected(hashlib.sha256(data).hexdigest(), info, decode_cost(info, opt.decode_side))


def prepare_image(data: bytes, content_type: str, opt: FetchOptions, sha256: str | None = None) -> Prepared:
    """Decide from the bytes whether this is an image, decode all of it at reduced size, and shrink it if asked."""
    if sha256 is None:
        sha256 = inspect_image(data, content_type, opt).sha256
    im, info = open_image(  # type: ignore[misc]
        data, max_pixels=opt.max_pixels, with_info=True, max_side=opt.decode_side
    )
    if opt.max_size and max(info.size) > opt.max_size:
        from PIL import Image

        im.thumbnail((opt.max_size, opt.max_size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out = buf.getvalue()
        return Prepared(sha256, out, hashlib.sha256(out).hexdigest(), ".jpg")
    return Prepared(sha256, data, sha256, EXTENSIONS.get(info.format, ".jpg"))
