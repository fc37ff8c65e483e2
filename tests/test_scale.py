"""Issue 13 on the CPU: torchrun with gloo (one node and two), devices, resume after SIGKILL, streaming pixels.

The data is 150 generated digits (28 px grayscale, trained at 64 px), so a fresh clone runs all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import synthetic_sets
from conftest import ROOT

pytestmark = pytest.mark.timeout(1200)  # torchrun and resume runs: the longest tests (the default is 600 s)
RUN_TIMEOUT = 1100  # one subprocess: under pytest-timeout's limit, above a busy shared machine's 600 s

# 1 frozen epoch (feature cache) + 3 fine-tuning epochs: both kinds of fit, ~20 s at 64 px on 2 cores.
RECIPE = ["--epochs", "1", "--unfreeze-epochs", "3", "--size", "64", "--quiet"]  # 64 px: what is tested is not the size


def _ursa(*args: str, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ursa", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def _history(run: Path) -> list[dict]:
    import csv

    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _error(run: Path) -> float:
    return float(_history(run)[-1]["error_rate"])


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    """150 generated digits, a stray mark on 30% (mnist_dev's shape, far fewer: each of this module's seven
    training runs pays for every picture; what is tested is ranks, resume and streaming, not accuracy)."""
    return synthetic_sets.digits(tmp_path_factory.mktemp("sets") / "scale_digits", per_class=30, stray=0.3)


def _n_valid(run: Path) -> int:
    import csv

    with open(run / "split.csv", newline="") as f:
        return sum(row["is_valid"] in ("True", "true", "1") for row in csv.DictReader(f))


@pytest.fixture(scope="module")
def single_run(mnist: Path, tmp_path_factory) -> Path:
    """The uninterrupted, single-process run the others are compared with."""
    out = tmp_path_factory.mktemp("single") / "run"
    r = _ursa("train", str(mnist), "--out", str(out), *[a for a in RECIPE if a != "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    (out.parent / "stderr.txt").write_text(r.stderr)
    return out


def test_torchrun_two_ranks_gloo(mnist: Path, single_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ursa", "train", str(mnist), "--out", str(out), *RECIPE]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 alone prints the result and writes the run folder
    assert r.stdout.count("error_rate ") == 1, r.stdout
    assert (out / "model.safetensors").is_file() and (out / "report.html").is_file()
    assert not (out / "checkpoint").exists()  # removed once the model file is written
    facts = json.loads((out / "recipe.json").read_text())["run"]
    assert facts["world_size"] == 2 and facts["backend"] == "gloo"
    # the feature cache was computed once in total: each image (1 view of the training set + the
    # validation set) on exactly one rank, the two shares about equal
    import csv

    with open(out / "split.csv", newline="") as f:
        split = list(csv.DictReader(f))
    n_valid = sum(row["is_valid"] in ("True", "true", "1") for row in split)
    n_train = len(split) - n_valid
    assert n_valid > 0
    per_rank = facts["feature_images_per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) == n_train + n_valid, (per_rank, n_train, n_valid)
    assert abs(per_rank[0] - per_rank[1]) <= 2
    rows = _history(out)
    assert [r["stage"] for r in rows] == ["frozen", "unfrozen", "unfrozen", "unfrozen"]
    # the same split and recipe: the error is within 6 validation images of one process's
    assert abs(_error(out) - _error(single_run)) <= 6.1 / n_valid, (_error(out), _error(single_run), n_valid)


def test_resume_after_sigkill(mnist: Path, single_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    index = out / "checkpoint" / "checkpoint.json"
    proc = subprocess.Popen([sys.executable, "-m", "ursa", "train", str(mnist), "--out", str(out), *RECIPE],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_after = None
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(index.read_text())["epochs_done"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            killed_after = done
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_after == 2, f"the run was not killed after its second epoch ({killed_after}); {proc.stderr.read()[-2000:]}"
    assert not (out / "model.safetensors").exists()
    # the checkpoint is safetensors + JSON only (nothing that unpickles)
    assert {p.suffix for p in (out / "checkpoint").iterdir()} == {".json", ".safetensors"}
    r = _ursa("train", str(mnist), "--resume", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # every epoch once
    assert [r["stage"] for r in rows] == ["frozen", "unfrozen", "unfrozen", "unfrozen"]
    assert abs(_error(out) - _error(single_run)) <= 2.1 / _n_valid(out), (_error(out), _error(single_run))
    assert json.loads((out / "recipe.json").read_text())["run"]["resumed_after_epoch"] == 1
    assert not (out / "checkpoint").exists()
    # the same weights as the uninterrupted run (on the CPU the same numbers; a little slack for kernels)
    from safetensors.torch import load_file

    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(single_run / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    worst = max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in mine if mine[k].numel())
    assert worst < 1e-3, worst


def test_resume_without_checkpoint_is_one_line_exit_2(single_run: Path, mnist: Path, tmp_path: Path,
                                                      capsys) -> None:
    from ursa.cli import main

    for run, words in ((single_run, "nothing to resume"), (tmp_path / "nowhere", "no checkpoint there")):
        rc = main(["train", str(mnist), "--resume", str(run)])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.gpu
@pytest.mark.parametrize("command", ["train", "lr-find"])
@pytest.mark.parametrize("device, words", [("cuda", "no CUDA GPU"), ("cuda:3", "no CUDA GPU"),
                                           ("tpu", "expected auto, cpu, cuda, cuda:N or mps")])
def test_a_device_this_machine_lacks_is_one_line_exit_2(mnist: Path, tmp_path: Path, capsys, command: str,
                                                        device: str, words: str) -> None:
    import torch

    from ursa.cli import main

    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has a GPU")
    rc = main([command, str(mnist), "--out", str(tmp_path / "run"), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_auto_device_is_the_cpu_here_and_says_so_first(single_run: Path) -> None:
    import torch

    from ursa.util.device import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    first = (single_run.parent / "stderr.txt").read_text().splitlines()[0]
    assert first.startswith("device: cpu ("), first


def test_streaming_pixels_give_the_same_predictions_as_in_memory(mnist: Path) -> None:
    import torch

    from ursa.training.learner import Learner
    from ursa.training.config import LearnerConfig
    from ursa.vision.data import load_dataset
    from ursa.vision.loaders import dataloaders
    from ursa.vision.models import create_model, get_spec

    spec = get_spec("efficientnet_lite0")
    preds, caches = [], []
    for in_memory in (True, False):
        ds = load_dataset(mnist, None, 0.2, 42)
        ds.drop({i for i in range(len(ds)) if i % 4}, {})  # every 4th image: quick to decode twice, all classes
        dls = dataloaders(ds, 64, spec.mean, spec.std, bs=16, cache=in_memory, num_workers=0 if in_memory else 2)
        assert dls.in_memory is in_memory
        assert dls.pixels_line().startswith("pixels: decoded once and kept in memory") is in_memory
        torch.manual_seed(0)
        learn = Learner(dls, create_model("efficientnet_lite0", n_classes=len(ds.classes)),
                        LearnerConfig(quiet=True, feature_backend="torch"))
        preds.append(learn.get_preds()[0])
        caches.append(learn.cached_features(1).valid)
    assert torch.equal(preds[0], preds[1])
    assert torch.equal(caches[0], caches[1])


def test_torchrun_command_keeps_the_options_but_nproc() -> None:
    from ursa.cli.train import torchrun_command

    cmd = torchrun_command(3, ["ursa", "train", "data", "--nproc", "3", "--epochs", "2", "--nproc=3"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "ursa",
                       "train", "data", "--epochs", "2"]


def test_nproc_checks_the_folder_before_starting_torchrun(tmp_path: Path, capsys) -> None:
    from ursa.cli import main

    rc = main(["train", str(tmp_path / "missing"), "--nproc", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "folder not found" in err and "starting:" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_resume_refuses_options_that_would_change_the_run(single_run: Path, mnist: Path, capsys) -> None:
    from ursa.cli import main

    rc = main(["train", str(mnist), "--resume", str(single_run), "--epochs", "3", "--lr", "0.01"])
    err = capsys.readouterr().err
    assert rc == 2 and "leave out --epochs, --lr" in err and len(err.strip().splitlines()) == 1, err


def test_cpu_ranks_leave_together_and_nccl_ranks_at_once(monkeypatch) -> None:
    """Dist.finish: a barrier at the end of a run on gloo (rank 0 writes meanwhile), none on NCCL or one process."""
    from ursa.training import dist as dist_module
    from ursa.training.dist import Dist

    calls: list[str] = []
    monkeypatch.setattr(dist_module.torch_dist, "barrier", lambda: calls.append("barrier"))
    Dist(rank=1, world=2, backend="gloo").finish()
    assert calls == ["barrier"]
    Dist(rank=1, world=2, backend="nccl").finish()
    Dist().finish()
    assert calls == ["barrier"]

    def gone() -> None:  # the other rank has left, or the wait outlasted the group's timeout
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist_module.torch_dist, "barrier", gone)
    Dist(rank=1, world=2, backend="gloo").finish()  # the run is done: it is let go
    Dist(rank=0, world=2, backend="gloo").barrier(tolerant=True)
    with pytest.raises(RuntimeError):
        Dist(rank=0, world=2, backend="gloo").barrier()


def test_train_meets_the_other_ranks_at_its_end_and_on_an_error(monkeypatch, tmp_path: Path) -> None:
    """recipe.train: dist.finish() after a run that went well; the tolerant barrier (not finish) on a bad-input error."""
    from conftest import SAMPLE

    from ursa.errors import UrsaError
    from ursa.training import recipe
    from ursa.training.config import TrainConfig
    from ursa.training.dist import Dist

    calls: list[str] = []

    class Recording(Dist):
        def finish(self) -> None:
            calls.append("finish")

        def barrier(self, tolerant: bool = False) -> None:
            calls.append(f"barrier(tolerant={tolerant})")

    monkeypatch.setattr(recipe, "start_ranks", lambda device: Recording())
    recipe.train(TrainConfig(data=SAMPLE, out=tmp_path / "run", epochs=1, unfreeze_epochs=0, size=64, quiet=True))
    assert calls == ["finish"] and (tmp_path / "run" / "model.safetensors").is_file()
    calls.clear()
    with pytest.raises(UrsaError):
        recipe.train(TrainConfig(data=tmp_path / "no such folder", out=tmp_path / "run2", quiet=True))
    assert calls == ["barrier(tolerant=True)"]


def test_gather_rows_puts_every_ranks_share_back_in_order(monkeypatch) -> None:
    """The interleaving and chunking of Dist.gather_rows, with torch's all_gather played by a stand-in."""
    import torch

    from ursa.training import dist as dist_module
    from ursa.training.dist import Dist

    world, n, chunk = 3, 23, 4  # shares of 8, 8 and 7 rows, gathered 4 rows at a time
    full = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    shares = [full[r::world] for r in range(world)]
    calls: list[int] = []

    def all_gather(parts: list[torch.Tensor], pad: torch.Tensor) -> None:
        start = len(calls) * chunk
        calls.append(len(pad))
        for r, part in enumerate(parts):
            rows = shares[r][start:start + len(pad)]
            part.zero_()
            part[:len(rows)] = rows

    monkeypatch.setattr(dist_module.torch_dist, "all_gather", all_gather)
    d = Dist(rank=1, world=world, backend="gloo")
    assert d.shard(list(range(n))) == list(range(1, n, world))
    assert torch.equal(d.gather_rows(shares[1], n, chunk=chunk), full)
    assert calls == [4, 4]  # 8 rows in the largest share: two chunks, never all rows of all ranks at once
    out = torch.full((n, 2), -1.0)
    calls.clear()
    assert d.gather_rows(shares[1], n, out=out, chunk=chunk) is out and torch.equal(out, full)


