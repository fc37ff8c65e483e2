"""Multi-label end to end on a generated set (tests/synthetic_sets.label_sets): train, the model file, both
backends, serve, the empty label set, the per-label thresholds, and single-label files unchanged."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
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
            explained = c.post("/explain", content=data, headers={"content-type": "image/png"}).json()
            assert [x["label"] for x in explained["labels"]] == [x["label"] for x in body["labels"]]  # sigmoids there too


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


# --- later stages ---------------------------------------------------------------------------------


def test_interpret_shows_per_label_errors_and_confused_pairs(ml_run, ml_dir, tmp_path):
    from ursa.diagnose.interpret import interpret_model
    from ursa.diagnose.label_report import write_interpretation

    interp = interpret_model(ml_run / "model.safetensors", ml_dir)
    assert interp.thresholds is not None and len(interp) == len(_valid(ml_run))
    files, fig = write_interpretation(tmp_path, interp, None, {}, {"title": "t"}, ml_dir)
    assert [r["label"] for r in fig["labels"]] == ["blue", "green", "red"]
    assert 0 <= fig["macro_f1"] <= 1 and isinstance(fig["confused_pairs"], list)
    data = json.loads(files["json"].read_text())["multilabel"]
    assert data["n_images"] == len(interp)
    for label, e in data["errors"].items():  # a miss carries the label and is under its threshold, and the reverse
        j = interp.classes.index(label)
        for name, p in e["missed"]:
            assert p < interp.thresholds[j]
        for name, p in e["added"]:
            assert p >= interp.thresholds[j]


def test_confused_pairs_count_a_label_missed_while_another_is_given():
    from ursa.diagnose.multilabel import confused_pairs

    t = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    p = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.9], [0.0, 0.9, 0.0]])
    assert confused_pairs(p, t, ["a", "b", "c"], [0.5] * 3) == [("a", "b", 2), ("a", "c", 1)]


def test_clean_ranks_planted_label_errors_and_decides_one_label(ml_run, ml_dir, tmp_path):
    import shutil

    from ursa.apps.clean.label_sets import LabelSetDecisions, clean_label_sets

    data = tmp_path / "data"
    shutil.copytree(ml_dir, data)
    rows = (data / "labels.csv").read_text().splitlines()
    planted = []
    for i, line in enumerate(rows[1:], 1):  # take "red" off a few images that carry it
        name, label = line.split(",", 1)
        if "red" in label.split() and len(planted) < 4 and i % 3 == 0:
            rows[i] = f"{name},{' '.join(c for c in label.split() if c != 'red')}"
            planted.append(name)
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    issues, _ = clean_label_sets(data, ml_run / "model.safetensors", data / "labels.csv")
    order = [issues.names[i] for i in np.argsort(issues.quality, kind="stable")]
    top = order[: 3 * len(planted)]
    assert sum(n in top for n in planted) >= len(planted) // 2, (planted, top)
    for n in planted:
        if n in [issues.names[i] for i in issues.issues]:
            assert issues.suggestion(issues.names.index(n))[:2] == ("add", "red")
    path = issues.write_csv(tmp_path / "label_issues.csv")
    assert path.read_text().splitlines()[0] == "name,labels,quality,likely_error,suggest,label,prob"

    names = issues.names
    labels = [" ".join(c for c, v in zip(issues.classes, row) if v) for row in issues.targets]
    d = LabelSetDecisions(data, names, labels, issues.classes)
    d.add(planted[0], "red")
    d.remove(names[7], "blue")  # img007 carries all three
    d.remove(names[7], "green")
    again = LabelSetDecisions(data, names, labels, issues.classes)  # a new process replays the log
    assert again.load() == 3
    assert set(again.label_of(planted[0]).split()) == set(labels[names.index(planted[0])].split()) | {"red"}
    assert again.label_of(names[7]) == "red"
    cleaned = dict(r.split(",", 1) for r in (data / "cleaned.csv").read_text().splitlines()[1:])
    assert cleaned[names[7]] == "red"
    with pytest.raises(ValueError):
        d.add(names[0], "purple")


def test_int8_compares_whole_label_sets(ml_run):
    from ursa.inference.quantize import answer_key, label_key
    from ursa.inference.results import Prediction
    from ursa.inference.runtime import load_onnx

    p = load_onnx(ml_run / "model.onnx")
    ans = Prediction("red", 2, {"blue": 0.9, "green": 0.1, "red": 0.95}, chosen=["red", "blue"])
    assert answer_key(p, ans) == label_key(p, "blue red") == 0b101
    assert label_key(p, "") == 0 and label_key(p, "purple") == -2
    assert answer_key(p, Prediction("red", 2, {"blue": 0.1, "green": 0.1, "red": 0.2}, chosen=[])) == 0


@pytest.mark.browser
def test_serve_page_shows_the_label_set(ml_run, ml_dir, browser):
    import socket
    import threading
    import time

    import uvicorn

    from tests.conftest import wait_until
    from ursa.apps.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ml_run / "model.safetensors", backend="torch"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(f"http://127.0.0.1:{port}/")
        wait_until(page, "document.getElementById('model-info').textContent.includes('classes')")
        from ursa.inference.predictor import load_predictor

        want = load_predictor(ml_run / "model.safetensors", backend="torch").predict_one(ml_dir / "img007.png").chosen
        page.set_input_files("#file", str(ml_dir / "img007.png"))
        page.wait_for_selector("#bars .bar", timeout=30_000)
        assert page.text_content("#label") == (", ".join(want) or "no label")
        assert "its own threshold" in page.text_content("#confidence")
        page.close()
    finally:
        server.should_exit = True
        t.join(10)
