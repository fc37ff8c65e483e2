"""The CLI: bad input is one clear line and exit 2, never a traceback; train -> predict works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ursa.cli import main
from tests.conftest import HELDOUT, ROOT, make_image


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ursa", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _one_line_error(capsys, rc: int, expect: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and expect in err, err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("setup,args,expect", [
    ("none", ["train", "{tmp}/missing"], "folder not found"),
    ("empty", ["train", "{tmp}/d"], "no images found"),
    ("one", ["train", "{tmp}/d"], "only one class"),
    ("emptyclass", ["train", "{tmp}/d"], "has no images"),
    ("two", ["train", "{tmp}/d", "--arch", "resnet9000"], "unknown architecture"),
    ("two", ["train", "{tmp}/d", "--csv", "{tmp}/nope.csv"], "CSV file not found"),
    ("badcsv", ["train", "{tmp}/d", "--csv", "{tmp}/d/c.csv"], "needs columns"),
    ("missingcsv", ["train", "{tmp}/d", "--csv", "{tmp}/d/c.csv"], "missing under"),
    ("none", ["predict", "{tmp}/nomodel.safetensors", "{heldout}"], "model file not found"),
    ("notmodel", ["predict", "{tmp}/d/fake.safetensors", "{heldout}"], "not a model file"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, setup, args, expect):
    d = tmp_path / "d"
    if setup == "empty":
        d.mkdir()
    elif setup == "one":
        make_image(d / "a" / "1.png")
    elif setup == "emptyclass":
        make_image(d / "a" / "1.png")
        (d / "b").mkdir()
    elif setup in ("two", "badcsv", "missingcsv"):
        for c in ("a", "b"):
            for i in range(5):
                make_image(d / c / f"{i}.png")
        if setup == "badcsv":
            (d / "c.csv").write_text("file,cls\na/1.png,a\n")
        if setup == "missingcsv":
            (d / "c.csv").write_text("name,label\na/1.png,a\nb/99.png,b\n")
    elif setup == "notmodel":
        d.mkdir()
        (d / "fake.safetensors").write_bytes(b"nope")
    heldout = str(next(HELDOUT.glob("*.jpg")))
    argv = [a.format(tmp=tmp_path, heldout=heldout) for a in args]
    _one_line_error(capsys, main(argv), expect)


def test_predict_non_image(tiny_model, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text")
    _one_line_error(capsys, main(["predict", str(tiny_model), str(bad)]), "not an image")


def test_predict_json_lines(tiny_model, capsys):
    files = sorted(str(f) for f in HELDOUT.glob("*.jpg"))[:2]
    assert main(["predict", str(tiny_model), *files, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for f, line in zip(files, lines):
        obj = json.loads(line)
        assert set(obj) >= {"file", "label", "index", "probs"} and obj["file"] == f
        assert obj["label"] == ["black", "grizzly", "teddy"][obj["index"]]
        assert abs(sum(obj["probs"].values()) - 1) < 1e-5


def test_usage_error_exits_2_without_traceback():
    r = _run("train", "examples/bears", "--epochs", "abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "epochs" in r.stderr


def test_help_reads_well():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("train", "predict"):
        assert cmd in r.stdout
    r = _run("train", "--help")
    assert r.returncode == 0 and "--unfreeze-epochs" in r.stdout and "--csv" in r.stdout


@pytest.mark.slow
def test_train_then_predict_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = _run("train", "examples/bears", "--out", str(out), "--size", "128", "--epochs", "2",
             "--unfreeze-epochs", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "error_rate" in r.stdout and "model:" in r.stdout
    for name in ("model.safetensors", "history.csv", "losses.png", "split.csv"):
        assert (out / name).is_file(), name
    rows = (out / "history.csv").read_text().strip().splitlines()
    assert rows[0] == "epoch,stage,train_loss,valid_loss,error_rate,accuracy,balanced_error,seconds"
    assert [r.split(",")[1] for r in rows[1:]] == ["frozen", "frozen", "unfrozen"]
    assert (out / "split.csv").read_text().splitlines()[0] == "name,label,is_valid"
    r = _run("predict", str(out / "model.safetensors"), *map(str, sorted(HELDOUT.glob("*.jpg"))))
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 6
    right = sum(line.split("/")[-1].split("_")[0] == line.split(": ")[1].split(" ")[0] for line in r.stdout.splitlines())
    assert right >= 5
