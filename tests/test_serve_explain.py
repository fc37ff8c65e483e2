"""serve's POST /explain and the page's "why?" button (issue 23, "why it answered that")."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from ursa.apps.serve import create_app
from tests.conftest import HELDOUT, wait_until
from tests.test_serve import live_url  # noqa: F401 - the fixture: this module's app on uvicorn

IMAGES = sorted(HELDOUT.glob("*.jpg"))


@pytest.fixture(scope="module")
def onnx_model(tiny_model: Path, tmp_path_factory) -> Path:
    from ursa.inference.export import export_onnx

    d = tmp_path_factory.mktemp("serve_explain")
    shutil.copy2(tiny_model, d / "model.safetensors")
    return export_onnx(d / "model.safetensors")


@pytest.fixture(scope="module")
def app(onnx_model):
    return create_app(onnx_model)  # ONNX Runtime: the torch-free path


def overlay_of(answer: dict):
    from PIL import Image

    head, data = answer["overlay"].split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_explain_answers_with_the_map_and_an_overlay(app, tiny_model, backend):
    app_ = app if backend == "onnx" else create_app(tiny_model, backend="torch")
    with TestClient(app_, raise_server_exceptions=False) as c:
        data = IMAGES[4].read_bytes()
        r = c.post("/explain", files={"file": ("t.jpg", data)})
        assert r.status_code == 200, r.text
        ans = r.json()
        assert ans["label"] == c.post("/predict", content=data).json()["label"]  # the same answer as /predict
        ev = ans["evidence"]
        assert ev["class"] == ans["label"] and ev["shape"] == [4, 4] and max(max(row) for row in ev["map"]) == 1.0
        assert overlay_of(ans).size == (128, 128 + 22)
        bad = c.post("/explain", content=b"not an image")
        assert bad.status_code == 415 and "error" in bad.json()
        assert c.post("/explain", files={"other": ("t.jpg", data)}).status_code == 422


def test_a_model_without_maps_answers_501_with_what_to_do(onnx_model, tmp_path):
    import onnx

    proto = onnx.load(str(onnx_model))
    proto.graph.output.remove(next(o for o in proto.graph.output if o.name == "evidence"))
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with TestClient(create_app(old), raise_server_exceptions=False) as c:
        r = c.post("/explain", content=IMAGES[0].read_bytes())
        assert r.status_code == 501 and "export it again" in r.json()["error"]
        assert c.post("/predict", content=IMAGES[0].read_bytes()).status_code == 200


@pytest.mark.browser
def test_page_shows_the_heat_map_on_why(browser, live_url, artifacts):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(live_url + "/")
    wait_until(page, "document.getElementById('model-info').textContent.includes('classes')")
    assert page.is_hidden("#why")  # nothing to explain yet
    page.set_input_files("#file", str(IMAGES[4]))
    page.wait_for_selector("#bars .bar", timeout=30_000)
    assert page.is_visible("#why") and page.is_hidden("#why-figure")
    page.click("#why")
    page.wait_for_selector("#why-figure:not([hidden])", timeout=30_000)
    label = page.text_content("#label")
    assert label in page.text_content("#why-caption")
    wait_until(page, "document.getElementById('why-img').complete && document.getElementById('why-img').naturalWidth > 0")
    assert page.evaluate("document.getElementById('why-img').naturalWidth") == 128
    page.screenshot(path=str(artifacts / "serve-why.png"), full_page=True)
    page.set_input_files("#file", str(IMAGES[0]))  # a new picture hides the old map
    page.wait_for_selector("#why-figure", state="hidden", timeout=30_000)
    page.close()
