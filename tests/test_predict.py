"""Predictor: which backend runs which file, and what predictions look like."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ursa.cli import main
from ursa.errors import ImageError, ModelFileError, UrsaError
from ursa.inference.export import export_onnx
from ursa.inference.modelfile import load_model, save_model
from ursa.inference.predictor import Predictor, check_backend, load_predictor
from ursa.inference.runtime import OnnxPredictor
from tests.conftest import HELDOUT


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path, tmp_path_factory) -> Path:
    """A folder holding a copy of the tiny model and its ONNX export."""
    d = tmp_path_factory.getbasetemp() / "tiny_onnx"  # shared with test_export_onnx: one export per run
    if not (d / "model.onnx").is_file():
        d.mkdir(exist_ok=True)
        shutil.copy2(tiny_model, d / "model.safetensors")
        export_onnx(d / "model.safetensors")
    return d


def _touch(path: Path, t: float) -> None:
    os.utime(path, (t, t))


def test_backend_rule(model_dir, tmp_path):
    """load_predictor follows runtime.current_onnx: the ONNX runtime when it is picked, torch otherwise."""
    model, onnx_file = model_dir / "model.safetensors", model_dir / "model.onnx"
    auto = load_predictor(model, "auto")  # up-to-date export beside it
    assert isinstance(auto, OnnxPredictor) and auto.backend == "onnx" and auto.source == onnx_file
    assert isinstance(load_predictor(model, "torch"), Predictor)
    assert load_predictor(onnx_file, "auto").source == onnx_file
    assert load_predictor(model, "onnx").source == onnx_file
    lone = tmp_path / "model.safetensors"
    shutil.copy2(model, lone)
    assert load_predictor(lone, "auto").backend == "torch"  # nothing beside it
    with pytest.raises(UrsaError, match="ursa export"):
        load_predictor(lone, "onnx")
    with pytest.raises(UrsaError, match="safetensors"):
        load_predictor(onnx_file, "torch")
    with pytest.raises(UrsaError, match=r"^--backend must be one of auto, torch, onnx \(got 'tensorrt'\)$"):
        load_predictor(model, "tensorrt")
    with pytest.raises(ModelFileError, match="not found"):
        load_predictor(tmp_path / "missing.safetensors")


def test_both_backends_answer_alike_through_load_predictor(model_dir):
    files = sorted(HELDOUT.glob("*.jpg"))
    fast, slow = load_predictor(model_dir / "model.safetensors"), load_predictor(model_dir / "model.safetensors", "torch")
    assert (fast.backend, slow.backend) == ("onnx", "torch")
    for a, b in zip(fast.predict_batch(files), slow.predict_batch(files)):
        assert a.label == b.label and max(abs(a.probs[c] - b.probs[c]) for c in a.probs) < 1e-4
    xs = [slow.preprocess(f) for f in files[:3]]  # torch tensors, as serve's torch path makes them
    assert [p.label for p in fast.predict_tensors(xs)] == [p.label for p in slow.predict_tensors(xs)]


def test_auto_ignores_an_export_older_than_the_model(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    t = (d / "model.safetensors").stat().st_mtime
    _touch(d / "model.onnx", t - 60)
    assert load_predictor(d / "model.safetensors").backend == "torch"


def test_auto_ignores_an_export_of_another_model(model_dir, tmp_path, caplog):
    """A retrained model.safetensors copied in with an old model.onnx: mtimes lie, metadata doesn't."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    model, meta = load_model(d / "model.safetensors")
    meta.created = "2001-01-01T00:00:00+00:00"
    save_model(model, d / "model.safetensors", meta)
    _touch(d / "model.onnx", (d / "model.safetensors").stat().st_mtime + 60)
    with pytest.raises(ModelFileError, match="not exported from model.safetensors"):  # issue 29: refused, even asked for
        load_predictor(d / "model.safetensors", "onnx")
    with caplog.at_level("WARNING", logger="ursa"):
        pred = load_predictor(d / "model.safetensors")
    assert pred.backend == "torch"
    assert "Re-export" in caplog.text and "stale" in caplog.text


