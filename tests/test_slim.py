"""The slim install: `ursa serve`/`predict` on an ONNX model with torch, timm and torchvision unimportable.

Each test runs ursa in a subprocess whose meta-path finder refuses those packages, as a
`pip install ursa` (no `[train]`) environment would: the ONNX path must never reach them, and
a command that needs them must say in one line what to install (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ursa.inference.export import export_onnx
from ursa.inference.runtime import load_onnx
from tests.conftest import HELDOUT, ROOT, SAMPLE

# A missing package, as a slim install has it: ModuleNotFoundError naming the module.
BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from ursa.cli import main
rc = main(sys.argv[1:])
leaked = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')]
if leaked:
    print('torch leaked in:', leaked[:5], file=sys.stderr)
    sys.exit(99)
sys.exit(rc)
"""


def blocked(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ursa ARGV` with torch/timm/torchvision unimportable."""
    return subprocess.run([sys.executable, "-c", BLOCKER, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory) -> Path:
    """model.safetensors with its current model.onnx beside it, exported in this (torch) process."""
    d = tmp_path_factory.mktemp("slim")
    shutil.copy2(tiny_model, d / "model.safetensors")
    export_onnx(d / "model.safetensors")
    return d / "model.onnx"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, seconds: float = 90) -> dict:
    """/health's answer once the server is up; fails with the server's log if it dies first."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up: " + log.read_text()
        time.sleep(0.2)


@pytest.mark.parametrize("which", ["onnx", "safetensors+current-onnx"])
def test_serve_answers_predict_with_torch_unimportable(exported, tmp_path, which):
    model = exported if which == "onnx" else exported.with_suffix(".safetensors")
    image = sorted(HELDOUT.glob("*.jpg"))[0]
    want = load_onnx(exported, threads=1).predict_one(image)
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", BLOCKER, "serve", str(model), "--port", str(port),
                                 "--no-access-log", "--threads", "1"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            health = wait_healthy(proc, url, log)
            assert {k: health[k] for k in ("status", "backend")} == {"status": "ok", "backend": "onnx"}
            assert health["drift"]["answers"] == 0  # the drift line, torch-free too
            r = httpx.post(url + "/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")}, timeout=30)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["label"] == want.label and abs(got["probs"][want.label] - want.confidence) < 1e-5
            off = httpx.post(url + "/predict?threshold=1", content=image.read_bytes(), timeout=30).json()
            assert off["unsure"] is True and off["threshold"] == 1.0  # per-request threshold on the ONNX path
            batch = httpx.post(url + "/predict/batch", files=[("files", ("a.jpg", image.read_bytes(), "image/jpeg"))] * 3,
                               timeout=30).json()
            assert [b["label"] for b in batch] == [want.label] * 3
            assert httpx.post(url + "/predict", content=b"nope", timeout=30).status_code == 415
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()  # 99: torch was imported somewhere on the way
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "on onnx (" in text


def test_help_and_predict_never_import_torch(exported):
    assert blocked("--help").returncode == 0
    r = blocked("predict", str(exported), str(sorted(HELDOUT.glob("*.jpg"))[0]), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["label"] in ("black", "grizzly", "teddy")


def test_commands_that_need_torch_say_what_to_install(exported, tmp_path):
    alone = tmp_path / "model.safetensors"  # no model.onnx beside it: only torch can run it
    shutil.copy2(exported.with_suffix(".safetensors"), alone)
    image = str(sorted(HELDOUT.glob("*.jpg"))[0])
    for argv in (["serve", str(alone), "--port", str(free_port())],
                 ["predict", str(alone), image],
                 ["serve", str(exported.with_suffix(".safetensors")), "--backend", "torch", "--port", str(free_port())],
                 ["export", str(alone), "--onnx"],
                 ["train", str(SAMPLE), "--out", str(tmp_path / "run"), "-q"]):
        r = blocked(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (argv, r.stderr)
        assert len(lines) == 1 and "this command needs the training packages: pip install 'ursa[train]'" in lines[0], argv
        assert "Traceback" not in r.stderr


def test_the_base_install_is_the_slim_runtime():
    """pyproject's base dependencies hold no training package, and requirements-serve.txt (Docker) is that same set."""
    import tomllib

    from ursa.cli import TRAIN_MODULES

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(">")[0].split("=")[0].split("[")[0].strip().lower()  # noqa: E731
    base = {name(r) for r in project["dependencies"]}
    train = {name(r) for r in project["optional-dependencies"]["train"]}
    assert {"onnxruntime", "numpy", "pillow", "starlette", "uvicorn", "typer"} <= base
    assert not base & {"torch", "torchvision", "timm", "matplotlib", "onnx", "safetensors", "httpx", "scikit-learn"}
    assert {"torch", "torchvision", "timm", "onnx", "matplotlib", "safetensors"} <= train
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-serve.txt").read_text().splitlines()]
    assert sorted(r for r in lines if r) == sorted(r.split("#")[0].strip() for r in project["dependencies"])
    # every module of the train extra is one the CLI turns into "pip install 'ursa[train]'"
    assert {"torch", "torchvision", "timm", "onnx", "matplotlib", "safetensors", "httpx", "sklearn"} <= TRAIN_MODULES
