"""What both web apps share: the static folder, page headers, JSON errors, the host guard and the server.

`ursa serve` (a model API) and `ursa clean` (a local page that writes into the data folder)
differ in who may call them, not in how a page is sent: both send their own files from
``STATIC`` with one set of security headers and answer client mistakes as ``{"error": ...}``.
``HostGuard`` is for servers that answer this machine's browser only (the cleaner); the model
API may sit behind a proxy under any name, so it does not take it.

Slow and hostile clients are bounded here too: ``read_body`` (a size cap, an idle and a total
read timeout), ``TimedH11Protocol`` (a deadline for the request line and headers) and
``quiet_repeats`` (a failure repeated by every connection is logged once, then counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Mapping

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from ursa.util.numbers import human_bytes

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# Bound to these, a server is every interface's: its guard accepts any literal address, a browser opens loopback.
EVERY_INTERFACE = ("0.0.0.0", "::", "")
# For JSON answers that change as the user works (never cached, never sniffed as something else).
API_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def page_headers(img_src: str = "'self'") -> dict[str, str]:
    """Headers for a page and its files: scripts, styles and requests go to this server only; never framed.

    img_src widens images only (the serve page previews the chosen file from a blob: URL).
    """
    csp = (f"default-src 'self'; script-src 'self'; style-src 'self'; img-src {img_src}; connect-src 'self'; "
           "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


class Assets:
    """An app's own page files, read once when the app is made, so no path is ever built from a request."""

    def __init__(self, names: Iterable[str], img_src: str = "'self'") -> None:
        self.files = {name: (STATIC / name).read_bytes() for name in names}
        self.headers = page_headers(img_src)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def response(self, name: str) -> Response:
        """One of the files read, with its media type and the page headers."""
        return Response(self.files[name], media_type=MEDIA_TYPES[Path(name).suffix], headers=self.headers)


def asset(name: str) -> Callable[[Request], Awaitable[Response]]:
    """A route endpoint that sends one file of the app's Assets (kept as app.state.assets)."""
    async def send(request: Request) -> Response:
        return request.app.state.assets.response(name)
    return send


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A client mistake as JSON {"error": message}: what both pages show and scripts read."""
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers) if headers else None)


class ApiError(Exception):
    """A client mistake: its HTTP status and one line saying what to do instead."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})

    def response(self) -> JSONResponse:
        """The mistake as the JSON error both apps answer."""
        return error_response(self.status, self.message, self.headers)


def clip(text: str, limit: int = 200) -> str:
    """At most limit characters of something a client sent, so an error never echoes a huge value back."""
    return text if len(text) <= limit else text[:limit] + "…"


CLOSE = {"Connection": "close"}  # the rest of a body that was not read cannot be skipped: end the connection


async def read_body(request: Request, max_bytes: int, *, hint: str = "", read_timeout: float | None = None,
                    body_timeout: float | None = None) -> bytes:
    """The whole body, or ApiError: 413 as soon as it is known to be over max_bytes, 408 when it comes too slowly.

    read_timeout: longest wait for the next piece; body_timeout: longest time for all of it. A
    client that stops sending (or trickles a byte at a time) then holds a connection for a bounded time.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "Content-Length is not a number", CLOSE)
        if int(declared) > max_bytes:
            raise ApiError(413, f"request body of {human_bytes(int(declared))} is over the limit of "
                                f"{human_bytes(max_bytes)}{hint}", CLOSE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body_timeout if body_timeout else None
    chunks = request.stream().__aiter__()
    buf = bytearray()
    while True:
        wait = read_timeout
        if deadline is not None:
            left = deadline - loop.time()
            wait = left if wait is None else min(wait, left)
        try:
            if wait is None:
                chunk = await chunks.__anext__()
            elif wait <= 0:
                raise TimeoutError
            else:
                chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            return bytes(buf)
        except TimeoutError:
            why = (f"nothing arrived for {read_timeout:g} s" if deadline is None or loop.time() < deadline
                   else f"it took over {body_timeout:g} s")
            raise ApiError(408, f"the request body came too slowly ({why}, {human_bytes(len(buf))} received); "
                                "send it again in one go", CLOSE) from None
        buf += chunk
        if len(buf) > max_bytes:
            raise ApiError(413, f"request body is over the limit of {human_bytes(max_bytes)}{hint}", CLOSE)


def page_url(host: str, port: int) -> str:
    """The address a browser on this machine opens (loopback when the server listens on every interface)."""
    name = "127.0.0.1" if host in EVERY_INTERFACE else host
    return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host header values that mean this server (anything else is DNS rebinding or a mistake)."""
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    if host in EVERY_INTERFACE:
        names |= {socket.gethostname(), socket.getfqdn()}
    return {f"{h}:{port}" for h in names} | (names if port == 80 else set())