def test_predict_shapes_and_batch_agree(model_dir):
    pred = load_predictor(model_dir / "model.safetensors", backend="torch")
    files = sorted(HELDOUT.glob("*.jpg"))
    label, index, probs = pred.predict(files[0])
    assert list(probs) == pred.classes and label == pred.classes[index]
    assert abs(sum(probs.values()) - 1) < 1e-5 and probs[label] == max(probs.values())
    batch = pred.predict_batch(files[:3], bs=2)
    assert [p.as_tuple()[:2] for p in batch] == [pred.predict(f)[:2] for f in files[:3]]
    assert pred.predict(files[0]) == pred.predict(files[0].read_bytes())  # bytes and paths alike
    x = pred.preprocess(files[0])
    assert x.shape == (3, pred.size, pred.size) and x.dtype == torch.float32


def test_preprocess_is_the_validation_pipeline(model_dir):
    """The same pixels as training's validation (data.load_pixels + eval_transform), to the bit."""
    from ursa.vision.transforms import decode_size, eval_transform, load_pixels

    pred = load_predictor(model_dir / "model.safetensors", backend="torch")
    tfm = eval_transform(pred.size, pred.meta.mean, pred.meta.std)
    for f in sorted(HELDOUT.glob("*.jpg"))[:3]:
        assert torch.equal(pred.preprocess(f), tfm(load_pixels(f, decode_size(pred.size))))


def test_bf16_runs_and_keeps_the_labels(model_dir):
    model, meta = load_model(model_dir / "model.safetensors")
    fp32, bf16 = Predictor(model, meta), Predictor(model, meta, bf16=True)
    files = sorted(HELDOUT.glob("*.jpg"))[::2]
    assert [p.label for p in bf16.predict_batch(files)] == [p.label for p in fp32.predict_batch(files)]
    assert bf16.describe()["backend"] == "torch+bf16"


def test_unreadable_image_raises_image_error(model_dir, tmp_path):
    pred = load_predictor(model_dir / "model.safetensors")
    bad = tmp_path / "x.jpg"
    bad.write_text("<html>not found</html>")
    with pytest.raises(ImageError) as e:
        pred.predict(bad)
    assert e.value.kind == "not_image"


def test_cli_predict_backends_agree(model_dir, capsys):
    img = str(sorted(HELDOUT.glob("*.jpg"))[0])
    out = {}
    for backend in ("torch", "onnx", "auto"):
        assert main(["predict", str(model_dir / "model.safetensors"), img, "--json", "--backend", backend]) == 0
        out[backend] = json.loads(capsys.readouterr().out)
    assert out["torch"]["label"] == out["onnx"]["label"] == out["auto"]["label"]
    assert max(abs(out["torch"]["probs"][c] - out["onnx"]["probs"][c]) for c in out["torch"]["probs"]) < 1e-4
    assert main(["predict", str(model_dir / "model.safetensors"), img, "--backend", "gpu"]) == 2
    assert "--backend must be one of" in capsys.readouterr().err


def test_check_backend_is_the_one_check(model_dir):
    """Every caller (CLI, serve, load_predictor, resolve_backend) refuses a bad name with the same one line."""
    for name in ("auto", "torch", "onnx"):
        assert check_backend(name) == name
    for bad in ("gpu", "Torch", "", "onnxruntime"):
        with pytest.raises(UrsaError) as e:
            check_backend(bad)
        assert str(e.value) == f"--backend must be one of auto, torch, onnx (got {bad!r})"
        assert "\n" not in str(e.value) and type(e.value) is UrsaError
    with pytest.raises(UrsaError, match=r"^--backend must be one of auto, torch, onnx \(got 'gpu'\)$"):
        load_predictor(model_dir / "model.safetensors", backend="gpu")
    with pytest.raises(UrsaError, match=r"^--backend must be one of"):
        load_predictor(model_dir / "missing.safetensors", backend="gpu")  # the name is checked before the file


