"""INT8 export: checked against fp32 on the run's validation images, refused (exit 1) when it loses accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ursa.cli import main
from ursa.inference.quantize import Int8Refused, export_int8
from ursa.inference.runtime import load_onnx


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory) -> Path:
    """The tiny run's model file, split and config in a folder of its own."""
    d = tmp_path_factory.mktemp("int8run")
    for name in ("model.safetensors", "split.csv", "config.json"):
        shutil.copy2(tiny_run / name, d / name)
    return d / "model.safetensors"


def test_cli_int8_writes_a_checked_file_with_its_numbers(run_copy, capsys):
    from ursa.util.manifest import Manifest

    Manifest(run_copy.parent).add(["model.safetensors"])  # a run folder, as `ursa train` leaves it
    assert main(["export", str(run_copy), "--int8", "--int8-method", "static"]) == 0
    out, err = capsys.readouterr()
    int8 = run_copy.with_name("model.int8.onnx")
    assert int8.is_file() and run_copy.with_suffix(".onnx").is_file() and "agreement" in out
    # recorded as ursa's in the run folder's manifest: the next run there removes it (no stale INT8 model served)
    assert {"model.onnx", "model.int8.onnx"} <= set(Manifest(run_copy.parent).files)
    pred = load_onnx(int8)
    report = pred.describe()["int8"]
    assert report["method"] == "static" and 0 <= report["agreement"] <= 1 and report["n_valid"] > 0
    assert report["error_change_points"] <= 1.0
    assert pred.meta.classes == load_onnx(run_copy.with_suffix(".onnx")).meta.classes  # metadata carried over
    # the fp32 file's two outputs survive quantization: logits first (what predict/serve read), then features
    assert [o.name for o in pred.session.get_outputs()] == ["logits", "features", "evidence"] and pred.has_features
    from ursa.vision.data import read_split

    data = Path(json.loads((run_copy.parent / "config.json").read_text())["data"])
    valid = [data / name for name, _, is_valid in read_split(run_copy.parent / "split.csv") if is_valid][:8]
    fp32 = load_onnx(run_copy.with_suffix(".onnx")).predict_batch(valid)
    got = pred.predict_batch(valid)
    assert len(got) == len(valid) == 8
    agree = sum(a.label == b.label for a, b in zip(got, fp32)) / len(valid)
    assert agree >= 0.75, f"INT8 agrees with fp32 on {agree:.0%} of 8 validation images"


def test_int8_is_refused_when_the_error_rises_too_much(run_copy):
    fp32 = run_copy.with_suffix(".onnx")
    if not fp32.is_file():
        assert main(["export", str(run_copy), "--onnx"]) == 0
    before = fp32.read_bytes()
    out = run_copy.with_name("refused.int8.onnx")
    with pytest.raises(Int8Refused) as e:
        export_int8(fp32, run_copy, out=out, method="dynamic", max_rise=-100.0)  # no model can pass this
    assert e.value.exit_code == 1 and "not written" in str(e.value)
    assert not out.exists() and fp32.read_bytes() == before


def test_int8_needs_the_run_split_and_data(tmp_path, run_copy, capsys):
    alone = tmp_path / "model.safetensors"
    shutil.copy2(run_copy, alone)
    assert main(["export", str(alone), "--int8"]) == 2
    assert "split.csv" in capsys.readouterr().err
    shutil.copy2(run_copy.with_name("split.csv"), tmp_path / "split.csv")
    assert main(["export", str(alone), "--int8", "--data", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert json.loads((run_copy.with_name("config.json")).read_text())["data"]  # the default comes from here


@pytest.mark.slow
def test_train_int8_writes_the_checked_copy_beside_the_model(tmp_path):
    from tests.conftest import SAMPLE

    out = tmp_path / "run"
    assert main(["train", str(SAMPLE), "--out", str(out), "--epochs", "1", "--size", "128", "--budget", "0", "--int8", "-q"]) == 0
    int8 = out / "model.int8.onnx"
    assert int8.is_file() and (out / "model.onnx").is_file()
    assert load_onnx(int8).describe()["int8"]["n_valid"] > 0
    assert "INT8 copy: model.int8.onnx" in (out / "advice.txt").read_text()
    assert json.loads((out / "config.json").read_text())["int8"] is True
