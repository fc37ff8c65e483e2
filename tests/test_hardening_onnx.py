"""Issue 29, items 5 and 6: an ONNX export of another model beside the model file, and crafted preprocess metadata.

Models here are untrained efficientnet_lite0 networks at 32 px (no training), exported once per module.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from ursa.cli import main
from ursa.errors import ModelFileError, ModelOutputError
from ursa.inference.metaschema import check_preprocess
from ursa.inference.modelfile import ModelMeta, read_meta, save_model
from ursa.inference.preprocess import preprocess_spec
from ursa.inference.results import Prediction
from ursa.inference.runtime import current_onnx
from tests.conftest import make_image

CREATED = "2026-01-01T00:00:00+00:00"  # both models claim the same moment: only the weights tell them apart


def _model(path: Path, seed: int, created: str = CREATED, poison: bool = False) -> Path:
    import torch

    from ursa.vision.models import create_model

    torch.manual_seed(seed)
    model = create_model("efficientnet_lite0", n_classes=2, pretrained=False)
    if poison:
        with torch.no_grad():
            next(model.head.parameters()).fill_(float("nan"))
    meta = ModelMeta(arch="efficientnet_lite0", classes=["a", "b"], input_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                     head=asdict(model.head_cfg), created=created)
    return save_model(model, path, meta)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Two models with the same classes and `created`, each with its own model.onnx, and an image."""
    from ursa.inference.export import export_onnx

    d = tmp_path_factory.mktemp("onnx_pair")
    mine = _model(d / "mine" / "model.safetensors", 0)
    other = _model(d / "other" / "model.safetensors", 1)
    export_onnx(mine)
    export_onnx(other)
    return {"dir": d, "mine": mine, "other": other, "image": make_image(d / "img.png", size=(40, 36))}


def _swap_in(pair: dict[str, Path], tmp_path: Path) -> Path:
    """mine's model file with other's model.onnx beside it (newer, as if exported after)."""
    model = tmp_path / "model.safetensors"
    shutil.copy2(pair["mine"], model)
    shutil.copy2(pair["other"].with_suffix(".onnx"), tmp_path / "model.onnx")
    later = model.stat().st_mtime + 10
    os.utime(tmp_path / "model.onnx", (later, later))
    return model


def test_a_model_file_carries_its_weights_fingerprint(pair):
    a, b = read_meta(pair["mine"]), read_meta(pair["other"])
    assert len(a.fingerprint) == 64 and a.fingerprint != b.fingerprint and a.created == b.created


def test_the_own_export_is_current_on_every_backend_choice(pair):
    for backend in ("auto", "onnx"):
        fast, why = current_onnx(pair["mine"], backend)
        assert fast is not None and not why.stale