def test_ursa_predict_keeps_users_imports_working(model_dir):
    """`from ursa.predict import load_learner` (users' code, fastai's name) is the same function as load_predictor."""
    import ursa.inference
    from ursa.predict import Prediction as P2, Predictor as Pr2, load_learner, load_predictor as lp2
    from ursa.inference.predictor import Prediction

    assert load_learner is lp2 is load_predictor is ursa.inference.load_predictor is ursa.inference.load_learner
    assert P2 is Prediction and Pr2 is Predictor
    pred = load_learner(model_dir / "model.safetensors", backend="torch")
    assert isinstance(pred, Predictor)
    label, index, probs = pred.predict(sorted(HELDOUT.glob("*.jpg"))[0])
    assert label == pred.classes[index] and set(probs) == set(pred.classes)


def test_trained_model_carries_its_calibration_and_predict_applies_it(model_dir):
    """ursa train fits a temperature on the validation set; the predictor divides the logits by it."""
    model, meta = load_model(model_dir / "model.safetensors")
    c = meta.calibration
    assert c["temperature"] > 0 and c["target_precision"] == 0.95
    assert c["threshold"] is None or 0 <= c["threshold"] <= 1
    pred = Predictor(model, meta)
    x = pred.preprocess(sorted(HELDOUT.glob("*.jpg"))[0])[None]
    want = (pred.logits(x) / c["temperature"]).softmax(1)
    assert torch.allclose(pred.probs(x), want, atol=1e-6)
    onnx = load_predictor(model_dir / "model.onnx")
    assert onnx.temperature == pytest.approx(c["temperature"]), "the ONNX export carries it too"
    assert torch.allclose(torch.from_numpy(onnx.probs(x.numpy())), want, atol=1e-4)


def test_a_model_file_without_calibration_behaves_as_before(model_dir, tmp_path):
    model, meta = load_model(model_dir / "model.safetensors")
    meta.calibration = {}
    save_model(model, tmp_path / "old.safetensors", meta)
    pred = load_predictor(tmp_path / "old.safetensors", backend="torch")
    assert pred.temperature == 1.0 and pred.threshold is None
    x = pred.preprocess(sorted(HELDOUT.glob("*.jpg"))[0])[None]
    assert torch.allclose(pred.probs(x), pred.logits(x).softmax(1))
    p = pred.predict_one(sorted(HELDOUT.glob("*.jpg"))[0])
    assert p.unsure is False and p.threshold is None
    assert set(p.to_json()) >= {"label", "index", "probs"}, "old fields stay"


def test_unsure_below_the_threshold_model_or_per_call(model_dir, tmp_path):
    model, meta = load_model(model_dir / "model.safetensors")
    files = sorted(HELDOUT.glob("*.jpg"))
    plain = Predictor(model, meta).predict_batch(files, threshold=None)
    assert not any(p.unsure for p in plain)
    cut = sorted(p.confidence for p in plain)[len(plain) // 2]  # half the answers are below it
    meta.calibration = {**meta.calibration, "threshold": cut}
    save_model(model, tmp_path / "m.safetensors", meta)
    pred = load_predictor(tmp_path / "m.safetensors", backend="torch")
    got = pred.predict_batch(files)
    assert [p.unsure for p in got] == [p.confidence < cut for p in got]
    assert any(p.unsure for p in got) and not all(p.unsure for p in got)
    assert [p.label for p in got] == [p.label for p in plain], "an unsure answer still names its class"
    j = got[0].to_json()
    assert j["unsure"] == got[0].unsure and j["threshold"] == pytest.approx(cut)
    assert not any(p.unsure for p in pred.predict_batch(files, threshold=0.0)), "a per-call threshold wins"
    assert all(p.unsure for p in pred.predict_batch(files, threshold=1.0))
    assert got[0].with_threshold(None).unsure is False
    with pytest.raises(UrsaError, match="expected a probability from 0 to 1"):
        got[0].with_threshold(1.5)
