"""A local HTTP server that misbehaves on purpose, so download tests need no internet.

Routes (every path may carry any query string; stateful routes count per full path):

    /img/<name>          an image from ``images`` (Content-Type image/jpeg whatever it is)
    /status/<code>       that HTTP status with a short text body (e.g. /status/404)
    /flaky/<n>/<name>    500 for the first <n> requests of this path, then the image
    /ratelimit/<s>/<name>  429 with ``Retry-After: <s>`` the first time, then the image
    /slow/<s>/<name>     sleeps <s> seconds before answering with the image
    /redirect/<n>/<name> a chain of <n> 302s ending at /img/<name>
    /goto?url=<URL>      a 302 to any URL, e.g. another host (address-rule tests)
    /loop                a redirect to itself, forever
    /html                an HTML page that claims ``Content-Type: image/jpeg``
    /truncated/<name>    promises the full Content-Length, sends half, closes
    /halfimage/<name>    no Content-Length, sends half the image, closes (a truncated file)
    /big/<bytes>         a JPEG header followed by <bytes> bytes of padding (size-cap tests)
    /bigstream/<bytes>   the same with no Content-Length, so only streaming can catch it
    /reset               closes the connection with a TCP reset instead of answering

Run it alone (for docs and the benchmark): ``python tests/fault_server.py --port 8765 --delay 0.05``.
"""

from __future__ import annotations

import argparse
import io
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SAMPLE_BEARS = Path(__file__).resolve().parents[1] / "examples" / "bears"


def make_images(n: int = 8, size: tuple[int, int] = (64, 48)) -> dict[str, bytes]:
    """Make small distinct JPEGs so tests run without ../shared."""
    from PIL import Image

    out: dict[str, bytes] = {}
    for i in range(n):
        im = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        im.putpixel((i % size[0], 0), (255 - i % 256, 0, 0))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out[f"{i}.jpg"] = buf.getvalue()
    return out


def bear_images(limit: int | None = None) -> dict[str, bytes]:
    """Real thumbnails from the bundled sample, examples/bears."""
    files = sorted(SAMPLE_BEARS.rglob("*.jpg"))[:limit]
    return {f"{p.parent.name}_{p.name}": p.read_bytes() for p in files}


class FaultServer:
    """A ThreadingHTTPServer on a free loopback port, run in a daemon thread."""

    def __init__(
        self, images: dict[str, bytes] | None = None, delay: float = 0.0, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.images = images if images is not None else make_images()
        self.delay = delay
        self.hits: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}  # path -> monotonic arrival time of each request
        self.inflight = 0
        self.max_inflight = 0  # most requests handled at the same time (per-host limit tests)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        """A full URL on this server for ``path``."""
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def count(self, path: str) -> int:
        """How many requests a path (with query) has received."""
        with self.lock:
            return self.hits[path]

    def start(self) -> "FaultServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body)

        def _image(self, name: str) -> None:
            body = server.images.get(name)
            if body is None:
                self._send(404, b"no such image", "text/plain")
            else:
                self._send(200, body)

        def _close_hard(self) -> None:
            # SO_LINGER with timeout 0 makes close() send RST: a "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def do_GET(self) -> None:
            with server.lock:
                server.hits[self.path] += 1
                server.times.setdefault(self.path, []).append(time.monotonic())
                n_seen = server.hits[self.path]
                server.inflight += 1
                server.max_inflight = max(server.max_inflight, server.inflight)
            try:
                self._route(n_seen)
            finally:
                with server.lock:
                    server.inflight -= 1

        def _route(self, n_seen: int) -> None:  # noqa: C901 - one branch per fault is the point
            path = urlsplit(self.path).path
            if server.delay:
                time.sleep(server.delay)
            parts = path.strip("/").split("/")
            route, args = parts[0], parts[1:]
            if route == "img" and args:
                self._image("/".join(args))
            elif route == "status" and args:
                self._send(int(args[0]), f"status {args[0]}".encode(), "text/plain")
            elif route == "flaky" and len(args) >= 2:
                if n_seen <= int(args[0]):
                    self._send(500, b"internal error", "text/plain")
                else:
                    self._image("/".join(args[1:]))
            elif route == "ratelimit" and len(args) >= 2:
                if n_seen == 1:
                    self._send(429, b"slow down", "text/plain", {"Retry-After": args[0]})
                else:
                    self._image("/".join(args[1:]))
            elif route == "slow" and len(args) >= 2:
                time.sleep(float(args[0]))
                try:
                    self._image("/".join(args[1:]))
                except OSError:
                    pass  # the client gave up first
            elif route == "redirect" and len(args) >= 2:
                n = int(args[0])
                target = f"/redirect/{n - 1}/{'/'.join(args[1:])}" if n > 1 else f"/img/{'/'.join(args[1:])}"
                self._send(302, b"", "text/plain", {"Location": target})
            elif route == "goto":
                target = parse_qs(urlsplit(self.path).query).get("url", [""])[0]
                self._send(302, b"", "text/plain", {"Location": target})
            elif route == "loop":
                self._send(302, b"", "text/plain", {"Location": self.path})
            elif route == "html":
                page = b"<!DOCTYPE html><html><head><title>Sorry</title></head><body>Image not available</body></html>"
                self._send(200, page, "image/jpeg")
            elif route == "truncated" and args:
                body = server.images.get("/".join(args), b"")
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif route == "halfimage" and args:
                body = server.images.get("/".join(args), b"")
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif route in ("big", "bigstream") and args:
                size = int(args[0])
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                if route == "big":
                    self.send_header("Content-Length", str(size))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(b"\xff\xd8\xff\xe0")
                    chunk = b"\0" * 65536
                    left = size - 4
                    while left > 0:
                        self.wfile.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
                except OSError:
                    pass  # the client stopped reading at its cap
                self.close_connection = True
            elif route == "reset":
                self._close_hard()
            else:
                self._send(404, b"unknown route", "text/plain")

    return Handler


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds added to every response")
    ap.add_argument("--bears", type=int, default=0, help="serve this many bears thumbnails as well")
    args = ap.parse_args()
    images = make_images()
    images.update(bear_images(args.bears) if args.bears else {})
    srv = FaultServer(images, delay=args.delay, host=args.host, port=args.port)
    print(f"serving {len(images)} images on http://{srv.host}:{srv.port}/", flush=True)
    srv.httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    _main()
