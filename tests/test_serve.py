"""ursa serve: every route, every client mistake a clear 4xx JSON error, never a 5xx; page and real server."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from ursa.inference.predictor import Prediction, load_learner
from ursa.apps.serve import WORKER_FACTORY, MicroBatcher, ServeConfig, app_from_env, create_app
from ursa.util.numbers import parse_bytes
from tests.conftest import HELDOUT, ROOT, wait_until
from tests.synthetic_sets import png_declaring as _png_claiming  # noqa: F401  (test_hardening_serve takes it from here)

IMAGES = sorted(HELDOUT.glob("*.jpg"))
MAX_BYTES = 4_000_000


@pytest.fixture(scope="module")
def app(tiny_model):
    return create_app(tiny_model, max_bytes=MAX_BYTES, backend="torch")


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    msg = r.json()["error"]
    for w in words:
        assert w in msg.lower()
    return msg


# --- routes -----------------------------------------------------------------------------------


def test_page_and_assets_are_local(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'type="file"' in r.text and "/static/serve.js" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for name, kind in (("serve.js", "javascript"), ("serve.css", "css")):
        a = client.get(f"/static/{name}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
        assert "http://" not in a.text and "https://" not in a.text  # no external URLs
    assert "http://" not in r.text and "https://" not in r.text
    _error(client.get("/static/../serve.py"), 404)
    _error(client.get("/static/other.js"), 404)


def test_health_and_model(client, tiny_model):
    assert client.get("/health").json()["status"] == "ok"
    m = client.get("/model").json()
    meta = load_learner(tiny_model, backend="torch").meta
    assert m["classes"] == meta.classes and m["arch"] == meta.arch and m["input_size"] == meta.input_size
    assert m["metrics"] == meta.metrics and m["version"] == meta.ursa_version and m["backend"] == "torch"
    assert m["max_bytes"] == MAX_BYTES and m["micro_batch"] == 16


def test_predict_multipart_and_raw_agree_with_the_predictor(client, tiny_model):
    want = load_learner(tiny_model, backend="torch").predict(IMAGES[0])
    data = IMAGES[0].read_bytes()
    for r in (client.post("/predict", files={"file": ("bear.jpg", data, "image/jpeg")}),
              client.post("/predict", content=data, headers={"content-type": "image/jpeg"}),
              client.post("/predict", content=data, headers={"content-type": "application/x-www-form-urlencoded"}),
              client.post("/predict", content=data)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["label"], body["index"]) == want[:2]
        assert max(abs(body["probs"][c] - want[2][c]) for c in want[2]) < 1e-6


def test_predict_batch(client):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in IMAGES[:3]]
    files.append(("files", ("notes.txt", b"just text", "text/plain")))
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200
    out = r.json()
    assert [o["file"] for o in out] == [p.name for p in IMAGES[:3]] + ["notes.txt"]
    assert all("label" in o and len(o["probs"]) == 3 for o in out[:3])
    assert out[3]["status"] == 415 and "not an image" in out[3]["error"]
    _error(client.post("/predict/batch", files={"file": ("a.jpg", IMAGES[0].read_bytes())}), 422, "files")
    _error(client.post("/predict/batch", content=IMAGES[0].read_bytes()), 422, "multipart")
    many = [("files", (f"{i}.jpg", b"x")) for i in range(65)]
    _error(client.post("/predict/batch", files=many), 422, "at most")


# --- client mistakes --------------------------------------------------------------------------


def test_too_large_by_content_length(client):
    _error(client.post("/predict", content=b"\xff" * (MAX_BYTES + 1)), 413, "over the limit")
    big = [("file", ("big.jpg", b"\xff" * MAX_BYTES, "image/jpeg"))]  # multipart overhead pushes it over
    _error(client.post("/predict", files=big), 413)


def test_too_large_while_streaming_without_content_length(client):
    def chunks():
        for _ in range(40):
            yield b"\x00" * 120_000

    r = client.post("/predict", content=chunks())  # chunked transfer: no Content-Length to check
    _error(r, 413, "over the limit")


def test_not_an_image_is_415(client):
    _error(client.post("/predict", files={"file": ("a.jpg", b"<html>404</html>", "image/jpeg")}), 415, "not an image")
    _error(client.post("/predict", content=b"%PDF-1.4 hello", headers={"content-type": "application/pdf"}), 415)
    ico = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(ico, "ICO")
    _error(client.post("/predict", content=ico.getvalue()), 415, "unsupported")


def test_truncated_is_400_and_bomb_is_413(client):
    data = IMAGES[0].read_bytes()
    _error(client.post("/predict", content=data[: len(data) // 2]), 400, "truncated")
    _error(client.post("/predict", files={"file": ("bomb.png", _png_claiming(40_000, 40_000))}), 413, "too large")


def test_wrong_field_and_empty_form_are_422(client):
    data = IMAGES[0].read_bytes()
    _error(client.post("/predict", files={"image": ("a.jpg", data)}), 422, "field 'file'")
    _error(client.post("/predict", data={"file": "not a file"}, files={"other": ("a.jpg", b"")}), 422, "file upload")
    _error(client.post("/predict", data={"name": "x"}), 422, "url-encoded")
    _error(client.post("/predict", content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}), 422)
    _error(client.post("/predict", content=b""), 422, "empty")
    _error(client.post("/predict", files={"file": ("empty.jpg", b"")}), 422, "empty")
    two = [("file", ("a.jpg", data)), ("file", ("b.jpg", data))]
    _error(client.post("/predict", files=two), 422, "/predict/batch")


def test_malformed_requests_are_4xx(client):
    _error(client.post("/predict", content=b"junk", headers={"content-type": "multipart/form-data"}), 400, "boundary")
    _error(client.post("/predict", content=b"junk", headers={"content-type": "multipart/form-data; boundary=zz"}), 400)
    _error(client.get("/predict"), 405)
    _error(client.get("/nowhere"), 404)


@pytest.mark.parametrize("name,status", [
    ("zero_bytes.jpg", 422), ("html_error_page.jpg", 415), ("text_file.png", 415), ("truncated.png", 400),
    ("truncated_60pct.jpg", 400), ("header_only.jpg", 400), ("bomb_40000x40000.png", 413), ("corrupted_scan.jpg", 400),
])
def test_broken_files(client, broken_dir, name, status):
    data = (broken_dir / name).read_bytes()
    _error(client.post("/predict", files={"file": (name, data)}), status)


_JPEG = IMAGES[0].read_bytes()


@st.composite
def _bodies(draw) -> tuple[bytes, dict[str, str]]:
    """Random bytes, mangled JPEGs and mangled multipart forms."""
    kind = draw(st.sampled_from(["random", "jpeg", "multipart", "raw-multipart"]))
    if kind == "random":
        return draw(st.binary(max_size=3000)), {"content-type": draw(st.sampled_from(["image/jpeg", "application/octet-stream", ""]))}
    data = bytearray(_JPEG[: draw(st.integers(0, len(_JPEG)))])
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if kind == "jpeg":
        return bytes(data), {}
    boundary = draw(st.sampled_from(["b0undary", "x", "-" * 3]))
    field = draw(st.sampled_from(["file", "files", "File", ""]))
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="a.jpg"\r\n\r\n'.encode()
    tail = draw(st.sampled_from([f"\r\n--{boundary}--\r\n".encode(), b"", b"\r\n--"]))
    body = head + bytes(data) + tail
    if kind == "raw-multipart":
        body = draw(st.binary(max_size=200)) + body[: draw(st.integers(0, len(body)))]
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=_bodies(), path=st.sampled_from(["/predict", "/predict/batch"]))
def test_fuzzed_uploads_never_get_a_5xx(client, req, path):
    body, headers = req
    r = client.post(path, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text)
    out = r.json()
    assert ("error" in out) if r.status_code >= 400 else isinstance(out, (dict, list))


def test_still_serving_after_abuse(client):
    client.post("/predict", content=b"\x00" * 10)
    r = client.post("/predict", files={"file": ("a.jpg", _JPEG)})
    assert r.status_code == 200 and client.get("/health").status_code == 200


# --- concurrency ------------------------------------------------------------------------------


def test_micro_batcher_groups_concurrent_requests():
    sizes: list[int] = []

    def run(xs):
        sizes.append(len(xs))
        time.sleep(0.02)
        return [Prediction(str(int(x)), int(x), {}) for x in xs]

    async def go():
        b = MicroBatcher(run, max_batch=4)
        out = await asyncio.gather(*(b.submit(torch.tensor(float(i))) for i in range(10)))
        b.shutdown()
        return out

    out = asyncio.run(go())
    assert [p.index for p in out] == list(range(10))  # every caller gets its own answer
    assert sizes == [4, 4, 2]


def test_onnx_app_batches_numpy_arrays_and_matches_the_runtime(tiny_model, tmp_path):
    """backend auto with a current model.onnx beside the model: the app runs OnnxPredictor, micro-batches of np arrays."""
    import shutil

    import numpy as np

    from ursa.inference.export import export_onnx
    from ursa.inference.runtime import OnnxPredictor, load_onnx

    model = tmp_path / "model.safetensors"
    shutil.copy2(tiny_model, model)
    export_onnx(model)
    onnx_app = create_app(model, backend="auto", max_batch=8)
    pred = onnx_app.state.predictor
    assert isinstance(pred, OnnxPredictor) and onnx_app.state.decode_side == pred.preprocess.decode
    seen: list[int] = []
    forward = onnx_app.state.batcher.run

    def run(xs):
        assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in xs)
        if not seen:
            time.sleep(0.3)  # a slow first forward: the other requests queue up behind it
        seen.append(len(xs))
        return forward(xs)

    onnx_app.state.batcher.run = run
    want = load_onnx(model.with_suffix(".onnx"), threads=1)

    async def go():
        transport = httpx.ASGITransport(app=onnx_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/predict", content=p.read_bytes()) for p in IMAGES * 2))

    try:
        rs = asyncio.run(go())
    finally:
        onnx_app.state.batcher.shutdown()
        onnx_app.state.decode_pool.shutdown()
    assert [r.status_code for r in rs] == [200] * len(rs) and max(seen) > 1
    for r, p in zip(rs, IMAGES * 2):
        expect = want.predict_one(p)
        assert r.json()["label"] == expect.label and abs(r.json()["probs"][expect.label] - expect.confidence) < 1e-5
    assert create_app(model, backend="torch").state.info["backend"] == "torch"


def test_concurrent_requests_through_the_app(app):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/predict", files={"file": ("a.jpg", p.read_bytes())})
                                        for p in IMAGES * 2))
        return rs

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * len(rs)
    assert [r.json()["label"] for r in rs[:6]] == [r.json()["label"] for r in rs[6:]]


def test_settings_travel_to_worker_processes_through_the_environment(tiny_model, monkeypatch):
    cfg = ServeConfig(model=tiny_model, max_bytes=1234, backend="torch", threads=1, max_batch=3, batch_wait_ms=1.5,
                      max_pixels=2_000_000, max_request_pixels=5_000_000, decode_window=3, request_timeout=4.5,
                      read_timeout=1.5, body_timeout=9.0, header_timeout=2.5, limit_concurrency=77)
    assert ServeConfig.from_env(cfg.to_env()) == cfg
    for k, v in cfg.to_env().items():
        monkeypatch.setenv(k, v)
    from ursa.apps.web import TimedH11Protocol

    monkeypatch.setattr(TimedH11Protocol, "header_timeout", TimedH11Protocol.header_timeout)  # put back afterwards
    app = app_from_env()
    assert app.state.config == cfg and app.state.batcher.max_batch == 3
    assert TimedH11Protocol.header_timeout == 2.5  # the worker's connections get the setting too
    assert ServeConfig.from_env(ServeConfig(model=tiny_model).to_env()) == ServeConfig(model=tiny_model)
    assert parse_bytes("10MB") == 10 * 1024**2 and parse_bytes("512kb") == 512 * 1024 and parse_bytes("100") == 100


def test_workers_import_the_app_factory_by_its_dotted_name(tiny_model, monkeypatch):
    """--workers > 1: uvicorn imports WORKER_FACTORY in each worker; it must name app_from_env where it lives now."""
    import uvicorn
    from uvicorn.importer import import_from_string

    assert WORKER_FACTORY == "ursa.apps.serve.app:app_from_env"
    assert import_from_string(WORKER_FACTORY) is app_from_env
    cfg = ServeConfig(model=tiny_model, backend="torch", threads=1, max_batch=5)
    for k, v in cfg.to_env().items():
        monkeypatch.setenv(k, v)
    ucfg = uvicorn.Config(WORKER_FACTORY, factory=True, log_config=None)
    ucfg.load()  # what a worker process does before serving: import the string, call the factory
    assert ucfg.loaded and ucfg.loaded_app is not None
    with TestClient(ucfg.loaded_app) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/model").json()["micro_batch"] == 5


# --- a real browser and a real server ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_url(app):
    """The app on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