def test_another_models_export_is_refused_with_backend_onnx(pair, tmp_path, capsys):
    model = _swap_in(pair, tmp_path)
    with pytest.raises(ModelFileError, match="not exported from model.safetensors"):
        current_onnx(model, "onnx")
    assert main(["predict", str(model), str(pair["image"]), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ursa export" in err[0] and "Traceback" not in err[0]


def test_another_models_export_is_passed_over_on_auto_decided_from_data(pair, tmp_path):
    model = _swap_in(pair, tmp_path)
    fast, why = current_onnx(model, "auto")
    assert fast is None and why.stale is True  # an attribute, not the wording
    fast, why = current_onnx(model, "torch")
    assert fast is None and why.stale is False


def test_a_direct_onnx_path_runs_itself(pair, capsys):
    # documented: an .onnx file carries its own metadata and is a whole model; it is what the user named
    assert main(["predict", str(pair["other"].with_suffix(".onnx")), str(pair["image"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("a", "b")


# item 6: every preprocess field bounded, one line naming it

GOOD = preprocess_spec(32, [0.5] * 3, [0.5] * 3)


def _spec(change) -> dict:
    spec = json.loads(json.dumps(GOOD))
    change(spec)
    return spec


@pytest.mark.parametrize("field, change", [
    ("preprocess.decode.short_side", lambda s: s["decode"].update(short_side=8000)),
    ("preprocess.decode.short_side", lambda s: s["decode"].update(short_side=100000)),
    ("preprocess.decode.short_side", lambda s: s["decode"].update(short_side=31)),
    ("preprocess.decode.short_side", lambda s: s["decode"].update(short_side="37")),
    ("preprocess.scale", lambda s: s.update(scale=1e308)),
    ("preprocess.scale", lambda s: s.update(scale=0)),
    ("preprocess.mean[1]", lambda s: s["mean"].__setitem__(1, 1e308)),
    ("preprocess.std[0]", lambda s: s["std"].__setitem__(0, 1e308)),
    ("preprocess.std[2]", lambda s: s["std"].__setitem__(2, 1e-30)),
    ("preprocess.std", lambda s: s.update(std=[1, 2])),
    ("preprocess.resize.short_side", lambda s: s["resize"].update(short_side=64)),
    ("preprocess.crop.size", lambda s: s["crop"].update(size=[32, 16])),
    ("preprocess.crop.kind", lambda s: s["crop"].update(kind="random")),
    ("preprocess.version", lambda s: s.update(version=2)),
    ("preprocess.decode", lambda s: s.update(decode=[])),
    ("preprocess.layout", lambda s: s.update(layout="NHWC")),
])
def test_preprocess_fields_are_bounded_and_named(field, change):
    with pytest.raises(ModelFileError) as e:
        check_preprocess(_spec(change), "m.onnx", 32)
    msg = str(e.value)
    assert f"field {field!r}" in msg and "\n" not in msg and "ursa export" in msg


def test_the_spec_ursa_writes_passes():
    assert check_preprocess(_spec(lambda s: None), "m.onnx", 32) == GOOD


def _with_props(src: Path, dst: Path, change) -> Path:
    import onnx

    from ursa.inference.export import set_props

    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    change(props)
    set_props(proto, props)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("change", [
    lambda p: p.update(preprocess=json.dumps(_spec(lambda s: s["decode"].update(short_side=8000)))),
    lambda p: p.update(preprocess=json.dumps(_spec(lambda s: s.update(scale=1e308)))),
    lambda p: p.update(preprocess=json.dumps(GOOD).replace('"scale": 0.00392156862745098', '"scale": NaN')),
    lambda p: p.update(ursa=p["ursa"].replace('"mean": [0.5, 0.5, 0.5]', '"mean": [1e308, 0.5, 0.5]')),
    lambda p: p.update(ursa=p["ursa"].replace('"metrics": {}', '"metrics": {"error_rate": NaN}')),
])
def test_a_crafted_onnx_file_is_one_line_exit_2(pair, tmp_path, capsys, change):
    bad = _with_props(pair["mine"].with_suffix(".onnx"), tmp_path / "bad.onnx", change)
    assert main(["predict", str(bad), str(pair["image"]), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and "bad.onnx" in out.err


def test_nan_probabilities_are_never_an_answer_nor_bare_nan_json(tmp_path, capsys, one_thread):
    from ursa.inference.export import export_onnx

    model = _model(tmp_path / "model.safetensors", 0, poison=True)
    onnx_file = export_onnx(model, check=False)
    image = make_image(tmp_path / "x.png", size=(40, 36))
    for path in (onnx_file, model):
        assert main(["predict", str(path), str(image), "--json", "--backend", "torch" if path == model else "auto"]) == 2
        out = capsys.readouterr()
        assert "NaN" not in out.out and "not finite" in out.err and len(out.err.strip().splitlines()) <= 2
    with pytest.raises(ModelOutputError):
        Prediction("a", 0, {"a": float("nan"), "b": 0.5})


def test_serve_answers_a_nan_model_with_its_one_line_in_valid_json(tmp_path, one_thread):
    from starlette.testclient import TestClient

    from ursa.apps.serve import create_app
    from ursa.inference.export import export_onnx

    onnx_file = export_onnx(_model(tmp_path / "model.safetensors", 0, poison=True), check=False)
    image = make_image(tmp_path / "x.png", size=(40, 36)).read_bytes()
    with TestClient(create_app(onnx_file), raise_server_exceptions=False) as c:
        r = c.post("/predict", files={"file": ("x.png", image, "image/png")})
        assert r.status_code == 500 and "not finite" in r.json()["error"]  # valid JSON: r.json() parses it
        assert c.get("/model").status_code == 200  # the server keeps answering


def test_predict_prints_one_line_per_image_whatever_its_name(pair, tmp_path, capsys):
    odd = make_image(tmp_path / os.fsdecode(b"new\nline\xff.png"), size=(40, 36))
    assert main(["predict", str(pair["mine"].with_suffix(".onnx")), str(odd)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "new\\nline\\xff.png: " in out[0]
    assert main(["predict", str(pair["mine"].with_suffix(".onnx")), str(odd), "--json"]) == 0
    assert os.fsencode(json.loads(capsys.readouterr().out)["file"]) == os.fsencode(str(odd))  # JSON: the exact name
