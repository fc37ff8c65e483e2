"""Issue 23, open world: "none of these" in both backends and in serve, old model files, the threshold's share,
prediction-set coverage, /metrics as Prometheus text and /health's drift line.

The model is trained here on generated pictures of two kinds (soft colour blobs, warm and cool) and
asked about a generated picture of neither (a black and white checkerboard).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from starlette.testclient import TestClient

from tests.conftest import ROOT

N_PER_CLASS = 20


def blob_image(rng: np.random.Generator, warm: bool, size: int = 64) -> Image.Image:
    """A soft blob of a warm (red-orange) or cool (blue-green) colour on a light background, with noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    colour = np.array([220, rng.uniform(60, 140), 40]) if warm else np.array([40, rng.uniform(120, 200), 220])
    img = (1 - mask) * 235 + mask * colour + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def checkerboard(size: int = 64, cell: int = 4) -> Image.Image:
    """Nothing like either class: hard black and white squares."""
    yy, xx = np.mgrid[0:size, 0:size] // cell
    board = ((yy + xx) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, -1))


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A model trained on the two generated kinds (frozen stage, 64 px), with its ONNX export, and two test pictures."""
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    root = tmp_path_factory.mktemp("open_world")
    rng = np.random.default_rng(0)
    for kind in ("warm", "cool"):
        (root / "data" / kind).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            blob_image(rng, kind == "warm").save(root / "data" / kind / f"{i}.png")
    checkerboard().save(root / "checker.png")
    blob_image(np.random.default_rng(99), True).save(root / "warm_new.png")
    train(TrainConfig(data=root / "data", out=root / "run", epochs=2, unfreeze_epochs=0, size=64, quiet=True))
    return root


def test_an_unrelated_picture_is_unknown_in_both_backends(world_run):
    from ursa.inference.predictor import load_predictor
    from ursa.inference.runtime import load_onnx

    model = world_run / "run" / "model.safetensors"
    torch_pred = load_predictor(model, backend="torch")
    onnx_pred = load_onnx(world_run / "run" / "model.onnx")
    for pred in (torch_pred, onnx_pred):
        far = pred.predict_one(world_run / "checker.png")
        near = pred.predict_one(world_run / "warm_new.png")
        assert far.unknown is True, (pred.backend, far)
        assert far.unknown_score > far.unknown_threshold
        assert far.shown == f"none of these (closest: {far.label})"
        assert near.unknown is False and near.label == "warm", (pred.backend, near)
        assert near.to_json()["unknown"] is False and "unknown_score" in near.to_json()
    a = torch_pred.predict_one(world_run / "checker.png").unknown_score
    b = onnx_pred.predict_one(world_run / "checker.png").unknown_score
    assert a == pytest.approx(b, abs=1e-3)  # one scorer, the same features from either backend


def test_the_threshold_keeps_the_stated_share_of_validation_pictures():
    from ursa.diagnose.openset import fit_unknown

    rng = np.random.default_rng(1)
    train = rng.normal(size=(400, 64)) + 3 * np.eye(64)[rng.integers(0, 4, 400)]
    valid = rng.normal(size=(200, 64)) + 3 * np.eye(64)[rng.integers(0, 4, 200)]
    for keep in (0.5, 0.9, 0.95):
        det = fit_unknown(train, valid, keep, dims=32)
        kept = float((det.score(valid) <= det.threshold).mean())
        assert keep <= kept <= keep + 1 / len(valid) + 1e-9, (keep, kept)
        assert det.figures["kept_valid"] == pytest.approx(kept)
    assert det.threshold_for(0.5) < det.threshold_for(0.95)  # --keep / ?keep= for one call


def test_the_trained_model_records_its_threshold_and_figures(world_run):
    from ursa.inference.header import read_meta

    meta = read_meta(world_run / "run" / "model.safetensors")
    o = meta.openset
    assert o["method"] == "knn" and o["keep"] == 0.95
    n_valid = o["figures"]["n_valid"]
    kept = sum(s <= o["threshold"] for s in o["valid_scores"]) / n_valid
    assert 0.95 <= kept <= 0.95 + 1 / n_valid + 1e-9 and o["figures"]["kept_valid"] == pytest.approx(kept)
    assert meta.conformal["scores"] and len(meta.conformal["scores"]) == n_valid
    report = json.loads((world_run / "run" / "report.json").read_text())
    assert report["open_world"]["unknown"]["fitted"] and set(report["open_world"]["sets"]["per_class"]) == {"cool", "warm"}
    assert "Open world" in (world_run / "run" / "report.html").read_text()


def test_interpret_reports_unknown_scores_and_set_coverage(world_run):
    from ursa.diagnose.interpret import interpret_model

    interp = interpret_model(world_run / "run" / "model.safetensors", world_run / "data")
    u = interp.open_world["unknown"]
    assert u["fitted"] and u["n"] == len(interp) and 0 <= u["turned_away"] <= 0.5
    assert interp.open_world["sets"]["per_class"]["warm"]["n"] >= 1


def test_keep_on_train_is_checked():
    from ursa.errors import UrsaError
    from ursa.training.config import TrainConfig

    with pytest.raises(UrsaError, match="--keep"):
        TrainConfig(data=ROOT, keep=1.5)


def test_prediction_set_coverage_on_a_synthetic_problem_is_within_2_points():
    """Labels drawn from the (calibrated) probabilities themselves: split conformal must cover ~90% of new pictures."""
    from ursa.diagnose.openset import fit_conformal

    rng = np.random.default_rng(2)

    def draw(n):
        logits = rng.normal(0, 2.0, size=(n, 6))
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = np.array([rng.choice(6, p=row) for row in p])
        return p, y

    p_cal, y_cal = draw(2000)
    p_test, y_test = draw(20000)
    sets = fit_conformal(p_cal, y_cal)
    for level in (0.8, 0.9):
        covered = np.mean([y in sets.indices(p, level) for p, y in zip(p_test, y_test)])
        assert abs(covered - level) <= 0.02, (level, covered)
    sizes = [len(sets.indices(p, 0.9)) for p in p_test[:500]]
    assert 1 <= min(sizes) and np.mean(sizes) < 6  # a real set, not every label


def _strip_open_world(src, dst):
    """A copy of a model file as ursa wrote it before unknown detection: no openset/conformal metadata."""
    with safe_open(str(src), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("openset", "conformal")}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(dst), metadata=meta)
    return dst


def test_an_old_model_file_works_and_says_it_cannot_tell(world_run, tmp_path):
    from ursa.inference.predictor import load_predictor

    old = _strip_open_world(world_run / "run" / "model.safetensors", tmp_path / "model.safetensors")
    ans = load_predictor(old, backend="torch").predict_one(world_run / "checker.png")
    assert ans.unknown is None and ans.unknown_score is None and "cannot tell" in ans.note
    d = ans.to_json()
    assert d["unknown"] is None and "cannot tell" in d["note"]
    r = _ursa("predict", str(old), str(world_run / "checker.png"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["unknown"] is None and "cannot tell" in r.stderr
    r = _ursa("predict", str(old), str(world_run / "checker.png"), "--set", "0.9")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--set" in r.stderr


def _ursa(*args):
    return subprocess.run([sys.executable, "-m", "ursa", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)


def test_predict_says_none_of_these_and_takes_keep_and_set(world_run):
    model = str(world_run / "run" / "model.safetensors")
    r = _ursa("predict", model, str(world_run / "checker.png"), str(world_run / "warm_new.png"), "--set", "0.9")
    assert r.returncode == 0, r.stderr
    far, near = r.stdout.strip().splitlines()
    assert "none of these (closest: " in far and "set {" in far
    assert "none of these" not in near and ": warm (" in near
    r = _ursa("predict", model, str(world_run / "checker.png"), "--json", "--keep", "1.0", "--set", "0.9")
    d = json.loads(r.stdout)
    assert d["unknown"] is True and d["set_level"] == 0.9 and d["label"] in d["set"]
    r = _ursa("predict", model, str(world_run / "checker.png"), "--keep", "1.5")
    assert r.returncode == 2 and "--keep" in r.stderr and "Traceback" not in r.stderr


def test_serve_answers_unknown_counts_it_in_metrics_and_reports_drift(world_run):
    from prometheus_client.parser import text_string_to_metric_families

    from ursa.apps.serve import create_app

    app = create_app(world_run / "run" / "model.safetensors", backend="onnx")
    far = (world_run / "checker.png").read_bytes()
    near = (world_run / "warm_new.png").read_bytes()
    with TestClient(app, raise_server_exceptions=False) as c:
        d = c.post("/predict", files={"file": ("c.png", far, "image/png")}).json()
        assert d["unknown"] is True and d["unknown_score"] > d["unknown_threshold"] and "unsure" in d
        d = c.post("/predict", files={"file": ("w.png", near, "image/png")}).json()
        assert d["unknown"] is False and d["label"] == "warm"
        loose = c.post("/predict?keep=0.05", files={"file": ("w.png", near, "image/png")}).json()
        assert loose["unknown_threshold"] < d["unknown_threshold"]
        assert c.post("/predict?keep=2", files={"file": ("w.png", near, "image/png")}).status_code == 422
        batch = c.post("/predict/batch", files=[("files", ("c.png", far, "image/png"))]).json()
        assert batch[0]["unknown"] is True
        m = c.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(m.text)}
        answers = {s.labels["label"]: s.value for s in families["ursa_answers"].samples if s.name == "ursa_answers_total"}
        n_unknown = 2 + int(loose["unknown"])  # the checkerboard twice, and the warm blob if keep=0.05 turned it away
        assert answers["none of these"] == n_unknown and sum(answers.values()) == 4
        requests = {(s.labels["route"], s.labels["status"]): s.value
                    for s in families["ursa_requests"].samples if s.name == "ursa_requests_total"}
        assert requests[("/predict", "200")] == 3 and requests[("/predict", "422")] == 1
        counts = [s for s in families["ursa_request_seconds"].samples if s.name == "ursa_request_seconds_count"]
        assert sum(s.value for s in counts) == 5
        assert families["ursa_unknown_share"].samples[0].value == pytest.approx(n_unknown / 4)
        drift = c.get("/health").json()["drift"]
        assert drift["answers"] == 4 and drift["unknown_share"] == pytest.approx(n_unknown / 4)
        assert drift["unknown_share_valid"] is not None and set(drift["class_mix_valid"]) == {"cool", "warm"}
        assert not drift["drift"] and "too few answers" in drift["line"]  # 4 answers judge nothing yet


def test_drift_is_flagged_when_unknown_pictures_pile_up():
    from ursa.apps.serve.metrics import MIN_ANSWERS, ServeMetrics

    m = ServeMetrics(["a", "b"], {"kept_valid": 0.95, "valid_mix": {"a": 0.5, "b": 0.5}}, window=100)
    for i in range(MIN_ANSWERS):
        m.answer("a" if i % 2 else "b", False, False)
    assert not m.drift()["drift"]
    for _ in range(30):
        m.answer("a", True, False)
    d = m.drift()
    assert d["unknown_drift"] and d["drift"] and "DRIFT" in d["line"]
    m2 = ServeMetrics(["a", "b"], {"kept_valid": 0.95, "valid_mix": {"a": 0.5, "b": 0.5}}, window=100)
    for _ in range(MIN_ANSWERS + 10):
        m2.answer("a", False, False)
    assert m2.drift()["mix_drift"] and m2.drift()["mix_distance"] == pytest.approx(0.5)


def test_a_damaged_reference_is_one_clear_line(world_run, tmp_path):
    from ursa.errors import ModelFileError
    from ursa.inference.predictor import load_predictor

    src = world_run / "run" / "model.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        o = json.loads(meta["openset"])
        o["reference"]["shape"] = [o["reference"]["shape"][0] + 1, o["reference"]["shape"][1]]
        meta["openset"] = json.dumps(o)
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="openset.reference"):
        load_predictor(tmp_path / "m.safetensors", backend="torch")


@pytest.mark.browser
def test_the_served_page_says_none_of_these(world_run, browser):
    import threading
    import time

    import uvicorn

    from tests.conftest import wait_until
    from ursa.apps.serve import create_app
    from tests.test_slim import free_port

    app = create_app(world_run / "run" / "model.safetensors", backend="onnx")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        wait_until(page, "document.getElementById('model-info').textContent.includes('classes')")
        page.set_input_files("#file", str(world_run / "checker.png"))
        page.wait_for_selector("#bars .bar", timeout=30_000)
        assert page.text_content("#label").startswith("none of these (closest: ")
        assert "unlike the training images" in page.text_content("#confidence")
        page.set_input_files("#file", str(world_run / "warm_new.png"))
        wait_until(page, "document.getElementById('label').textContent === 'warm'")
        page.close()
    finally:
        server.should_exit = True
        t.join(10)


@pytest.mark.parametrize("damage", ["keep_null", "k_zero", "no_reference_rows", "figures_list", "scores_text", "not_base64"])
def test_damaged_open_world_metadata_is_one_line_never_a_traceback(world_run, tmp_path, damage):
    from ursa.errors import ModelFileError
    from ursa.inference.predictor import load_predictor

    src = world_run / "run" / "model.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        o = json.loads(meta["openset"])
        if damage == "keep_null":
            o["keep"] = None
        elif damage == "k_zero":
            o["k"] = 0
        elif damage == "no_reference_rows":
            o["reference"] = {"dtype": "float16", "shape": [0, o["reference"]["shape"][1]], "data": ""}
        elif damage == "figures_list":
            o["figures"] = [1, 2]
        elif damage == "scores_text":
            o["valid_scores"] = ["high"]
        else:
            o["basis"]["data"] = "not base64!"
        meta["openset"] = json.dumps(o)
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="openset") as e:
        load_predictor(tmp_path / "m.safetensors", backend="torch")
    assert "\n" not in str(e.value)


def test_an_onnx_file_without_the_features_output_says_it_cannot_tell(world_run, tmp_path):
    import onnx

    from ursa.inference.runtime import load_onnx

    proto = onnx.load(str(world_run / "run" / "model.onnx"))
    keep = [o for o in proto.graph.output if o.name != "features"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    ans = load_onnx(tmp_path / "old.onnx").predict_one(world_run / "checker.png")
    assert ans.unknown is None and "export it again" in ans.note


def test_the_benchmark_figures_are_computed_right():
    import sys

    from tests.conftest import load_benchmark

    bench = load_benchmark("openset")
    try:
        known, unknown = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.5, 0.6])
        assert bench.auroc(known, unknown) == pytest.approx(11 / 12)  # 11 of the 12 pairs ordered right
        assert bench.auroc(known, known) == pytest.approx(0.5)  # ties count half
        valid = np.arange(100) / 100
        assert bench.threshold(valid, 0.95) == pytest.approx(0.94)  # keeps 95 of 100
        assert bench.kept_two_fold(valid) == pytest.approx(0.95, abs=0.03)
        rows = bench.with_ratios([{"model": "m", "score": "top probability (baseline)", "seconds_per_picture": 2.0},
                                  {"model": "m", "score": "kNN", "seconds_per_picture": 10.0}])
        assert [r["vs_top_prob"] for r in rows] == [1.0, 5.0]
    finally:
        sys.modules.pop("bench_openset", None)
