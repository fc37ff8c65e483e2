"""Issue 17 item 4: one client of `ursa serve` must not stall the others, fill its log, or hold its connections.

Each test sends what a hostile or clumsy client would (a batch of big images, a decompression
bomb, a body that never ends, headers a byte at a time, hundreds of idle connections) and checks
the order of events or the answers, never a duration: timeouts are set short where they are the point.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from ursa.apps.serve import ServeConfig, create_app
from ursa.apps.serve import runner
from ursa.apps.serve.limits import PixelBudget, decoded_pixels
from ursa.apps.web import RepeatFilter, TimedH11Protocol, server_config
from ursa.inference.predictor import load_predictor
from ursa.util.net import raise_open_files_limit
from tests.conftest import HELDOUT, ROOT
from tests.test_serve import _png_claiming

SMALL = sorted(HELDOUT.glob("*.jpg"))[0].read_bytes()
PNG_MAGIC = b"\x89PNG"


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 40)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 80, 120)).save(buf, "JPEG", quality=80, progressive=progressive)
    return buf.getvalue()


class Recorder:
    """A real predictor that notes every decode as it finishes (PNG or not), and can hold decodes or fail forwards."""

    def __init__(self, pred, hold: threading.Event | None = None, fail: bool = False) -> None:
        self.pred, self.hold, self.fail = pred, hold, fail
        self.decoded: list[str] = []
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.pred, name)

    def preprocess(self, data: bytes):
        self.started.set()
        if self.hold is not None:
            self.hold.wait(30)
        x = self.pred.preprocess(data)
        with self.lock:
            self.decoded.append("big" if data.startswith(PNG_MAGIC) else "small")
        return x

    def predict_tensors(self, xs):
        if self.fail:
            raise RuntimeError("a bug in the model code")
        return self.pred.predict_tensors(xs)


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return load_predictor(tiny_model, backend="torch")


def _app(tiny_model, predictor, recorder_args: dict | None = None, **settings):
    rec = Recorder(predictor, **(recorder_args or {}))
    app = create_app(config=ServeConfig(model=tiny_model, backend="torch", **settings), predictor=rec)
    return app, rec


# --- one request's share of the decode pool ---------------------------------------------------


def test_a_big_batch_does_not_stall_a_small_request(tiny_model, predictor):
    """A batch of big PNGs is decoding when a 12 KB request comes: it is answered long before the batch."""
    app, rec = _app(tiny_model, predictor)
    big = _png(2400, 2400)  # 5.8 Mpx: allowed, and slow to decode
    n = min(64, max(12, 3 * app.state.decode_pool.workers))  # more than the pool has threads, as in the issue
    finished: list[str] = []

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            async def batch():
                r = await c.post("/predict/batch", files=[("files", (f"{i}.png", big, "image/png")) for i in range(n)])
                finished.append("batch")
                return r

            async def small():
                while not rec.started.is_set():  # the batch is decoding
                    await asyncio.sleep(0.002)
                r = await c.post("/predict", files={"file": ("small.jpg", SMALL, "image/jpeg")})
                finished.append("small")
                return r

            return await asyncio.gather(batch(), small())

    rb, rs = asyncio.run(go())
    app.state.batcher.shutdown()
    app.state.decode_pool.shutdown()
    assert rb.status_code == 200 and all("label" in o for o in rb.json()), rb.text[:300]
    assert rs.status_code == 200 and "label" in rs.json()
    assert finished == ["small", "batch"]
    big_before_small = rec.decoded.index("small")
    # Before: the whole batch was queued ahead of it (11 of 12 done first on 2 cores). Now at most
    # decode_window (2) of them are in the pool at a time, so only those ahead of it when it came.
    assert big_before_small <= n // 2, rec.decoded


def test_pixels_are_counted_from_the_header_before_any_decode(tiny_model, predictor):
    app, rec = _app(tiny_model, predictor, max_pixels=1_000_000)
    with TestClient(app) as c:
        r = c.post("/predict", files={"file": ("big.png", _png(1200, 1000), "image/png")})  # 1.2 Mpx, decoded whole
        assert r.status_code == 413 and "1200x1000" in r.json()["error"] and "limit of 1.0 Mpx" in r.json()["error"]
        r = c.post("/predict", files={"file": ("bomb.png", _png_claiming(9000, 9000), "image/png")})  # 81 Mpx
        assert r.status_code == 413 and "9000x9000" in r.json()["error"]
        assert rec.decoded == [] and not rec.started.is_set()  # refused from the header: nothing was decoded
        # A JPEG is decoded at 1/8 scale (draft): 4.8 Mpx declared, 75 kpx decoded, within the limit.
        r = c.post("/predict", files={"file": ("big.jpg", _jpeg(2400, 2000), "image/jpeg")})
        assert r.status_code == 200 and "label" in r.json()
        r = c.post("/predict", files={"file": ("prog.jpg", _jpeg(2400, 2000, progressive=True), "image/jpeg")})
        assert r.status_code == 413  # libjpeg holds a progressive JPEG whole: counted at full size
        assert c.get("/model").json()["max_pixels"] == 1_000_000
    assert decoded_pixels(_jpeg(2400, 2000), 146) == (300 * 250, 2400, 2000)
    assert decoded_pixels(b"not an image", 146) is None


def test_a_request_over_its_pixel_budget_is_refused_whole(tiny_model, predictor):
    app, rec = _app(tiny_model, predictor, max_pixels=1_000_000, max_request_pixels=2_000_000)
    png = _png(1000, 900)  # 0.9 Mpx each
    with TestClient(app) as c:
        r = c.post("/predict/batch", files=[("files", (f"{i}.png", png, "image/png")) for i in range(3)])
        assert r.status_code == 413 and "per request" in r.json()["error"] and "smaller batches" in r.json()["error"]
        assert rec.decoded == []
        over = [("files", ("huge.png", _png(1200, 1000), "image/png"))]  # refused alone, not counted in the request
        r = c.post("/predict/batch", files=[("files", (f"{i}.png", png, "image/png")) for i in range(2)] + over)
        out = r.json()
        assert r.status_code == 200 and [o.get("status") for o in out] == [None, None, 413], out
        assert rec.decoded == ["big", "big"]


def test_a_request_that_takes_too_long_is_a_503_and_the_server_keeps_serving(tiny_model, predictor):
    hold = threading.Event()
    app, rec = _app(tiny_model, predictor, {"hold": hold}, request_timeout=0.3)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/predict", files={"file": ("a.jpg", SMALL, "image/jpeg")})
            assert r.status_code == 503 and "busy" in r.json()["error"] and r.headers["retry-after"]
            r = c.post("/predict/batch", files=[("files", ("a.jpg", SMALL, "image/jpeg"))] * 3)
            assert r.status_code == 503 and "fewer images" in r.json()["error"]
            hold.set()
            r = c.post("/predict", files={"file": ("a.jpg", SMALL, "image/jpeg")})
            assert r.status_code == 200 and c.get("/health").json()["status"] == "ok"
    finally:
        hold.set()


def test_the_open_files_limit_is_raised_but_never_past_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = raise_open_files_limit(soft + 1)
    assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft
    assert hard == resource.RLIM_INFINITY or got <= hard


def test_the_pixel_budget_lets_small_decodes_pass_and_queues_big_ones():
    async def go():
        b = PixelBudget(100)
        await b.acquire(60)
        await b.acquire(30)  # fits beside the first
        waiter = asyncio.ensure_future(b.acquire(50))
        await asyncio.sleep(0)
        assert not waiter.done() and b.used == 90
        b.release(60)
        await asyncio.sleep(0)
        assert waiter.done() and b.used == 80
        cancelled = asyncio.ensure_future(b.acquire(90))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert b.waiters == [] and b.used == 80
        b.release(30)
        b.release(50)
        await b.acquire(500)  # bigger than the budget: runs alone
        assert b.used == 500

    asyncio.run(go())


# --- slow clients on a real server ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app on uvicorn in a thread, configured the way `ursa serve` configures it (server_config)."""

    def __init__(self, app, cfg: ServeConfig, limit: int | None = None) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ucfg = server_config(app, "127.0.0.1", self.port, header_timeout=cfg.header_timeout, log_level="warning",
                             limit_concurrency=limit or cfg.limit_concurrency)
        self.server = uvicorn.Server(ucfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test fails on a 20 s silence)."""
    s.settimeout(20)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return out
        if not chunk:
            return out
        out += chunk


def test_slow_bodies_and_headers_time_out_while_health_answers(tiny_model, predictor):
    cfg = ServeConfig(model=tiny_model, backend="torch", read_timeout=0.5, body_timeout=2.0, header_timeout=0.5)
    app = create_app(config=cfg, predictor=predictor)
    with LiveServer(app, cfg) as live:
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nContent-Type: image/jpeg\r\n"
                "Content-Length: 50000\r\n\r\n").encode()
        stalled = socket.create_connection(("127.0.0.1", live.port))
        stalled.sendall(head + SMALL[:100])  # then nothing more
        trickle = socket.create_connection(("127.0.0.1", live.port))
        trickle.sendall(head)
        stop = threading.Event()

        def drip() -> None:  # a byte every 0.1 s: never idle for read_timeout, but never done
            for b in SMALL[:400]:
                if stop.wait(0.1):
                    return
                try:
                    trickle.sendall(bytes([b]))
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        headers = socket.create_connection(("127.0.0.1", live.port))
        headers.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # the rest of the headers never comes
        try:
            assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"  # while all three hang on
            got = _answer(stalled)
            assert got.startswith(b"HTTP/1.1 408") and b"nothing arrived for 0.5 s" in got, got
            got = _answer(trickle)
            assert got.startswith(b"HTTP/1.1 408") and b"took over 2 s" in got, got
            got = _answer(headers)
            assert got.startswith(b"HTTP/1.1 408") and b"headers came too slowly" in got, got
            r = httpx.post(live.url + "/predict", files={"file": ("a.jpg", SMALL, "image/jpeg")}, timeout=30)
            assert r.status_code == 200
        finally:
            stop.set()
            for s in (stalled, trickle, headers):
                s.close()


def test_at_the_connection_limit_the_longest_idle_connection_makes_room(tiny_model, predictor):
    """Idle and slow-header connections hold no place a new client needs: the oldest is closed with a 408."""
    cfg = ServeConfig(model=tiny_model, backend="torch")
    app = create_app(config=cfg, predictor=predictor)
    with LiveServer(app, cfg, limit=8) as live:
        idle = []
        try:
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", live.port))
                s.sendall(b"GET /hea")  # never the rest
                idle.append(s)
                time.sleep(0.01)  # in order, so "the oldest" is well defined
            for _ in range(3):
                assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"
            oldest = _answer(idle[0])
            assert oldest.startswith(b"HTTP/1.1 408"), oldest
        finally:
            for s in idle:
                s.close()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_failure_every_request_meets_is_logged_once_then_counted(tiny_model, predictor):
    cfg = ServeConfig(model=tiny_model, backend="torch")
    app, _ = _app(tiny_model, predictor, {"fail": True})
    names = ("ursa.apps.serve", "uvicorn.error", "asyncio")
    handler = Records()
    with LiveServer(app, cfg) as live:
        for name in names:
            logging.getLogger(name).addHandler(handler)
        try:
            for _ in range(40):  # a new connection each: uvicorn closes one after an application error
                r = httpx.post(live.url + "/predict", files={"file": ("a.jpg", SMALL, "image/jpeg")}, timeout=30)
                assert r.status_code == 500 and "internal error" in r.json()["error"]
        finally:
            for name in names:
                logging.getLogger(name).removeHandler(handler)
    # Before: a traceback from ursa and another from uvicorn for each of the 40 requests.
    with_traceback = [r for r in handler.records if r.exc_info]
    assert len(handler.records) <= 4 and len(with_traceback) <= 2, [r.getMessage()[:80] for r in handler.records]


def test_repeat_filter_logs_once_then_one_line_per_interval():
    now = [0.0]
    f = RepeatFilter(interval=60, clock=lambda: now[0])

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None) if exc else None)

    err = OSError(24, "Too many open files")
    first = record("socket.accept() out of system resource\nsocket: fd=6", err)
    assert f.filter(first) and first.exc_info  # the first one whole, traceback included
    assert not any(f.filter(record(f"socket.accept() out of system resource\nsocket: fd={i}", err)) for i in range(500))
    assert f.filter(record("something else"))  # another message is not held back
    now[0] = 61.0
    later = record("socket.accept() out of system resource\nsocket: fd=6", err)
    assert f.filter(later) and later.exc_info is None
    assert "500 more like this" in later.getMessage() and "Too many open files" in later.getMessage()


def test_serve_runs_uvicorn_with_limits_and_the_slow_client_protocol(tiny_model, monkeypatch):
    seen = {}

    class FakeServer:
        def __init__(self, config) -> None:
            seen["config"] = config

        def run(self) -> None:
            seen["ran"] = True

    monkeypatch.setattr(runner, "Server", FakeServer)
    runner.serve(ServeConfig(model=tiny_model, backend="torch", header_timeout=7, limit_concurrency=100),
                 port=_free_port(), access_log=False)
    ucfg = seen["config"]
    assert seen["ran"] and ucfg.http is TimedH11Protocol and ucfg.header_timeout == 7
    assert 8 <= ucfg.limit_concurrency <= 100 and ucfg.timeout_keep_alive == 5
    assert any(isinstance(f, RepeatFilter) for f in logging.getLogger("asyncio").filters)
    with pytest.raises(Exception, match="read-timeout"):
        ServeConfig(model=tiny_model, read_timeout=0)


@pytest.mark.slow
def test_hundreds_of_idle_connections_under_a_low_file_limit(tiny_model, tmp_path):
    """The issue's failure: 300 connections that never send their headers, 128 open files allowed.

    Before: /health timed out and the log grew by tens of MB of "Too many open files" tracebacks.
    """
    port = _free_port()
    log_path = tmp_path / "serve.log"

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ursa", "serve", str(tiny_model), "--port", str(port),
                                 "--backend", "torch", "--no-access-log"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=low_limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            try:
                s.send(b"GET /hea")  # and never the rest
            except OSError:
                pass
        answers = []
        for _ in range(3):
            time.sleep(0.5)
            try:
                answers.append(httpx.get(url + "/health", timeout=10).status_code)
            except httpx.HTTPError as e:
                answers.append(type(e).__name__)
        assert answers == [200, 200, 200]
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)
    text = log_path.read_text()
    assert len(text) < 20_000 and text.count("Traceback") <= 1, text[:2000]
