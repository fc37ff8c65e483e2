"""What both web apps share: the static folder, page headers, JSON errors, the host guard and the server.

`ursa serve` (a model API) and `ursa clean` (a local page that writes into the data folder)
differ in who may call them, not in how a page is sent: both send their own files from
``STATIC`` with one set of security headers and answer client mistakes as ``{"error": ...}``.
``HostGuard`` is for servers that answer this machine's browser only (the cleaner); the model
API may sit behind a proxy under any name, so it does not take it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Mapping

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

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
