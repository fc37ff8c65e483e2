"""The torch-free runtime: preprocessing reproduced from the ONNX metadata, streaming batches, no torch imported."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ursa.cli import main
from ursa.errors import ImageError
from ursa.inference.export import export_onnx
from ursa.inference.preprocess import DECODE_SCALE, Preprocess, preprocess_spec
from ursa.inference.runtime import current_onnx, load_onnx
from tests.conftest import HELDOUT, ROOT, make_image

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def onnx_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model exported to ONNX in its own folder (model.safetensors + model.onnx)."""
    d = tmp_path_factory.mktemp("runtime")
    shutil.copy2(tiny_model, d / "model.safetensors")
    export_onnx(d / "model.safetensors")
    return d / "model.onnx"


def odd_images(folder: Path) -> list[Path]:
    """Images in the modes that trip up decoders: CMYK, palette with transparency, 16-bit grey, LA, EXIF-rotated."""
    out = [make_image(folder / "cmyk.jpg", size=(300, 200), mode="CMYK"),
           make_image(folder / "gray16.png", size=(180, 260), mode="I;16"),
           make_image(folder / "la.png", size=(90, 70), mode="LA")]
    pal = Image.new("P", (250, 190))
    pal.putpalette([i % 256 for i in range(768)])
    pal.paste(37, (10, 10, 120, 90))
    pal.save(folder / "pal.png", transparency=0)
    rot = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 333, 3), dtype=np.uint8))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90 when shown
    rot.save(folder / "exif.jpg", exif=exif.tobytes(), quality=90)
    return out + [folder / "pal.png", folder / "exif.jpg"]


def web_originals(folder: Path) -> list[Path]:
    """One class of conftest's odd web originals: lying extensions, RGBA, palette, GIF, CMYK, 2400 px."""
    return sorted((folder / "black").iterdir())


def torch_pipeline(size: int, mean: list[float] = MEAN, std: list[float] = STD):
    """The training pipeline's evaluation transform, as training scores the model."""
    from ursa.vision.transforms import decode_size, eval_transform, load_pixels

    tfm = eval_transform(size, mean, std)
    return lambda f: tfm(load_pixels(f, decode_size(size))).numpy()


def test_decode_scale_matches_the_training_pipeline():
    from ursa.vision.transforms import DECODE_SCALE as TRAINING

    assert DECODE_SCALE == TRAINING


@pytest.mark.parametrize("size", [224, 128])
def test_numpy_preprocessing_is_the_eval_transform_bit_for_bit(tmp_path, size, odd_photos_dir):
    files = odd_images(tmp_path) + list(HELDOUT.glob("*.jpg"))[:4] + web_originals(odd_photos_dir)
    ours, theirs = Preprocess(preprocess_spec(size, MEAN, STD)), torch_pipeline(size)
    for f in files:
        got, want = ours(f), theirs(f)
        assert got.shape == want.shape == (3, size, size) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-5, f  # identical pixels; only float rounding of the normalisation


# sizes that reach every branch of the banded resizes: Pillow upscaling, shrinking by under 2 (its own
# resample, reproduced), by 2..4 and by over 4 (Pillow runs: its reducing_gap path), an axis Pillow or
# torch leaves alone (short side already the decode size), 1-pixel strips and odd aspect ratios
SIZES = [(1, 40), (40, 1), (3, 700), (129, 224), (224, 129), (258, 258), (258, 301), (301, 258),
         (300, 400), (517, 389), (600, 1200), (1500, 1100), (257, 259)]


@pytest.mark.parametrize("size", [224, 96])
def test_banded_resizes_are_bit_exact_on_every_geometry(tmp_path, size):
    rng = np.random.default_rng(size)
    ours, theirs = Preprocess(preprocess_spec(size, MEAN, STD)), torch_pipeline(size)
    for w, h in SIZES:
        f = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f)
        got, want = ours(f), theirs(f)
        assert got.shape == want.shape == (3, size, size)
        assert np.abs(got - want).max() < 1e-5, (w, h)  # one pixel off by one level is 0.017: caught
        assert np.array_equal(ours.resized(f), ours.pixels(f).transpose(2, 0, 1))


def test_onnx_with_numpy_preprocessing_matches_torch_on_real_images(onnx_model, tmp_path, odd_photos_dir):
    import torch

    from ursa.inference.modelfile import load_model

    files = odd_images(tmp_path) + sorted(HELDOUT.glob("*.jpg")) + web_originals(odd_photos_dir)
    model, meta = load_model(onnx_model.with_suffix(".safetensors"))
    pipe = torch_pipeline(meta.input_size, meta.mean, meta.std)
    pred = load_onnx(onnx_model)
    with torch.inference_mode():  # the run may have fitted a temperature: both sides apply it
        logits = model(torch.stack([torch.from_numpy(pipe(f)) for f in files]))
        want = (logits / pred.temperature).softmax(1).numpy()
    got = np.array([[p.probs[c] for c in pred.classes] for p in pred.predict_batch(files, bs=5)])
    assert np.abs(got - want).max() < 1e-4
    assert pred.predict(files[0])[1] == int(want[0].argmax())


def test_onnx_file_carries_its_preprocessing(onnx_model):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}
    spec = json.loads(props["preprocess"])
    assert spec["resize"]["short_side"] == spec["crop"]["size"][0] == 128
    assert spec["mean"] and spec["std"] and spec["crop"]["kind"] == "center"
    assert Preprocess(spec).decode == round(128 * DECODE_SCALE)


