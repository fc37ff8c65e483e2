"""Issue 29, small item: a 1 MB URL or header is answered 414 / 431 (readable by the client), not a TCP reset."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from ursa.apps.web import server_config


async def _hello(request):
    return JSONResponse({"ok": True})


@pytest.fixture(scope="module")
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(Starlette(routes=[Route("/", _hello)]), "127.0.0.1", port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(15)


def _ask(port: int, request: bytes) -> bytes:
    """Send the whole request (as a client does, in a thread), then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        sent = threading.Thread(target=lambda: _send_all(s, request), daemon=True)
        sent.start()
        out = b""
        while True:
            chunk = s.recv(65536)  # a reset here (ConnectionResetError) is the bug this test is about
            if not chunk:
                break
            out += chunk
        sent.join(20)
        return out


def _send_all(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the server closed after its answer: the reader checks what came back


def test_a_1mb_url_is_414(port):
    answer = _ask(port, b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414 ") and b"too long" in answer


def test_a_1mb_header_is_431(port):
    answer = _ask(port, b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"b" * 1_000_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"too large" in answer


def test_ordinary_and_merely_broken_requests_are_as_before(port):
    assert _ask(port, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert _ask(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")
