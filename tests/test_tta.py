"""Test-time augmentation: the trained mirrors averaged as calibrated probabilities, on both backends, in one forward pass."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ursa.cli import main
from ursa.errors import ModelFileError
from ursa.inference.export import export_onnx, set_props
from ursa.inference.metaschema import ONNX_META_KEY
from ursa.inference.modelfile import load_model, save_model
from ursa.inference.predictor import Predictor, load_predictor
from ursa.inference.runtime import OnnxPredictor, load_onnx
from ursa.inference.tta import NO_VIEWS, mean_probs, tta_views, view_batch, views_text
from tests.conftest import HELDOUT, SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")

T = 2.5  # a real temperature: it must divide each view's logits before the softmax


def hand_softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    """The softmax written out, independent of the code under test."""
    z = np.asarray(logits, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class CountingSession:
    """An ONNX Runtime session that records the batch size of every run (to see the views go in one call)."""

    def __init__(self, session) -> None:
        self.session, self.batches = session, []

    def run(self, outputs, feeds):
        self.batches.append(next(iter(feeds.values())).shape[0])
        return self.session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model and its ONNX export (the same folder test_predict makes: one export per run)."""
    d = tmp_path_factory.getbasetemp() / "tiny_onnx"
    if not (d / "model.onnx").is_file():
        d.mkdir(exist_ok=True)
        shutil.copy2(tiny_model, d / "model.safetensors")
        export_onnx(d / "model.safetensors")
    return d


def flipped_copy(model_dir: Path, dst: Path, flips: str | None) -> Path:
    """model.safetensors + a current model.onnx in dst whose metadata config says `flips` (None: no key, an older file)."""
    dst.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_dir / "model.safetensors")
    config = {k: v for k, v in meta.config.items() if k != "flips"}
    meta.config = config if flips is None else {**config, "flips": flips}
    save_model(model, dst / "model.safetensors", meta)
    import onnx

    proto = onnx.load(str(model_dir / "model.onnx"))
    set_props(proto, {ONNX_META_KEY: meta.to_json()})
    (dst / "model.onnx").write_bytes(proto.SerializeToString())  # written after the model file: current
    return dst / "model.safetensors"


@pytest.fixture(scope="module")
def nets(model_dir):
    """The torch network, its metadata and the plain ONNX predictor, loaded once."""
    model, meta = load_model(model_dir / "model.safetensors")
    return model, meta, load_onnx(model_dir / "model.onnx")


def torch_pair(nets, flips: str | None) -> tuple[Predictor, Predictor]:
    """(plain, tta) torch predictors on the same network whose config says `flips`, both at temperature T."""
    model, meta, _ = nets
    config = {k: v for k, v in meta.config.items() if k != "flips"}
    m = replace(meta, config=config if flips is None else {**config, "flips": flips})
    plain, tta = Predictor(model, m), Predictor(model, m, tta=True)
    plain.temperature = tta.temperature = T
    return plain, tta


def onnx_pair(nets, flips: str | None) -> tuple[OnnxPredictor, OnnxPredictor, CountingSession]:
    """(plain, tta, the tta one's counting session) ONNX predictors whose config says `flips`, at temperature T."""
    _, _, base = nets
    config = {k: v for k, v in base.meta.config.items() if k != "flips"}
    m = replace(base.meta, config=config if flips is None else {**config, "flips": flips})
    counting = CountingSession(base.session)
    plain, tta = OnnxPredictor(base.session, m, base.spec), OnnxPredictor(counting, m, base.spec, tta=True)
    plain.temperature = tta.temperature = T
    return plain, tta, counting


def images(n: int = 3) -> list[Path]:
    return sorted(HELDOUT.glob("*.jpg"))[:n]


def test_views_come_from_the_trained_flips():
    assert tta_views({}, False) == ("original",)
    assert tta_views({"flips": "all"}, False) == ("original",), "no TTA: the plain view only"
    assert tta_views({}, True) == ("original", "horizontal mirror"), "files before the key: horizontal flips"
    assert tta_views(None, True) == ("original", "horizontal mirror")
    assert tta_views({"flips": "horizontal"}, True) == ("original", "horizontal mirror")
    assert tta_views({"flips": "all"}, True) == ("original", "horizontal mirror", "vertical mirror")
    assert tta_views({"flips": "none"}, True) == ("original",)
    one_line = r"^m\.safetensors: config flips is 'sideways', expected the flips the model was trained with \(none, horizontal, all\); predict without --tta$"
    with pytest.raises(ModelFileError, match=one_line):
        tta_views({"flips": "sideways"}, True, "m.safetensors")
    assert views_text(("original", "horizontal mirror")) == "2 views (original, horizontal mirror)"


def test_view_batch_is_every_original_then_every_mirror():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    v = view_batch(x, 3)
    assert v.shape == (6, 3, 4, 5) and v.flags.c_contiguous and v.dtype == np.float32
    assert np.array_equal(v[:2], x)
    assert np.array_equal(v[2:4], x[:, :, :, ::-1]), "horizontal: the last axis (W) reversed"
    assert np.array_equal(v[4:], x[:, :, ::-1, :]), "vertical: the axis before (H) reversed"
    assert np.array_equal(view_batch(x, 1), x)


