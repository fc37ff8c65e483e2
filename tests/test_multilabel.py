"""Multi-label end to end on a generated set (tests/synthetic_sets.label_sets): train, the model file, both
backends, serve, the empty label set, the per-label thresholds, and single-label files unchanged."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import HELDOUT, ROOT
from tests.synthetic_sets import label_sets


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory) -> Path:
    return label_sets(tmp_path_factory.mktemp("label_sets"), n=120)


@pytest.fixture(scope="module")
def ml_run(ml_dir, tmp_path_factory) -> Path:
    """A multi-label model trained briefly (frozen stage, 64 px) by the default recipe with the budget 0."""
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    out = tmp_path_factory.mktemp("ml_run")
    train(TrainConfig(data=ml_dir, csv=ml_dir / "labels.csv", multi_label=True, out=out, epochs=6, lr=1e-2,
                      budget=0, size=64, quiet=True))
    return out


def _valid(run: Path) -> list[tuple[str, set[str]]]:
    from ursa.vision.data import read_split

    return [(n, set(label.split())) for n, label, v in read_split(run / "split.csv") if v]


# --- reading label sets -------------------------------------------------------------------------


def test_label_sets_are_read_with_the_empty_set_and_another_separator(tmp_path):
    from ursa.vision.labelsets import decode, encode, load_labelled, multi_hot

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"")
    (tmp_path / "l.csv").write_text("name,label,is_valid\na.png,road;river,0\nb.png,,1\nc.png,river ; road;river,0\n")
    ds = load_labelled(tmp_path, tmp_path / "l.csv", 0.2, 42, label_delim=";")
    assert ds.multi_label and ds.classes == ["river", "road"]
    assert [ds.label_indices(i) for i in range(3)] == [[0, 1], [], [0, 1]]
    assert ds.label_text(0) == "river;road" and ds.label_text(1) == ""
    assert ds.class_counts() == {"river": 2, "road": 2}
    assert decode(encode([0, 5, 61])) == [0, 5, 61]
    y = torch.tensor([encode([1]), 0, -3])  # -3: an unreadable item's label (loaders.failed_label): no target
    assert multi_hot(y, 2).tolist() == [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_multi_label_needs_a_csv_one_line(ml_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ursa", "train", str(ml_dir), "--multi-label", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert r.returncode == 2, r.stderr
    assert "--csv" in r.stderr and "Traceback" not in r.stderr


# --- the figures ----------------------------------------------------------------------------------


def test_figures_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score

    from ursa.diagnose.multilabel import choose_thresholds, label_figures

    rng = np.random.default_rng(0)
    t = rng.random((60, 4)) < 0.4
    p = np.clip(t * 0.5 + rng.random((60, 4)) * 0.6, 0, 1)
    f = label_figures(p, t, list("abcd"), [0.5] * 4)
    pred = p >= 0.5
    assert f.macro_f1 == pytest.approx(f1_score(t, pred, average="macro", zero_division=0))
    assert f.samples_f1 == pytest.approx(f1_score(t, pred, average="samples", zero_division=1))
    assert f.mean_ap == pytest.approx(np.mean([average_precision_score(t[:, k], p[:, k]) for k in range(4)]))
    th = choose_thresholds(p, t)
    tuned = label_figures(p, t, list("abcd"), th)
    assert tuned.macro_f1 >= f.macro_f1  # chosen on these images: never worse than 0.5 here
    few = t.copy()
    few[:, 0] = False
    few[0, 0] = True  # one positive: too few to choose on, 0.5 kept
    assert choose_thresholds(p, few)[0] == 0.5


# --- a run --------------------------------------------------------------------------------------------


def test_run_writes_multi_label_figures_and_thresholds(ml_run):
    from ursa.inference.header import read_meta

    meta = read_meta(ml_run / "model.safetensors")
    assert meta.task == "multi_label" and meta.classes == ["blue", "green", "red"]
    assert len(meta.thresholds) == 3 and all(0 < t < 1 for t in meta.thresholds)
    assert meta.calibration["temperature"] > 0 and meta.calibration["threshold"] is None
    rows = list(csv.DictReader(open(ml_run / "history.csv")))
    assert {"macro_f1", "samples_f1", "map"} <= set(rows[0])
    best = max(float(r["macro_f1"]) for r in rows)
    assert best > 0.7, rows  # the blobs are easy: the head learns them
    for r in rows:  # the loop's error rate is 1 - macro F1 (at 0.5): the best epoch is chosen on a multi-label figure
        assert float(r["error_rate"]) == pytest.approx(1 - float(r["macro_f1"]), abs=1e-5)
    report = json.loads((ml_run / "report.json").read_text())
    ml = report["multilabel"]
    assert [x["label"] for x in ml["labels"]] == meta.classes
    assert [x["threshold"] for x in ml["labels"]] == pytest.approx(meta.thresholds, abs=1e-6)
    assert ml["macro_f1"] > 0.7 and ml["map"] > 0.8
    assert "Labels (multi-label)" in (ml_run / "report.html").read_text()
    split = (ml_run / "split.csv").read_text().splitlines()
    assert "img000.png,,False" in split or "img000.png,,True" in split  # the empty set, written as an empty cell


def test_both_backends_answer_the_same_label_sets(ml_run, ml_dir):
    from ursa.inference.predictor import load_predictor

    torch_p = load_predictor(ml_run / "model.safetensors", backend="torch")
    onnx_p = load_predictor(ml_run / "model.safetensors", backend="onnx")
    assert onnx_p.backend == "onnx" and torch_p.backend == "torch"
    valid = _valid(ml_run)
    files = [ml_dir / n for n, _ in valid]
    a, b = torch_p.predict_batch(files), onnx_p.predict_batch(files)
    right = 0
    for (name, truth), pa, pb in zip(valid, a, b):
        assert pa.chosen == pb.chosen, name
        assert list(pa.probs.values()) == pytest.approx(list(pb.probs.values()), abs=1e-4)
        assert sum(pa.probs.values()) != pytest.approx(1.0, abs=1e-3) or len(pa.chosen) != 1  # sigmoids, not a softmax
        right += set(pa.chosen) == truth
        j = pa.to_json()
        assert [x["label"] for x in j["labels"]] == pa.chosen
        assert all(x["prob"] >= torch_p.thresholds[torch_p.classes.index(x["label"])] for x in j["labels"])
    assert right >= len(valid) // 2, (right, len(valid))


def test_thresholds_are_used_and_the_empty_set_is_an_answer(ml_run, ml_dir):
    from ursa.inference.predictor import load_predictor

    for backend in ("torch", "onnx"):
        p = load_predictor(ml_run / "model.safetensors", backend=backend)
        image = ml_dir / "img007.png"  # red, green and blue
        probs = p.predict_one(image).probs
        p.thresholds = [1.0, 1.0, 1.0]  # nothing reaches a threshold of 1: the empty set
        empty = p.predict_one(image)
        assert empty.chosen == [] and empty.to_json()["labels"] == [] and empty.answer_text == "no label"
        p.thresholds = [0.0, 1.0, 1.0]
        assert p.predict_one(image).chosen == ["blue"]
        mid = sorted(probs.values())[1]  # between the two smallest and the largest: exactly the labels above it
        p.thresholds = [mid] * 3
        assert set(p.predict_one(image).chosen) == {c for c, v in probs.items() if v >= mid}


def test_cli_predict_prints_the_set(ml_run, ml_dir):
    r = subprocess.run([sys.executable, "-m", "ursa", "predict", str(ml_run / "model.safetensors"),
                        str(ml_dir / "img007.png"), "--json"], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(out["labels"], list) and set(out["probs"]) == {"blue", "green", "red"}


def test_serve_answers_labels(ml_run, ml_dir):
    from starlette.testclient import TestClient

    from ursa.apps.serve import create_app

    for backend in ("torch", "auto"):
        with TestClient(create_app(ml_run / "model.safetensors", backend=backend), raise_server_exceptions=False) as c:
            data = (ml_dir / "img007.png").read_bytes()
            r = c.post("/predict", content=data, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert isinstance(body["labels"], list)
            assert all(set(x) == {"label", "prob"} for x in body["labels"])
            model = c.get("/model").json()
            assert model["task"] == "multi_label" and len(model["thresholds"]) == 3


# --- single-label files unchanged ---------------------------------------------------------------


def test_single_label_file_loads_with_defaults_and_answers_as_before(tiny_model):
    from ursa.inference.header import read_meta
    from ursa.inference.predictor import load_predictor

    meta = read_meta(tiny_model)
    assert meta.task == "single_label" and meta.thresholds == []
    img = sorted(HELDOUT.glob("*.jpg"))[0]
    for backend in ("torch", "onnx"):
        p = load_predictor(tiny_model, backend=backend)
        ans = p.predict_one(img)
        assert ans.chosen is None and "labels" not in ans.to_json()
        assert sum(ans.probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert ans.answer_text == f"{ans.label} ({ans.confidence:.3f})"


def test_a_header_without_task_fields_loads_and_bad_ones_are_one_line(tiny_model):
    from ursa.errors import ModelFileError
    from ursa.inference.header import read_header
    from ursa.inference.metaschema import ModelMeta

    h = dict(read_header(tiny_model))
    h.pop("task", None)
    h.pop("thresholds", None)
    meta = ModelMeta.from_header(h, tiny_model)  # a file written before multi-label existed
    assert meta.task == "single_label" and meta.thresholds == []
    for key, value, words in (("task", "multi", "task"), ("thresholds", "[0.5]", "thresholds"),
                              ("thresholds", "[2]", "thresholds")):
        with pytest.raises(ModelFileError, match=words):
            ModelMeta.from_header({**h, key: value}, tiny_model)