def test_stream_keeps_order_and_reports_bad_files_in_place(onnx_model, tmp_path):
    good = sorted(HELDOUT.glob("*.jpg"))[:5]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    sources = good[:2] + [bad] + good[2:] + [good[0].read_bytes()]
    pred = load_onnx(onnx_model)
    out = list(pred.stream(sources, bs=2))
    assert [s for s, _ in out] == sources
    assert isinstance(out[2][1], ImageError) and "bad.jpg" in str(out[2][1])
    singles = [pred.predict_one(s) for s in good]
    streamed = [a for _, a in out if not isinstance(a, ImageError)]
    for a, b in zip(singles, streamed):
        assert a.label == b.label and max(abs(a.probs[c] - b.probs[c]) for c in a.probs) < 1e-5
    assert streamed[-1].probs == pytest.approx(singles[0].probs, abs=1e-5)  # bytes decode like the file
    with pytest.raises(ImageError):
        pred.predict_batch(sources)


def test_calibration_temperature_and_threshold_apply(onnx_model):
    pred = load_onnx(onnx_model)
    f = sorted(HELDOUT.glob("*.jpg"))[0]
    plain = pred.predict_one(f)
    pred.temperature, pred.threshold = 4.0, 0.999
    hot = pred.predict_one(f)
    assert hot.label == plain.label and hot.confidence < plain.confidence and hot.unsure


def test_auto_backend_uses_a_current_export_only(onnx_model, tmp_path):
    model = onnx_model.with_suffix(".safetensors")
    fast, why = current_onnx(model)
    assert fast is not None and "current" in why
    assert current_onnx(model, "torch")[0] is None
    other = tmp_path / "model.safetensors"
    shutil.copy2(model, other)
    assert current_onnx(other)[0] is None  # no export beside it


BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
from ursa.cli import main
rc = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')]
sys.exit(rc)
"""


def test_predict_runs_with_torch_unimportable(onnx_model, tmp_path):
    images = sorted(HELDOUT.glob("*.jpg"))[:3]
    alone = tmp_path / "bears.onnx"
    shutil.copy2(onnx_model, alone)
    for model in (alone, onnx_model.with_suffix(".safetensors")):  # an .onnx file, or a current one beside the model
        r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "predict", str(model), *map(str, images), "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert [line["file"] for line in lines] == list(map(str, images))
        assert "backend: onnxruntime" in r.stderr


def test_cli_predict_folder_streams_and_exit_codes(onnx_model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted(HELDOUT.glob("*.jpg"))[:3]:
        shutil.copy2(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    assert main(["predict", str(onnx_model), str(folder)]) == 1  # some unreadable: the rest predicted
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "1 of 4 images could not be read" in err and "backend: onnxruntime" in err
    assert main(["predict", str(onnx_model), str(folder / "broken.jpg")]) == 2  # the one input is bad
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(onnx_model), str(empty)]) == 2


def _one_output_export(model: Path, out: Path) -> Path:
    """An ONNX file as `ursa export --onnx` wrote it before the features output: logits only, same metadata."""
    from ursa.inference.export import ONNX_INPUT, ONNX_OUTPUT, onnx_props, set_props
    from ursa.inference.modelfile import load_model
    from ursa.inference.static import export_graph

    net, meta = load_model(model)
    proto = export_graph(net, meta.input_size, ONNX_INPUT, ONNX_OUTPUT)
    set_props(proto, onnx_props(meta))
    out.write_bytes(proto.SerializeToString())
    return out


def test_probs_and_features_match_torch_calibrated(onnx_model):
    """The ONNX predictor's (probs, features) are torch Predictor.probs_and_features': temperature applied, same shapes."""
    import torch

    from ursa.inference.predictor import load_predictor

    onnx_pred = load_onnx(onnx_model)
    torch_pred = load_predictor(onnx_model.with_suffix(".safetensors"), backend="torch")
    files = sorted(HELDOUT.glob("*.jpg"))[:4]
    x = np.stack([onnx_pred.preprocess(f) for f in files])
    for t in (1.0, 2.5):  # a real temperature too: it must divide the logits on both backends alike
        onnx_pred.temperature = torch_pred.temperature = t
        p, f = onnx_pred.probs_and_features(x)
        tp, tf = torch_pred.probs_and_features(torch.from_numpy(x))
        assert p.dtype == f.dtype == np.float32 and p.shape == tuple(tp.shape) and f.shape == tuple(tf.shape)
        assert np.abs(p - tp.numpy()).max() < 1e-4 and np.abs(f - tf.numpy()).max() < 1e-3
    assert np.allclose(onnx_pred.probs_and_features(x)[0], onnx_pred.probs(x), atol=1e-7)


def test_an_export_without_features_still_predicts_and_interpret_falls_back(onnx_model, tmp_path):
    from ursa.inference.runtime import NoFeaturesOutput, current_onnx_with_features

    model = tmp_path / "model.safetensors"
    shutil.copy2(onnx_model.with_suffix(".safetensors"), model)
    old = _one_output_export(model, tmp_path / "model.onnx")
    pred = load_onnx(old)
    assert not pred.has_features and len(pred.predict_batch(sorted(HELDOUT.glob("*.jpg"))[:2])) == 2
    with pytest.raises(NoFeaturesOutput, match="export it again"):
        pred.probs_and_features(np.zeros((1, 3, pred.size, pred.size), np.float32))
    fast, why = current_onnx(model)
    assert fast is not None  # predict and serve still take it
    fast, why = current_onnx_with_features(model)
    assert fast is None and "no body-features output" in why  # interpret and clean run torch, and say why
    assert current_onnx_with_features(onnx_model.with_suffix(".safetensors"))[0] is not None
