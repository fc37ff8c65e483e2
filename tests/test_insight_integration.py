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
