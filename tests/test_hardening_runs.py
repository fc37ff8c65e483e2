"""Issue 29, run folders and checkpoints: ursa deletes only what it wrote, one process per run folder,
files that vanish while streaming are skipped and reported, a tampered checkpoint.json is one line.

One tiny run (16 generated 40 px images, 32 px input, 2 frozen epochs, --pixels stream) is shared by
the module; its epoch-1 checkpoint is copied aside as a "stopped" run for the --resume tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ursa.errors import ImageError

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, n: int = 8) -> Path:
    from PIL import Image

    rng = random.Random(0)
    for c, col in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (40, 40), tuple(max(0, min(255, v + rng.randint(-40, 40))) for v in col)).save(
                root / c / f"{i}.png")
    return root


GONE = ("red/0.png", "blue/1.png")  # "changed on disk" after the scan: every later read fails


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """(data, finished run, stopped run, stderr of the run): the run had user files in its checkpoint folder."""
    from ursa.cli import main
    import ursa.training.checkpoint as ck
    import ursa.vision.loaders as loaders

    base = tmp_path_factory.mktemp("hard")
    data = make_data(base / "data")
    out, stopped = base / "run", base / "stopped"
    (out / "checkpoint" / "sub").mkdir(parents=True)
    (out / "checkpoint" / "notes.txt").write_text("mine\n")
    (out / "checkpoint" / "sub" / "x.txt").write_text("mine too\n")
    (out / "checkpoint" / "e7.weights.safetensors").write_text("a user's file with ursa's kind of name\n")
    real_write, real_load = ck.write_checkpoint, loaders.load_pixels

    def write(folder, learn, extra):
        path = real_write(folder, learn, extra)
        if not stopped.exists():  # the run as a kill after epoch 1 would leave it
            shutil.copytree(folder, stopped / "checkpoint", ignore=shutil.ignore_patterns("notes.txt", "sub", "e7.*"))
        return path

    def load_pixels(path, short_side):
        if Path(path).relative_to(data).as_posix() in GONE:
            raise ImageError(path, "truncated (changed on disk)")
        return real_load(path, short_side)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "write_checkpoint", write)
        mp.setattr(loaders, "load_pixels", load_pixels)
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            rc = main(["train", str(data), "--out", str(out), "--size", "32", "--epochs", "2", "--unfreeze-epochs", "0",
                       "--pixels", "stream"])
    assert rc == 0, err.getvalue()
    return data, out, stopped, err.getvalue()


# --- item 1: the checkpoint folder holds the user's files too ------------------------------------------------------


def test_a_run_leaves_files_it_did_not_write_in_its_checkpoint_folder(runs) -> None:
    _, out, stopped, _ = runs
    ck = out / "checkpoint"
    assert (ck / "notes.txt").read_text() == "mine\n" and (ck / "sub" / "x.txt").read_text() == "mine too\n"
    assert (ck / "e7.weights.safetensors").is_file()  # ursa's kind of name, but ursa did not write it
    assert sorted(p.name for p in ck.iterdir()) == ["e7.weights.safetensors", "notes.txt", "sub"]
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in (stopped / "checkpoint").iterdir()) == [
        ".ursa-files.json", "checkpoint.json", "e1.best.safetensors", "e1.state.safetensors", "e1.weights.safetensors"]


def test_a_symlinked_checkpoint_folder_is_refused_and_its_target_left_alone(runs, tmp_path, capsys) -> None:
    from ursa.cli import main
    from ursa.training.checkpoint import remove_checkpoint

    data, _, stopped, _ = runs
    run, target = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(stopped / "checkpoint", target)
    (target / "precious.txt").write_text("keep\n")
    run.mkdir()
    (run / "checkpoint").symlink_to(target)
    before = sorted(p.name for p in target.iterdir())
    rc = main(["train", str(data), "--resume", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a link" in err and len(err.strip().splitlines()) == 1, err
    remove_checkpoint(run)
    assert sorted(p.name for p in target.iterdir()) == before


# --- item 4: files that change or vanish while streaming ------------------------------------------------------------


def test_files_that_vanish_while_streaming_are_skipped_counted_and_reported(runs) -> None:
    _, out, _, err = runs
    assert "2 image(s) changed or vanished on disk during training" in err, err
    assert all(name in err for name in GONE)
    recipe = json.loads((out / "recipe.json").read_text())
    assert sorted(recipe["run"]["skipped_during_training"]) == sorted(GONE)
    report = json.loads((out / "report.json").read_text())
    assert any("changed or vanished" in n for n in report["notes"])
    assert "changed or vanished" in (out / "advice.txt").read_text()
    split = [line.split(",") for line in (out / "split.csv").read_text().splitlines()[1:]]
    valid = {name for name, _, is_valid in split if is_valid.strip().lower() in ("1", "true")}
    gone_valid = valid & set(GONE)
    # the validation figures count only the images that were read
    assert report["n_items"] == len(valid) - len(gone_valid)
    assert {s[0] if isinstance(s, list) else s["name"] for s in report["skipped"]} >= gone_valid


def test_a_batch_label_marks_an_unreadable_item_and_loss_and_metrics_leave_it_out() -> None:
    import torch

    from ursa.training.sources import metrics_from_probs
    from ursa.vision.loaders import failed_items, failed_label

    y = torch.tensor([0, failed_label(5), 1, failed_label(0)])
    assert failed_items(y) == [5, 0]
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.1, 0.9]])
    loss, err, acc, bal = metrics_from_probs(probs, y)
    assert err == 0.0 and acc == 1.0 and bal == 0.0  # the two unreadable items would be two errors if they counted


# --- item 7 and the world size: a tampered checkpoint.json is one line, exit 2 --------------------------------------


def _set(path: str, value):
    def edit(index: dict) -> None:
        *parents, last = path.split(".")
        d = index
        for p in parents:
            d = d[p]
        d[last] = value
    return edit


def _deep(n: int):
    v: list = []
    for _ in range(n):
        v = [v]
    return v


TAMPERINGS = {
    "epochs_done text": _set("epochs_done", "abc"),
    "epochs_done negative": _set("epochs_done", -5),
    "epochs_done float": _set("epochs_done", 1.5),
    "epochs_done true": _set("epochs_done", True),
    "sched_steps too big": _set("sched_steps", 1000),
    "sched_steps negative": _set("sched_steps", -1),
    "total_steps text": _set("total_steps", "x"),
    "param_groups empty": _set("param_groups", []),
    "param_groups text": _set("param_groups", "x"),
    "betas wrong": lambda i: i["param_groups"][0].__setitem__("betas", [0.9]),
    "lr nan": lambda i: i["param_groups"][0].__setitem__("lr", float("nan")),
    "config text": _set("config", "abc"),
    "config deep": _set("config", {"a": _deep(30)}),
    "plan text": _set("plan", "abc"),
    "plan decision unknown": _set("plan.fine_tune", "melted"),
    "plan work text": _set("plan.work", "abc"),
    "plan work negative": _set("plan.work.n_train", -5),
    "fit text": _set("fit", "abc"),
    "fit n_epoch 0": _set("fit.n_epoch", 0),
    "max_lr inf": _set("fit.max_lr", float("inf")),
    "epoch_in_fit past the fit": _set("epoch_in_fit", 99),
    "stage unknown": _set("stage", "melted"),
    "history rows missing": _set("recorder.rows", []),
    "batch lists differ": _set("recorder.batch_lrs", [0.1, 0.2, 0.3]),
    "rng python": _set("rng.python", [3, [1, 2], None]),
    "rng numpy": _set("rng.numpy", ["MT19937", [], 0, 0, 0.0]),
    "weights outside the folder": _set("files.weights", "../../other/model.safetensors"),
    "weights absolute": _set("files.weights", "/etc/passwd"),
    "weights another name": _set("files.weights", "model.safetensors"),
    "files text": _set("files", "abc"),
    "elapsed inf": _set("elapsed", float("inf")),
    "elapsed negative": _set("elapsed", -3.0),
    "split number": _set("split", 5),
    "best row text": lambda i: i.update(best={"epoch": 0, "row": "x"}),
    "world 2 on 1 process": _set("world", 2),
    "index a list": lambda i: (i.clear(), i.update(_list=True)),
}


def _tampered(stopped: Path, dst: Path, edit) -> Path:
    shutil.copytree(stopped, dst)
    path = dst / "checkpoint" / "checkpoint.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index if "_list" not in index else [1, 2]))
    return dst


def test_every_tampering_of_checkpoint_json_is_one_line_and_exit_2(runs, tmp_path, capsys) -> None:
    from ursa.cli import main

    data, _, stopped, _ = runs
    for k, (name, edit) in enumerate(TAMPERINGS.items()):
        run = _tampered(stopped, tmp_path / f"r{k}", edit)
        rc = main(["train", str(data), "--resume", str(run), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (run / "model.safetensors").exists(), name


def test_deep_nesting_past_the_json_parser_is_one_line(runs, tmp_path, capsys) -> None:
    from ursa.cli import main

    data, _, stopped, _ = runs
    run = tmp_path / "deep"
    shutil.copytree(stopped, run)
    path = run / "checkpoint" / "checkpoint.json"
    text = path.read_text()
    path.write_text(text[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    rc = main(["train", str(data), "--resume", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1, err


def test_a_weights_symlink_out_of_the_folder_is_refused(runs, tmp_path, capsys) -> None:
    from ursa.cli import main

    data, out, stopped, _ = runs
    run = tmp_path / "link"
    shutil.copytree(stopped, run)
    w = run / "checkpoint" / "e1.weights.safetensors"
    w.unlink()
    w.symlink_to(out / "model.safetensors")  # another run's model, outside the folder
    rc = main(["train", str(data), "--resume", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a link" in err and len(err.strip().splitlines()) == 1, err


def _resave(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    change(t)
    save_file(t, str(path))


def test_weights_or_best_of_another_head_size_are_refused(runs, tmp_path, capsys) -> None:
    """A 3-class head in a 2-class run (weights file, or a best file added to the index)."""
    import torch

    from ursa.cli import main

    data, _, stopped, _ = runs

    def bigger_head(t: dict) -> None:
        for k in [k for k in t if k.startswith("head.") and t[k].shape[:1] == (2,)]:
            t[k] = torch.zeros((3, *t[k].shape[1:]), dtype=t[k].dtype)

    run = tmp_path / "head"
    shutil.copytree(stopped, run)
    _resave(run / "checkpoint" / "e1.weights.safetensors", bigger_head)
    rc = main(["train", str(data), "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "weights of another model" in err and len(err.strip().splitlines()) == 1, err

    run = tmp_path / "best"
    shutil.copytree(stopped, run)
    ck = run / "checkpoint"
    shutil.copy(ck / "e1.weights.safetensors", ck / "e1.best.safetensors")
    _resave(ck / "e1.best.safetensors", bigger_head)
    index = json.loads((ck / "checkpoint.json").read_text())
    index["files"]["best"] = "e1.best.safetensors"
    index["best"] = {"epoch": 0, "row": index["recorder"]["rows"][0]}
    (ck / "checkpoint.json").write_text(json.dumps(index))
    rc = main(["train", str(data), "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "weights of another model" in err and len(err.strip().splitlines()) == 1, err


def test_optimiser_state_that_does_not_fit_is_refused(runs, tmp_path, capsys) -> None:
    from ursa.cli import main

    data, _, stopped, _ = runs
    run = tmp_path / "groups"
    shutil.copytree(stopped, run)
    path = run / "checkpoint" / "checkpoint.json"
    index = json.loads(path.read_text())
    index["param_groups"] = index["param_groups"] * 2  # two groups for an optimiser with one
    path.write_text(json.dumps(index))
    rc = main(["train", str(data), "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit this run" in err and len(err.strip().splitlines()) == 1, err


def test_the_untampered_stopped_run_resumes_and_leaves_the_users_files(runs, tmp_path, capsys) -> None:
    """The control for the tamperings above (the same copy resumes), with a note of the user's in the folder."""
    from ursa.cli import main

    data, _, stopped, _ = runs
    from ursa.util.manifest import Manifest

    run = tmp_path / "ok"
    shutil.copytree(stopped, run)
    (run / "checkpoint" / "notes.txt").write_text("mine\n")
    (run / "model.int8.onnx").write_text("an earlier run's INT8 model")  # written by ursa, per the manifest
    Manifest(run).add(["model.int8.onnx"])
    (run / "notes.txt").write_text("the user's")
    time.sleep(0.1)
    rc = main(["train", str(data), "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (run / "model.safetensors").is_file() and "overwrites" not in err
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["notes.txt"]
    assert "model.safetensors" in json.loads((run / ".ursa-files.json").read_text())["files"]
    # the stale INT8 model beside the new model is gone (and said), the user's file is not
    assert not (run / "model.int8.onnx").exists() and "model.int8.onnx" in err, err
    assert (run / "notes.txt").read_text() == "the user's"


# --- a lock per run folder -------------------------------------------------------------------------------------------


HOLD = """
import sys, time
from ursa.util.lock import FolderLock
with FolderLock(sys.argv[1], ".ursa.lock", "run folder"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_a_run_folder_is_refused_naming_the_first(runs, tmp_path, capsys) -> None:
    from ursa.cli import main

    data, _, stopped, _ = runs
    run = tmp_path / "busy"
    shutil.copytree(stopped, run)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (["--resume", str(run)], ["--out", str(run)]):
            rc = main(["train", str(data), *argv, "--quiet"])
            err = capsys.readouterr().err
            assert rc == 2 and f"pid {holder.pid}" in err and "another ursa process" in err, err
            assert len(err.strip().splitlines()) == 1, err
    finally:
        holder.kill()
        holder.wait()
    assert (run / "checkpoint" / "checkpoint.json").is_file()  # nothing of the held run was touched
    from ursa.util.lock import FolderLock

    with FolderLock(run, ".ursa.lock", "run folder"):  # the kernel dropped the dead holder's lock: not stale
        pass


# --- item 3: retraining into a run folder ----------------------------------------------------------------------------


def test_a_retrain_removes_the_earlier_runs_own_leftovers_and_says_it_overwrites(tmp_path) -> None:
    from ursa.training.runfolder import RunFolder
    from ursa.util.manifest import Manifest

    out = tmp_path / "run"
    out.mkdir()
    for name in ("model.safetensors", "model.int8.onnx", "best.safetensors", "curve.png", "report.html"):
        (out / name).write_text("old " + name)
    Manifest(out).add(["model.safetensors", "model.int8.onnx", "best.safetensors", "curve.png", "report.html"])
    (out / "notes.txt").write_text("mine")
    time.sleep(0.01)
    (out / "curve.png").write_text("the user's own curve, written over ursa's")  # no longer ursa's file
    os.utime(out / "curve.png", ns=(1, 1))
    said: list[str] = []
    time.sleep(0.1)
    with RunFolder(out, said.append) as run:
        (out / "model.safetensors").write_text("new model")
        (out / "report.html").write_text("new report")
        gone = run.finish(model_written=True)
    assert any("overwrites" in line for line in said), said
    assert sorted(gone) == ["best.safetensors", "model.int8.onnx"]
    assert sorted(p.name for p in out.iterdir()) == [".ursa-files.json", "curve.png", "model.safetensors", "notes.txt",
                                                     "report.html"]
    assert sorted(Manifest(out).files) == ["model.safetensors", "report.html"]


def test_a_run_without_a_model_keeps_the_earlier_model_and_int8(tmp_path) -> None:
    from ursa.training.runfolder import RunFolder
    from ursa.util.manifest import Manifest

    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / "model.int8.onnx").write_text("old")
    Manifest(out).add(["model.safetensors", "model.int8.onnx"])
    time.sleep(0.1)
    with RunFolder(out, lambda line: None) as run:
        (out / "history.csv").write_text("diverged run")
        assert run.finish(model_written=False) == []
    assert (out / "model.int8.onnx").is_file()
    assert sorted(Manifest(out).files) == ["history.csv", "model.int8.onnx", "model.safetensors"]


def test_the_real_run_recorded_its_files(runs) -> None:
    _, out, _, _ = runs
    files = json.loads((out / ".ursa-files.json").read_text())["files"]
    assert {"model.safetensors", "model.onnx", "config.json", "history.csv", "report.html", "batch.png"} <= set(files)
    assert not (out / ".ursa.lock").exists() and not (out / "features").exists()


# --- item 11: temp files and the feature cache's spill ---------------------------------------------------------------


def test_stale_temp_files_of_ursas_own_names_are_swept_on_start(tmp_path) -> None:
    from ursa.training.runfolder import RunFolder

    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    old = [out / ".model.safetensors.ab12cd34.tmp", out / "checkpoint" / ".e3.state.safetensors.zz99_x01.tmp"]
    keep = [out / ".notes.txt.ab12cd34.tmp", out / ".model.safetensors.tmp", out / "checkpoint" / ".x.ab12cd34.tmp"]
    for p in old + keep:
        p.write_text("x")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    fresh = out / ".model.onnx.ab12cd34.tmp"  # maybe `ursa export` writing it right now
    fresh.write_text("x")
    killed = out / "checkpoint" / ".checkpoint.json.a1b2c3d4.tmp"  # a kill just now: only this run writes there
    killed.write_text("x")
    old.append(killed)
    with RunFolder(out, lambda line: None):
        pass
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in keep) and fresh.exists()


def test_spilled_features_are_deleted_and_nothing_else(tmp_path) -> None:
    from ursa.training.runfolder import RunFolder

    out = tmp_path / "run"
    spill = out / "features"
    (spill / "rank1").mkdir(parents=True)
    (spill / "refit").mkdir()  # --refit's second fit spills here
    for p in (spill / "train_view0.npy", spill / "valid.npy", spill / "rank1" / "all_train_view3.npy",
              spill / "refit" / "train_view1.npy"):
        p.write_bytes(b"\0" * 10)
    with RunFolder(out, lambda line: None):
        pass
    assert not spill.exists()
    (spill).mkdir()
    (spill / "valid.npy").write_bytes(b"x")
    (spill / "mine.npy").write_bytes(b"x")
    with RunFolder(out, lambda line: None):
        pass
    assert sorted(p.name for p in spill.iterdir()) == ["mine.npy"]


def test_a_feature_cache_larger_than_the_free_disk_is_refused_first(tmp_path, monkeypatch) -> None:
    import shutil as sh

    import torch

    from ursa.errors import NoSpaceError
    from ursa.training import features
    from ursa.vision.loaders import dataloaders
    from ursa.vision.data import load_dataset
    from ursa.vision.models import create_model, get_spec

    data = make_data(tmp_path / "d", n=4)
    ds = load_dataset(data)
    spec = get_spec("efficientnet_lite0")
    dls = dataloaders(ds, 32, spec.mean, spec.std, bs=4)
    model = create_model("efficientnet_lite0", n_classes=2, pretrained=False)
    monkeypatch.setattr(features, "RAM_BUDGET", 1000)  # spill from the first byte
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(NoSpaceError, match="--views"):
        features.compute_features(model, dls, 20, spill_dir=tmp_path / "spill", backend="torch",
                                  device=torch.device("cpu"))
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").iterdir())


def test_a_users_own_file_at_the_lock_files_name_is_refused_and_left_as_it_was(tmp_path):
    from ursa.errors import WriteError
    from ursa.util.lock import FolderLock

    run = tmp_path / "run"
    run.mkdir()
    (run / ".ursa.lock").write_text("my notes\n")
    with pytest.raises(WriteError, match="did not write"):
        FolderLock(run, ".ursa.lock", "run folder").acquire()
    assert (run / ".ursa.lock").read_text() == "my notes\n"
    (run / ".ursa.lock").write_text('{"pid": 1, "host": "h", "started": "s", "command": "ursa train"}\n')
    with FolderLock(run, ".ursa.lock", "run folder"):  # a dead holder's record is ursa's own: taken over
        pass
    assert not (run / ".ursa.lock").exists()