def test_mean_probs_averages_calibrated_probabilities_not_logits():
    logits = np.array([[4.0, 0.0], [1.0, 3.0], [0.0, 1.0], [2.0, 2.0]], np.float32)  # 2 images x 2 views
    got = mean_probs(logits, 2, 2.0)
    want = (hand_softmax(logits[:2], 2.0) + hand_softmax(logits[2:], 2.0)) / 2
    assert got.shape == (2, 2) and got.dtype == np.float32 and np.allclose(got, want, atol=1e-7)
    assert not np.allclose(got, hand_softmax((logits[:2] + logits[2:]) / 2, 2.0), atol=1e-3), "not softmax(mean logits)"
    assert not np.allclose(got, (hand_softmax(logits[:2]) + hand_softmax(logits[2:])) / 2, atol=1e-3), "temperature applied"
    with pytest.raises(ValueError):
        mean_probs(logits[:3], 2, 1.0)


def test_tta_is_the_mean_of_the_calibrated_image_and_its_mirror_on_both_backends(nets):
    files = images(3)
    plain, tta = torch_pair(nets, "horizontal")
    assert tta.views == ("original", "horizontal mirror") and plain.views == ("original",)
    x = torch.stack([plain.preprocess(f) for f in files])
    hand = (hand_softmax(plain.logits(x).numpy(), T) + hand_softmax(plain.logits(x.flip(-1)).numpy(), T)) / 2
    assert np.abs(hand - plain.probs(x).numpy()).max() > 1e-4, "the mirror changes the answer: the test can tell"
    calls: list[int] = []
    hook = tta.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        got_torch = tta.probs(x).numpy()
    finally:
        hook.remove()
    assert calls == [6], "the views of 3 images run as one batch of 6"
    assert np.abs(got_torch - hand).max() < 1e-6

    oplain, otta, counting = onnx_pair(nets, "horizontal")
    xn = np.stack([oplain.preprocess(f) for f in files])
    ohand = (hand_softmax(oplain.logits(xn), T) + hand_softmax(oplain.logits(np.flip(xn, -1).copy()), T)) / 2
    got_onnx = otta.probs(xn)
    assert counting.batches == [6], "one ONNX Runtime call for 2N images"
    assert np.abs(got_onnx - ohand).max() < 1e-6
    assert np.abs(got_onnx - got_torch).max() < 1e-4, "torch and ONNX agree"

    # every entry point goes through it: predict_batch / stream and predict_one
    for pred, want in ((otta, got_onnx), (tta, got_torch)):
        answers = pred.predict_batch(files)
        assert np.abs(np.array([list(a.probs.values()) for a in answers]) - want).max() < 1e-6
        assert np.abs(np.array(list(pred.predict_one(files[0]).probs.values())) - want[0]).max() < 1e-6


def test_features_come_from_the_plain_view(nets):
    files = images(3)
    plain, tta = torch_pair(nets, "all")
    x = torch.stack([plain.preprocess(f) for f in files])
    (p0, f0), (p1, f1) = plain.probs_and_features(x), tta.probs_and_features(x)
    assert f1.shape == f0.shape and torch.allclose(f0, f1, atol=1e-5)
    assert torch.allclose(p1, tta.probs(x), atol=1e-6) and not torch.allclose(p0, p1, atol=1e-5)
    oplain, otta, counting = onnx_pair(nets, "all")
    xn = x.numpy()
    (q0, g0), (q1, g1) = oplain.probs_and_features(xn), otta.probs_and_features(xn)
    assert counting.batches == [9] and g1.shape == g0.shape and np.allclose(g0, g1, atol=1e-5)
    assert np.allclose(q1, otta.probs(xn), atol=1e-6) and np.abs(q1 - p1.numpy()).max() < 1e-4
    assert not np.allclose(q0, q1, atol=1e-5)


def test_all_flips_average_three_views(nets):
    files = images(3)
    plain, tta = torch_pair(nets, "all")
    oplain, otta, counting = onnx_pair(nets, "all")
    assert tta.views == otta.views == ("original", "horizontal mirror", "vertical mirror")
    x = torch.stack([plain.preprocess(f) for f in files])
    views = (x, x.flip(-1), x.flip(-2))
    hand = sum(hand_softmax(plain.logits(v).numpy(), T) for v in views) / 3
    two = sum(hand_softmax(plain.logits(v).numpy(), T) for v in views[:2]) / 2
    assert np.abs(hand - two).max() > 1e-4, "the vertical mirror changes the answer: the test can tell 3 views from 2"
    assert np.abs(tta.probs(x).numpy() - hand).max() < 1e-6
    got = otta.probs(x.numpy())
    assert counting.batches == [9] and np.abs(got - hand).max() < 1e-4