def host_ok(host: str, allowed: set[str], any_ip: bool) -> bool:
    """Whether a Host header names this server; bound to every interface, any literal address does."""
    if host in allowed:
        return True
    if any_ip:
        try:
            ipaddress.ip_address(host.rsplit(":", 1)[0].strip("[]"))
            return True
        except ValueError:
            return False
    return False


class HostGuard:
    """ASGI middleware: 403 unless Host is ours, and for POST unless Origin (when sent) is ours too."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app, self.hosts, self.any_ip = app, allowed_hosts(host, port), host in EVERY_INTERFACE

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            why = self.refusal(scope)
            if why:
                await PlainTextResponse(f"forbidden: {why}\n", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: dict) -> str:
        """Why this request may not reach the app, or "" when it may."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not host_ok(host, self.hosts, self.any_ip):
            return f"Host {host!r} is not this server"
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin")
            if origin is not None and origin != f"http://{host}":
                return f"Origin {origin!r} is not this server"
            if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return "cross-site request"
        return ""


class Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT/SIGTERM end it normally (status 0) instead of being re-raised after."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Stop gracefully on a signal and restore the old handlers; nothing is raised afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def open_when_started(server: uvicorn.Server, url: str) -> None:
    """Open url in the user's browser as soon as server is listening (from a daemon thread; gives up after 5 s)."""
    import webbrowser

    def wait() -> None:
        for _ in range(100):
            if server.started:
                webbrowser.open(url)
                return
            time.sleep(0.05)
    threading.Thread(target=wait, daemon=True).start()