def test_torchrun_budget_decision_and_curve_on_rank_0_do_not_hang(mnist: Path, tmp_path: Path) -> None:
    """The default recipe under torchrun: ranks agree on the fine-tuning decision though rank 0 alone ran the curve."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ursa", "train", str(mnist), "--out", str(out), "--epochs", "1", "--budget", "30", "--curve", "--size", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("recipe: fine-tuning:") == 1, r.stderr[-3000:]
    plan = json.loads((out / "recipe.json").read_text())
    assert plan["run"]["world_size"] == 2 and plan["work"]["ranks"] == 2 and plan["fine_tune"] != "undecided"
    assert "curve" in r.stderr


def test_torchrun_a_refused_checkpoint_folder_stops_every_rank(mnist: Path, tmp_path: Path) -> None:
    """RUN/checkpoint a link: every rank refuses it before the first epoch (torchrun exits non-zero), none waits alone."""
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "checkpoint").symlink_to(tmp_path / "elsewhere")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ursa", "train",
           str(mnist), "--out", str(out), *RECIPE]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT)
    assert r.returncode != 0 and "is a link or not a folder" in r.stderr, r.stderr[-3000:]
    assert not (out / "model.safetensors").exists() and not any((tmp_path / "elsewhere").iterdir())


def test_nproc_wrapper_gives_rank_0s_error_and_exit_code(mnist: Path, tmp_path: Path) -> None:
    """`ursa train --nproc 2` that diverges: rank 0 writes the folder and says why, exit 3, no torchrun traceback."""
    out = tmp_path / "run"
    r = _ursa("train", str(mnist), "--out", str(out), "--nproc", "2", "--epochs", "1", "--unfreeze-epochs", "1",
              "--lr", "50", "--size", "64")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "error: learning rate too high" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (out / "advice.txt").is_file() and not (out / "model.safetensors").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_train_one_model(mnist: Path, single_run: Path, tmp_path: Path) -> None:
    """The step past one machine: two torchrun agents (nodes) meet at a c10d rendezvous and train one run.

    Here both nodes are on this machine (127.0.0.1); on two machines only the endpoint differs
    (docs/scale.md). Which node's process becomes rank 0 is the rendezvous's choice: that one
    prints the result and writes the run folder, so exactly one of the two prints it.
    """
    out = tmp_path / "run"
    port = _free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"ursa-test-{port}",
             "--max-restarts", "0"]
    cmd = ["-m", "ursa", "train", str(mnist), "--out", str(out), *RECIPE]
    # no --node-rank: c10d ignores it (it is for the static rendezvous) and ranks the agents itself.
    # Output to files, not pipes: a node blocked on a full pipe that nobody reads (the test waits on the other
    # node first) would stall the collective both ranks are in. One thread per node (2 nodes on 2 cores), and
    # Python's stacks on a fatal signal, so a rank torch aborts says where it was.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    logs = [(tmp_path / f"node{i}.out", tmp_path / f"node{i}.err") for i in range(2)]
    nodes: list[subprocess.Popen] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        for out_log, err_log in logs:
            with out_log.open("w") as o, err_log.open("w") as e:
                nodes.append(subprocess.Popen([*agent, *cmd], cwd=ROOT, stdout=o, stderr=e, env=env))
        for node in nodes:
            try:
                node.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break  # said below, with both nodes' output
    finally:
        # SIGTERM first: torchrun then stops its workers, which run in sessions of their own (a SIGKILL would leave them)
        for node in nodes:
            if node.poll() is None:
                node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    outputs = [(o.read_text(), e.read_text()) for o, e in logs]
    report = "\n".join(f"node {i}: exit {n.returncode}\n{e[-6000:]}" for i, (n, (_, e)) in enumerate(zip(nodes, outputs)))
    assert time.monotonic() < deadline, f"the two nodes did not finish in {RUN_TIMEOUT} s\n{report}"
    assert all(n.returncode == 0 for n in nodes), report
    assert sum(o.count("error_rate ") for o, _ in outputs) == 1, outputs  # one result, from rank 0
    assert (out / "model.safetensors").is_file() and (out / "report.html").is_file()
    assert not (out / "checkpoint").exists()
    facts = json.loads((out / "recipe.json").read_text())["run"]
    assert facts["world_size"] == 2 and facts["backend"] == "gloo"
    assert len(facts["feature_images_per_rank"]) == 2 and min(facts["feature_images_per_rank"]) > 0
    assert [r["stage"] for r in _history(out)] == ["frozen", "unfrozen", "unfrozen", "unfrozen"]
    assert abs(_error(out) - _error(single_run)) <= 6.1 / _n_valid(out), (_error(out), _error(single_run))