@pytest.mark.browser
def test_page_in_chromium(browser, live_url, artifacts):
    page = browser.new_page(viewport={"width": 1000, "height": 640})
    page.goto(live_url + "/")
    wait_until(page, "document.getElementById('model-info').textContent.includes('classes')")
    page.set_input_files("#file", str(IMAGES[4]))  # a teddy
    page.wait_for_selector("#bars .bar", timeout=30_000)
    label = page.text_content("#label")
    assert label in ("black", "grizzly", "teddy")
    bars = page.query_selector_all("#bars .bar")
    assert len(bars) == 3 and bars[0].get_attribute("data-class") == label
    assert page.is_visible("#preview") and page.is_hidden("#error")
    assert "%" in page.text_content("#confidence")
    page.screenshot(path=str(artifacts / "serve.png"), full_page=True)
    bad = artifacts / "not-an-image.jpg"
    bad.write_text("<html>not found</html>")
    try:
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not([hidden])")
        assert "not an image" in page.text_content("#error")
        assert page.query_selector_all("#bars .bar") == []
    finally:
        bad.unlink()
    page.close()


@pytest.mark.slow
def test_real_server_process(tiny_model, tmp_path):
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ursa", "serve", str(tiny_model), "--port", str(port), "--backend", "torch"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        r = httpx.post(url + "/predict", files={"file": ("a.jpg", _JPEG)}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] in ("black", "grizzly", "teddy")
        assert httpx.post(url + "/predict", content=b"nope", timeout=30).status_code == 415
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "Finished server process" in text and "Traceback" not in text
