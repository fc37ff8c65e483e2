"""Issue 16's parts where they meet the other stages: verify lists duplicates, predict and serve answer 'unsure'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.conftest import SAMPLE


def test_verify_lists_exact_and_near_duplicates_per_class_and_leaves_them(tmp_path):
    from PIL import Image

    from ursa.acquire.verify import verify_images

    root = tmp_path / "data"
    teddies, grizzlies = sorted((SAMPLE / "teddy").iterdir()), sorted((SAMPLE / "grizzly").iterdir())
    (root / "teddy").mkdir(parents=True)
    (root / "grizzly").mkdir()
    a = shutil.copy(teddies[0], root / "teddy" / "a.jpg")
    shutil.copy(a, root / "teddy" / "a_copy.jpg")
    Image.open(a).resize((150, 150)).save(root / "teddy" / "a_small.png")  # a near twin: other size and format
    shutil.copy(teddies[1], root / "teddy" / "other.jpg")
    shutil.copy(grizzlies[0], root / "grizzly" / "b.jpg")
    summary = verify_images(root, progress=False)
    groups = summary.to_dict()["duplicates"]["groups"]
    teddy = [g for g in groups if g["labels"] == ["teddy"]]
    assert len(teddy) == 1 and set(teddy[0]["files"]) == {"teddy/a.jpg", "teddy/a_copy.jpg", "teddy/a_small.png"}
    assert "Duplicates (" in summary.format() and "teddy/a_copy.jpg" in summary.format()
    assert (root / "teddy" / "a_copy.jpg").is_file()  # listed, never moved
    assert verify_images(root, progress=False, duplicates=False).duplicates is None


def _unsure_everywhere(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with a stored threshold no answer reaches (1.0): every answer is 'unsure'."""
    from safetensors.torch import load_file, save_file

    from ursa.inference.modelfile import read_header

    header = dict(read_header(tiny_model))
    cal = json.loads(header.get("calibration", "{}") or "{}")
    cal.update({"temperature": cal.get("temperature", 1.0), "threshold": 1.0})
    header["calibration"] = json.dumps(cal)
    out = tmp_path / "model.safetensors"
    save_file(load_file(str(tiny_model)), str(out), metadata=header)
    return out


def test_predict_answers_unsure_below_the_stored_threshold_and_unsure_0_turns_it_off(tiny_model, tmp_path, capsys):
    from ursa.cli import main

    model = _unsure_everywhere(tiny_model, tmp_path)
    img = next((SAMPLE / "grizzly").iterdir())
    assert main(["predict", str(model), str(img), "--backend", "torch"]) == 0
    assert ": unsure (best guess " in capsys.readouterr().out
    assert main(["predict", str(model), str(img), "--backend", "torch", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["unsure"] is True and row["threshold"] == 1.0 and {"file", "label", "index", "probs"} <= set(row)
    assert main(["predict", str(model), str(img), "--backend", "torch", "--unsure", "0"]) == 0
    assert "unsure" not in capsys.readouterr().out


def test_serve_threshold_per_request(tiny_model, tmp_path):
    from ursa.apps.serve import create_app

    model = _unsure_everywhere(tiny_model, tmp_path)
    data = next((SAMPLE / "teddy").iterdir()).read_bytes()
    with TestClient(create_app(model, backend="torch"), raise_server_exceptions=False) as c:
        assert c.post("/predict", content=data).json()["unsure"] is True
        off = c.post("/predict?threshold=none", content=data).json()
        assert off["unsure"] is False and off["threshold"] is None
        assert c.post("/predict?threshold=0.0", content=data).json()["unsure"] is False
        bad = c.post("/predict?threshold=2", content=data)
        assert bad.status_code == 422 and "threshold" in bad.json()["error"]
        batch = c.post("/predict/batch?threshold=off", files=[("files", ("a.jpg", data, "image/jpeg"))]).json()
        assert batch[0]["unsure"] is False


def test_show_out_may_be_a_folder(tmp_path):
    from ursa.cli import main

    out = tmp_path / "grid"
    out.mkdir()
    assert main(["show", str(SAMPLE), "--out", str(out), "--n", "4"]) == 0
    assert (out / "batch.png").is_file()


def test_crafted_numbers_in_a_model_header_are_one_line(tiny_model, tmp_path, capsys):
    """10**400 overflows math.isfinite; a temperature of 1e-300 would turn every answer into NaN."""
    from safetensors.torch import load_file, save_file

    from ursa.cli import main
    from ursa.inference.modelfile import read_header

    img = next((SAMPLE / "teddy").iterdir())
    for key, value in (("mean", "[1" + "0" * 400 + ", 0.5, 0.5]"), ("calibration", '{"temperature": 1e-300}'),
                       ("calibration", '{"temperature": 1' + "0" * 400 + "}")):
        header = dict(read_header(tiny_model))
        header[key] = value
        bad = tmp_path / "bad.safetensors"
        save_file(load_file(str(tiny_model)), str(bad), metadata=header)
        assert main(["predict", str(bad), str(img), "--backend", "torch"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and key in err and "Traceback" not in err


def test_a_crafted_preprocess_entry_is_one_clear_error():
    """Missing scale, a crop that is not the model's size, non-numbers: refused at load, not on every request."""
    import copy

    from ursa.errors import ModelFileError
    from ursa.inference.preprocess import check_spec, preprocess_spec

    good = preprocess_spec(224, [0.5] * 3, [0.5] * 3)
    assert check_spec(good, "m.onnx", 224) == good
    for change in (lambda s: s.pop("scale"), lambda s: s["crop"].update(size=[100, 100]),
                   lambda s: s.update(mean=["a", 0, 0]), lambda s: s.update(std=[1e999, 1, 1])):
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(ModelFileError, match="preprocess metadata"):
            check_spec(bad, "m.onnx", 224)
    with pytest.raises(ModelFileError):
        check_spec(good, "m.onnx", 128)  # made for another input size


def test_a_damaged_model_onnx_beside_the_model_falls_back_to_torch(tiny_run, tmp_path, capsys):
    """ursa train writes model.onnx every time: a broken one must not stop the model file itself from running."""
    from ursa.cli import main
    from ursa.inference.runtime import current_onnx

    model = tmp_path / "model.safetensors"
    shutil.copy2(tiny_run / "model.safetensors", model)
    model.with_suffix(".onnx").write_bytes(b"not an onnx file")
    pred, why = current_onnx(model, "auto")
    assert pred is None and "unusable" in why
    img = next((SAMPLE / "teddy").iterdir())
    assert main(["predict", str(model), str(img)]) == 0
    assert "backend: torch" in capsys.readouterr().err
    assert main(["predict", str(model), str(img), "--backend", "onnx"]) == 2  # asked for ONNX: say it cannot