HEADER_TIMEOUT = 10.0  # seconds a connection may take to send its request line and headers
def _canned(status: str, error: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer with a JSON error, for the protocol to write before any app runs (then it closes)."""
    body = b'{"error": "%s"}' % error.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


TIMEOUT_408 = _canned("408 Request Timeout", "the request headers came too slowly; send them again")
BUSY_503 = _canned("503 Service Unavailable", "the server has too many open connections; try again in a moment",
                   "retry-after: 1\r\n")
HEAD_LIMIT = 16 * 1024  # h11's default limit on a request's line and headers (uvicorn passes None: h11's own)
# Over it: 414 while the request line has not ended, else 431.
URI_414 = _canned("414 URI Too Long", "the request line is too long (over 16 KiB); send a shorter URL")
HEADERS_431 = _canned("431 Request Header Fields Too Large", "the request headers are too large (over 16 KiB)")
DRAIN_SECONDS = 2.0  # after such an answer, what the client still sends is read and dropped, so it sees the answer


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request's line and headers, and room kept for new clients.

    uvicorn times out idle keep-alive connections but not one that sends its headers a byte at a
    time (slowloris): each would hold a file descriptor forever. Here the headers have a deadline
    (the uvicorn Config's ``header_timeout`` attribute when set by ``server_config``, else the
    class's), and a new connection at ``limit_concurrency`` closes the one that has been without
    a request longest (idle keep-alive, or slow headers), or when every one has a request running
    is answered 503 at once. uvicorn itself
    answers 503 only after a request's headers are in, so idle connections would keep their
    descriptors until the process could accept no one, /health included.
    """

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._draining: asyncio.TimerHandle | None = None  # set once an oversized head was answered
        self._armed_for: Any = None
        self._waiting_since = self.loop.time()
        limit = self.config.limit_concurrency
        # uvicorn refuses a request once `limit` connections are open, this one included: keep one place free.
        if limit is not None and len(self.connections) >= limit and not self.make_room():
            self.drop(BUSY_503)
            return
        self._arm_header_deadline()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request's head: too long (414 or 431, the client still reading it), else uvicorn's 400."""
        head = self.conn.trailing_data[0]
        if len(head) <= int(self.config.h11_max_incomplete_event_size or HEAD_LIMIT):
            return super().send_400_response(msg)
        self.transport.write(URI_414 if b"\n" not in head else HEADERS_431)
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        # Closing now, with the client's megabyte unread, would reset the connection before it reads the answer.
        self._draining = self.loop.call_later(DRAIN_SECONDS, self.transport.close)
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self._draining is not None:
            return  # the answer is sent: the rest of an oversized head is read and dropped
        if self.cycle is None or self.cycle.response_complete:  # between requests: headers are (re)starting
            self._arm_header_deadline()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._draining is not None:
            self._draining.cancel()
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._waiting_since = self.loop.time()  # idle from now until the next request's headers are in

    def waiting_since(self) -> float | None:
        """Since when this connection has had no request running (idle, or sending headers); None while one runs."""
        if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
            return None
        return self._waiting_since

    def make_room(self) -> bool:
        """Close the connection that has been without a request longest; False when every one has one running."""
        waiting = [(t, c) for c in self.connections if isinstance(c, TimedH11Protocol) and c is not self
                   and (t := c.waiting_since()) is not None]
        if not waiting:
            return False
        min(waiting, key=lambda tc: tc[0])[1].drop(TIMEOUT_408)
        return True

    def drop(self, answer: bytes) -> None:
        """Send a canned answer and close (the connection is between requests or never sent one)."""
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            if self._armed_for is self.cycle:
                return  # already counting for these headers
            self._header_deadline.cancel()
        self._armed_for = self.cycle
        seconds = float(getattr(self.config, "header_timeout", self.header_timeout))
        self._header_deadline = self.loop.call_later(seconds, self._headers_too_slow, self.cycle)

    def _headers_too_slow(self, cycle: Any) -> None:
        self._header_deadline = None
        if self.cycle is cycle and (cycle is None or cycle.response_complete):  # no request started in time
            self.drop(TIMEOUT_408)


def server_config(app: Any, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT,
                  **options: Any) -> uvicorn.Config:
    """uvicorn's Config with the protocol that times out slow headers; options go to uvicorn as they are."""
    cfg = uvicorn.Config(app, host=host, port=port, http=TimedH11Protocol, **options)
    cfg.header_timeout = header_timeout  # type: ignore[attr-defined]  # read by TimedH11Protocol
    quiet_repeats()  # after uvicorn's logging set-up, which would not remove it but runs first
    return cfg


class RepeatFilter(logging.Filter):
    """Log a failure once, then count its repeats: one line per key and interval, never a traceback twice.

    A key is (logger, level, message template, exception type). The first record of a key passes
    as it is (with its traceback); repeats within ``interval`` seconds are dropped and counted;
    the first one after it passes as one line, without a traceback, saying how many were dropped.
    A client that makes every request fail the same way (or a flood of connections the process
    cannot accept) then writes a few lines a minute instead of a traceback per request.
    """

    def __init__(self, interval: float = 60.0, max_keys: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval, self.max_keys, self.clock = interval, max_keys, clock
        self.seen: dict[tuple, list[float]] = {}  # key -> [time last logged, repeats dropped since]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # The template's first line: asyncio puts changing details (a timer's due time) on the lines after it.
        first = str(record.msg).split("\n", 1)[0][:200]
        key = (record.name, record.levelno, first, type(exc).__name__ if exc else "")
        now = self.clock()
        with self.lock:
            entry = self.seen.get(key)
            if entry is None:
                if len(self.seen) >= self.max_keys:
                    self.seen.pop(next(iter(self.seen)))
                self.seen[key] = [now, 0]
                return True
            if now - entry[0] < self.interval:
                entry[1] += 1
                return False
            dropped, entry[0], entry[1] = entry[1], now, 0
        if exc is not None:
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc}; traceback logged before)"
            record.args, record.exc_info, record.exc_text = None, None, None
        if dropped:
            record.msg = f"{record.getMessage()} [{dropped} more like this in the last {self.interval:g} s not logged]"
            record.args = None
        return True


# Loggers that write once per connection or request when something goes wrong for many of them.
NOISY_LOGGERS = ("asyncio", "uvicorn.error", "ursa.apps.serve", "ursa.apps.clean")


def quiet_repeats(names: Iterable[str] = NOISY_LOGGERS, interval: float = 60.0) -> None:
    """Put a RepeatFilter on each logger (once; calling again changes nothing)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(interval))
