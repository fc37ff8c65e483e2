"""Interpretation: the numbers on hand-made predictions, then a real model on the bundled sample."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from ursa.diagnose.interpret import Interpretation, interpret_model, load_items

CLASSES = ["black", "grizzly", "teddy"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_interp() -> Interpretation:
    """Six images: two mistakes (grizzly seen as black twice... once very sure), one unsure hit."""
    targets = [0, 0, 1, 1, 1, 2]
    probs = [
        [0.9, 0.05, 0.05],  # black, right
        [0.6, 0.3, 0.1],  # black, right
        [0.8, 0.1, 0.1],  # grizzly -> black, sure and wrong
        [0.5, 0.4, 0.1],  # grizzly -> black
        [0.1, 0.85, 0.05],  # grizzly, right
        [0.05, 0.05, 0.9],  # teddy, right
    ]
    files = [f"{CLASSES[t]}/{i}.jpg" for i, t in enumerate(targets)]
    return Interpretation(CLASSES, files, [None] * 6, np.array(targets), np.array(probs))


def test_confusion_matrix_rows_are_actual_columns_predicted():
    cm = make_interp().confusion_matrix()
    assert cm.tolist() == [[2, 0, 0], [2, 1, 0], [0, 0, 1]]
    assert cm.sum() == 6


def test_most_confused_and_error_rate():
    it = make_interp()
    assert it.most_confused() == [("grizzly", "black", 2)]
    assert it.most_confused(min_val=3) == []
    assert it.error_rate == pytest.approx(2 / 6)


def test_precision_and_recall_per_class():
    per = make_interp().per_class()
    assert per["black"] == {"precision": pytest.approx(2 / 4), "recall": 1.0, "support": 2}
    assert per["grizzly"] == {"precision": 1.0, "recall": pytest.approx(1 / 3), "support": 3}
    assert per["teddy"]["precision"] == 1.0 and per["teddy"]["recall"] == 1.0


def test_top_losses_are_cross_entropy_highest_first_with_the_predictions_probability():
    top = make_interp().top_losses(3)
    assert [t[0] for t in top] == ["grizzly/2.jpg", "grizzly/3.jpg", "black/1.jpg"]
    file, actual, pred, loss, prob = top[0]
    assert (actual, pred) == ("grizzly", "black")
    assert loss == pytest.approx(-math.log(0.1)) and prob == pytest.approx(0.8)
    assert len(make_interp().top_losses()) == 6


def test_confusion_text_and_json():
    it = make_interp()
    text = it.confusion_text()
    assert "predicted" in text and "actual" in text and text.count("\n") >= 4
    d = it.to_json()
    assert d["confusion_matrix"] == [[2, 0, 0], [2, 1, 0], [0, 0, 1]]
    assert d["most_confused"] == [["grizzly", "black", 2]]
    assert d["top_losses"][0][:3] == ["grizzly/2.jpg", "grizzly", "black"]


def test_empty_interpretation_does_not_crash():
    it = Interpretation(CLASSES, [], [], np.zeros(0), np.zeros((0, 3)))
    assert math.isnan(it.error_rate) and it.most_confused() == [] and it.top_losses() == []
    assert it.confusion_matrix().sum() == 0


# --- a real model --------------------------------------------------------------------------------


def _valid_names(split_csv):
    with open(split_csv, newline="") as f:
        return [r["name"] for r in csv.DictReader(f) if r["is_valid"] == "True"]


@pytest.mark.slow
def test_validation_set_comes_from_split_csv_beside_the_model(tiny_model, tiny_run, sample_dir):
    it = interpret_model(tiny_model, sample_dir)
    assert it.split == "valid" and it.classes == CLASSES
    assert sorted(it.files) == sorted(_valid_names(tiny_run / "split.csv"))
    assert it.probs.shape == (len(it), 3) and np.allclose(it.probs.sum(1), 1, atol=1e-4)
    with open(tiny_run / "history.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert abs(it.error_rate - float(last["error_rate"])) <= 1 / len(it) + 1e-9, "same model, same images"
    assert it.features is not None and it.features.shape[0] == len(it), "body features for the embedding map"
    report = json.loads((tiny_run / "report.json").read_text())
    assert np.allclose(sorted(it.probs.max(1)), sorted(p for *_, p in report["top_losses"]), atol=1e-3), \
        "calibrated probabilities, as the training report shows them"


@pytest.mark.slow
def test_without_split_csv_the_split_is_recomputed_identically(tiny_model, tiny_run, sample_dir, tmp_path):
    lone = tmp_path / "model.safetensors"
    shutil.copy(tiny_model, lone)
    items, split, skipped = load_items(lone, sample_dir, CLASSES)
    assert split == "valid" and not skipped
    assert sorted(n for n, _, _ in items) == sorted(_valid_names(tiny_run / "split.csv"))


@pytest.mark.slow
def test_all_images_and_unreadable_files_are_skipped_and_counted(tiny_model, sample_dir, tmp_path, capsys):
    from ursa.cli import main

    data = tmp_path / "data"
    for c in CLASSES:
        (data / c).mkdir(parents=True)
        for f in sorted((sample_dir / c).iterdir())[:3]:
            shutil.copy(f, data / c / f.name)
    (data / "teddy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (data / "grizzly" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["interpret", str(tiny_model), str(data), "--out", str(out), "--all", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "on 9 images" in cap.out and "2 skipped" in cap.out
    assert "skipped teddy/broken.jpg" in cap.err
    import json

    d = json.loads((out / "report.json").read_text())
    assert d["split"] == "all" and d["n_items"] == 9 and len(d["top_losses"]) == 9
    assert sorted(s[0] for s in d["skipped"]) == ["grizzly/empty.png", "teddy/broken.jpg"]
    assert "teddy/broken.jpg" in (out / "report.html").read_text()


@pytest.mark.slow
def test_cli_interpret_writes_the_report_and_prints_the_summary(tiny_model, sample_dir, tmp_path, capsys):
    from ursa.cli import main

    out = tmp_path / "interp"
    rc = main(["interpret", str(tiny_model), str(sample_dir), "--out", str(out), "--top", "4", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "error rate" in text and "validation images" in text and "most confused" in text
    assert "precision" in text and "<- predicted" in text
    for name in ("report.html", "report.json", "confusion_matrix.png", "top_losses.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("<div class='card") == 4
    assert "Rules checked" in html, "history.csv beside the model: its advice is in the report"
    assert "backend: ONNX Runtime (model.onnx is current)" in text  # train wrote model.onnx beside the model
    assert json.loads((out / "report.json").read_text())["info"]["backend"].startswith("ONNX Runtime")


def test_cli_interpret_refuses_classes_the_model_does_not_know(tiny_model, tmp_path, capsys):
    from tests.conftest import make_image
    from ursa.cli import main

    for c in ("cat", "dog"):
        for k in range(3):
            make_image(tmp_path / "pets" / c / f"{k}.jpg")
    rc = main(["interpret", str(tiny_model), str(tmp_path / "pets"), "--out", str(tmp_path / "o"), "--all", "-q"])
    assert rc == 2
    assert "not classes of the model" in capsys.readouterr().err


def test_without_split_csv_the_runs_own_split_settings_are_used(tiny_model, sample_dir, tmp_path):
    """A run with another split seed and share: its config (in the model file) decides, not train's defaults."""
    from ursa.vision.data import load_dataset, split_settings

    assert split_settings(None) == (0.2, 42)
    assert split_settings({"seed": 3, "split_seed": None, "valid_pct": 0.3}) == (0.3, 3)
    config = {"seed": 0, "split_seed": 7, "valid_pct": 0.5}
    assert split_settings(config) == (0.5, 7)
    lone = tmp_path / "model.safetensors"  # no split.csv beside it
    shutil.copy(tiny_model, lone)
    items, split, _ = load_items(lone, sample_dir, ["black", "grizzly", "teddy"], config=config)
    ds = load_dataset(sample_dir, valid_pct=0.5, seed=7)
    assert split == "valid" and sorted(n for n, _, _ in items) == sorted(ds.rel(i) for i in ds.valid_idx)
    assert sorted(n for n, _, _ in items) != sorted(load_dataset(sample_dir).rel(i) for i in load_dataset(sample_dir).valid_idx)