def test_a_model_trained_without_flips_gives_exactly_the_plain_answer(nets):
    files = images(3)
    plain, tta = torch_pair(nets, "none")
    assert tta.views == ("original",)
    x = torch.stack([plain.preprocess(f) for f in files])
    assert torch.equal(tta.probs(x), plain.probs(x))
    assert [a.probs for a in tta.predict_batch(files)] == [a.probs for a in plain.predict_batch(files)]
    oplain, otta, counting = onnx_pair(nets, "none")
    xn = x.numpy()
    assert np.array_equal(otta.probs(xn), oplain.probs(xn)) and counting.batches == [3]
    assert [a.probs for a in otta.predict_batch(files)] == [a.probs for a in oplain.predict_batch(files)]


def _predict(args: list[str], capsys) -> tuple[int, list[dict], str]:
    rc = main(["predict", *args, "--json"])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


def gap(rows: list[dict], answers: list) -> float:
    """Largest probability difference between JSON lines and Predictions, image by image."""
    return max(abs(r["probs"][c] - a.probs[c]) for r, a in zip(rows, answers, strict=True) for c in a.probs)


def test_cli_predict_tta_on_both_backends(model_dir, tmp_path, capsys):
    model = flipped_copy(model_dir, tmp_path / "h", "horizontal")
    files = [str(f) for f in images(2)]
    for backend in ("onnx", "torch"):
        rc, rows, err = _predict([str(model), *files, "--backend", backend, "--tta"], capsys)
        assert rc == 0 and err.startswith(f"backend: {'onnxruntime' if backend == 'onnx' else 'torch'}")
        assert err.splitlines()[0].endswith("; tta: 2 views (original, horizontal mirror)")
        want = load_predictor(model, backend, tta=True).predict_batch(files)
        assert gap(rows, want) < 1e-6
        plain = load_predictor(model, backend).predict_batch(files)
        assert gap(rows, plain) > 1e-4
        rc, rows, err = _predict([str(model), *files, "--backend", backend, "--no-tta"], capsys)
        assert rc == 0 and "; tta:" not in err
        assert gap(rows, plain) < 1e-6
    rc, rows, err = _predict([str(model.with_suffix(".onnx")), *files, "--tta"], capsys)
    assert rc == 0 and "tta: 2 views" in err.splitlines()[0], "an .onnx path alone carries its flips too"


def test_cli_predict_tta_on_a_model_without_flips_warns_and_predicts_normally(model_dir, tmp_path, capsys):
    model = flipped_copy(model_dir, tmp_path / "n", "none")
    files = [str(f) for f in images(2)]
    for target in (model, model.with_suffix(".onnx")):
        for backend in (("torch",) if target.suffix == ".safetensors" else ("auto",)):
            rc, plain_rows, plain_err = _predict([str(target), *files, "--backend", backend], capsys)
            rc2, rows, err = _predict([str(target), *files, "--backend", backend, "--tta"], capsys)
            assert rc == rc2 == 0 and rows == plain_rows, "exactly the non-TTA answer"
            assert err.splitlines() == [f"warning: {NO_VIEWS}", *plain_err.splitlines()]
    rc, _, err = _predict([str(flipped_copy(model_dir, tmp_path / "bad", "sideways")), files[0], "--tta",
                           "--backend", "torch"], capsys)
    assert rc == 2 and "config flips is 'sideways'" in err and "Traceback" not in err


def test_interpret_model_with_tta(model_dir, tmp_path, caplog):
    from ursa.diagnose.interpret import interpret_model

    model = flipped_copy(model_dir, tmp_path / "h", "horizontal")
    fast_plain = interpret_model(model, SAMPLE)
    fast = interpret_model(model, SAMPLE, tta=True)
    slow = interpret_model(model, SAMPLE, backend="torch", tta=True)
    assert fast.backend.startswith("ONNX Runtime") and slow.backend.startswith("torch")
    assert fast.tta == slow.tta == "2 views (original, horizontal mirror)" and fast_plain.tta == ""
    assert fast.files == fast_plain.files == slow.files and len(fast) > 4
    assert np.abs(fast.probs - slow.probs).max() < 1e-4, "torch and ONNX agree"
    assert np.abs(fast.probs - fast_plain.probs).max() > 1e-4
    assert np.allclose(fast.features, fast_plain.features, atol=1e-5), "the embedding map stays the plain view's"
    pred = load_onnx(model.with_suffix(".onnx"))
    x = np.stack([pred.preprocess(p) for p in fast.paths[:4]])
    hand = (hand_softmax(pred.logits(x), pred.temperature) + hand_softmax(pred.logits(np.flip(x, -1).copy()), pred.temperature)) / 2
    assert np.abs(fast.probs[:4] - hand).max() < 1e-5

    none = flipped_copy(model_dir, tmp_path / "n", "none")
    with caplog.at_level(logging.WARNING, logger="ursa"):
        got = interpret_model(none, SAMPLE, backend="torch", tta=True)
    assert NO_VIEWS in caplog.text and got.tta == ""
    assert np.array_equal(got.probs, interpret_model(none, SAMPLE, backend="torch").probs)
