"""`ursa show` and `ursa curve` (through a local app until they are registered in ursa.cli), and what `ursa train` adds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from ursa.cli.insight import curve_cmd, show_cmd
from ursa.errors import DataError
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    a = typer.Typer()
    a.command("show")(show_cmd)
    a.command("curve")(curve_cmd)
    return a


def test_show_prints_the_split_and_writes_an_augmented_grid(app, tmp_path):
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(app, ["show", str(SAMPLE), "--out", str(out), "--size", "96", "--n", "9"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("120 images, 3 classes")
    assert any(l.split()[:1] == ["black"] and len(l.split()) == 4 for l in lines), "class, train, valid, total"
    assert "warning" not in res.output
    assert "recipe: budget 120 s: counted, not timed: the default" in res.output  # 96 px asked: nothing upsampled to 128
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 3 * 96 and im.height > 3 * 96
    # the same seed gives the same picture; the global random state is left alone
    import torch

    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    CliRunner().invoke(app, ["show", str(SAMPLE), "--out", str(tmp_path / "again.png"), "--size", "96", "--n", "9"])
    assert torch.rand(1) == before
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()


def test_show_warns_about_imbalance_and_never_writes_into_the_data(app, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "black", data / "black")
    (data / "teddy").mkdir()
    for f in sorted((SAMPLE / "teddy").iterdir())[:8]:
        shutil.copy(f, data / "teddy" / f.name)
    res = CliRunner().invoke(app, ["show", str(data), "--out", str(tmp_path / "b.png"), "--size", "64", "--n", "4"])
    assert res.exit_code == 0, res.output
    assert "imbalanced classes: black has 40 images and teddy only 8 (5.0x)" in res.output
    res = CliRunner().invoke(app, ["show", str(data), "--out", str(data / "b.png"), "--size", "64"])
    assert isinstance(res.exception, DataError) and "outside the data folder" in str(res.exception)
    assert not (data / "b.png").exists()


@pytest.mark.slow
def test_curve_command_on_the_sample(app, tmp_path, one_thread):
    out = tmp_path / "curve"
    res = CliRunner().invoke(app, ["curve", str(SAMPLE), "--out", str(out), "--size", "96", "--draws", "2",
                                   "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "per class" in res.output and ("still falling" in res.output or "will not help" in res.output)
    d = json.loads((out / "curve.json").read_text())
    assert d["fractions"] == [0.1, 0.2, 0.4, 0.7, 1.0] and len(d["errors"][0]) == 2
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "features").exists() or not any((out / "features").iterdir()), "a small cache stays in memory"


@pytest.fixture(scope="module")
def insight_run(tmp_path_factory) -> Path:
    """A short run on the sample with every insight part switched on (--curve, --dedupe-split)."""
    from ursa.training.config import TrainConfig
    from ursa.training.recipe import train

    out = tmp_path_factory.mktemp("insight_run")
    res = train(TrainConfig(data=SAMPLE, out=out, epochs=2, size=96, budget=0, curve=True, dedupe_split=True, quiet=True))
    assert set(res.timings) >= {"batch", "leakage", "curve", "valid_pass", "calibration", "report"}
    assert res.insight["calibration"]["temperature"] > 0
    return out


@pytest.mark.slow
def test_train_writes_the_insight_into_the_run_and_the_model(insight_run, one_thread):
    from ursa.inference.modelfile import read_meta

    run = insight_run
    for name in ("batch.png", "reliability.png", "curve.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG", name
    d = json.loads((run / "report.json").read_text())
    assert d["calibration"]["temperature"] > 0 and 0 <= d["calibration"]["ece_after"] <= 1
    assert d["curve"]["words"].startswith("error ") and len(d["curve"]["errors"]) == 5
    assert d["leakage"]["dedupe_split"] is True and d["leakage"]["n_pairs"] == 0, "the sample's twins stay on one side"
    assert set(d["data"]["per_class"]) == set(d["classes"])
    assert len(d["embedding"]["coords"]) == d["n_items"]
    meta = read_meta(run / "model.safetensors")
    assert meta.calibration["temperature"] == pytest.approx(d["calibration"]["temperature"])
    assert meta.calibration["threshold"] == d["calibration"]["threshold"]
    assert json.loads((run / "config.json").read_text())["dedupe_split"] is True
    html = (run / "report.html").read_text()
    for section in ("data", "calibration", "curve", "leakage", "embedding"):
        assert f"id='{section}'" in html, section


@pytest.mark.slow
def test_a_default_run_reports_leakage_but_draws_no_curve(tiny_run):
    d = json.loads((tiny_run / "report.json").read_text())
    assert "curve" not in d and not (tiny_run / "curve.png").exists(), "the curve is opt-in (--curve)"
    assert d["leakage"]["n_pairs"] >= 1, "the sample has a twin across its default split"
    assert "calibration" in d and (tiny_run / "batch.png").is_file()