@pytest.mark.slow
def test_onnx_and_torch_backends_interpret_alike(tiny_model, tiny_run, sample_dir, tmp_path):
    """A current model.onnx beside the model runs interpret on ONNX Runtime, with torch's numbers within tolerance."""
    assert (tiny_run / "model.onnx").is_file(), "ursa train writes model.onnx beside the model"
    fast = interpret_model(tiny_model, sample_dir)
    slow = interpret_model(tiny_model, sample_dir, backend="torch")
    assert fast.backend.startswith("ONNX Runtime") and slow.backend.startswith("torch")
    assert fast.files == slow.files and fast.error_rate == slow.error_rate
    assert np.abs(fast.probs - slow.probs).max() < 1e-4, "calibrated on both: the same temperature"
    assert fast.features is not None and np.abs(fast.features - slow.features).max() < 1e-3
    assert [t[0] for t in fast.top_losses(5)] == [t[0] for t in slow.top_losses(5)]
    lone = tmp_path / "model.safetensors"  # no export beside it: torch, and the reason is said
    shutil.copy(tiny_model, lone)
    shutil.copy(tiny_run / "split.csv", tmp_path / "split.csv")
    alone = interpret_model(lone, sample_dir)
    assert alone.backend.startswith("torch (no model.onnx beside the model") and alone.error_rate == slow.error_rate
