"""--device: auto falls back to the CPU here, a bad or absent device is one line (exit 2), model files carry no device,
and interpret, clean and batch predict stream through the images instead of holding them all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ursa.cli import main
from ursa.errors import ImageError
from ursa.inference.placement import CPU, Placement, onnx_device, place
from ursa.inference.runtime import current_onnx, stream_batches
from ursa.util.device import DeviceError
from tests.conftest import ROOT, make_image

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_GPU = torch.cuda.is_available() or bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
def cpu_only(test):
    """Runs where auto is the CPU; a GPU test (marked gpu: the one kind of skip make test accepts)."""
    return pytest.mark.gpu(pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: auto would not be the CPU")(test))
CLASSES = ["a", "b"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Two classes of twelve small images, an untrained efficientnet_lite0 at 32 px (no training), alone and with its export."""
    from ursa.inference.export import export_onnx
    from ursa.inference.modelfile import ModelMeta, save_model
    from ursa.vision.models import create_model

    d = tmp_path_factory.mktemp("device")
    data = d / "data"
    for ci, c in enumerate(CLASSES):
        for i in range(12):
            make_image(data / c / f"{i}.png", color=(200 * ci, 20 * i, 90), size=(40, 36))
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", n_classes=2, pretrained=False)
    meta = ModelMeta(arch="efficientnet_lite0", classes=CLASSES, input_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                     head=asdict(model.head_cfg), metrics={"error_rate": 0.5})
    lone = save_model(model, d / "lone" / "model.safetensors", meta)  # no export beside it: torch runs it
    paired = d / "paired" / "model.safetensors"
    paired.parent.mkdir()
    shutil.copy2(lone, paired)
    export_onnx(paired)  # a current model.onnx beside it: ONNX Runtime runs it
    return {"data": data, "lone": lone, "paired": paired, "image": data / "a" / "0.png"}


def one_line_error(capsys: Any, rc: int, *words: str) -> str:
    """The CLI's answer to a bad --device: exit 2, one line on stderr, no traceback."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: --device"), err
    for w in words:
        assert w in err, err
    return err


class Live:
    """Counts objects alive at once (decoded images), through weak references: the peak tells whether a pass streams."""

    def __init__(self) -> None:
        self.now = self.peak = self.seen = 0
        self.lock = threading.Lock()

    def track(self, obj: Any) -> Any:
        with self.lock:
            self.now += 1
            self.seen += 1
            self.peak = max(self.peak, self.now)
        weakref.finalize(obj, self._gone)
        return obj

    def _gone(self) -> None:
        with self.lock:
            self.now -= 1


# ---------------------------------------------------------------------------------------------
# Resolving --device


def test_device_names_are_checked_and_absent_devices_refused():
    with pytest.raises(DeviceError, match=r"^--device: expected auto, cpu, cuda, cuda:N or mps, got 'nonsense'$"):
        place("nonsense")
    assert place("cpu") == CPU and place("CPU").is_cpu and place(CPU) is CPU
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda:7"):
            place("cuda:7")
    if not HAS_GPU:
        with pytest.raises(DeviceError, match="mps"):
            place("mps")


@cpu_only
def test_auto_is_the_cpu_here():
    assert place("auto").is_cpu and place(None).is_cpu
    assert onnx_device(place("auto")) == "cpu"


def test_auto_asks_torch_only_when_a_gpu_may_be_there():
    """On a machine with no sign of a GPU, auto is the CPU without importing torch (the slim runtime stays torch-free)."""
    code = ("import sys; from ursa.inference.placement import gpu_possible, place; p = place('auto'); "
            "print(p.is_cpu, gpu_possible(), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    is_cpu, possible, imported = r.stdout.split()
    if possible == "False":
        assert (is_cpu, imported) == ("True", "False"), r.stdout


def test_without_torch_auto_is_the_cpu_and_cuda_needs_the_onnx_runtime_provider(monkeypatch):
    import ursa.inference.placement as placement
    import ursa.util.device as device

    def no_torch(spec: str = "auto") -> Any:
        raise ImportError("No module named 'torch'", name="torch")

    monkeypatch.setattr(device, "resolve_device", no_torch)
    monkeypatch.setattr(placement, "gpu_possible", lambda: True)
    monkeypatch.setattr(placement, "ort_has_cuda", lambda: False)
    assert place("auto") == CPU
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        place("cuda")
    with pytest.raises(DeviceError, match="torch"):
        place("mps")
    monkeypatch.setattr(placement, "ort_has_cuda", lambda: True)
    on = place("cuda:1")
    assert on == Placement("cuda", 1) and on.torch_device is None and onnx_device(on) == "cuda:1"


def test_where_onnx_runtime_cannot_run_torch_does(world, tmp_path):
    mps = Placement("mps")
    assert onnx_device(mps) is None
    fast, why = current_onnx(world["paired"], "auto", device=mps)
    assert fast is None and "cannot use mps" in why, "a current export is passed over: torch runs on the GPU"
    with pytest.raises(DeviceError, match="^--device mps: model.onnx runs on ONNX Runtime"):
        current_onnx(world["paired"].with_suffix(".onnx"), "auto", device=mps)
    with pytest.raises(DeviceError, match="--backend onnx"):
        current_onnx(world["paired"], "onnx", device=mps)
    fast, why = current_onnx(world["paired"], "auto", device=CPU)
    assert fast is not None and fast.device == "cpu" and fast.device_line().startswith("device: cpu (")


# ---------------------------------------------------------------------------------------------
# The commands: a bad or absent device is one line, exit 2; auto is the CPU here and says so


@pytest.mark.gpu
@pytest.mark.parametrize("spec,words", [("nonsense", ["expected auto, cpu"]), ("cuda:7", ["cuda:7"]), ("bogus", [])])
def test_predict_with_a_bad_device_is_one_line(world, capsys, spec, words):
    if spec == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    for model in ("lone", "paired"):
        one_line_error(capsys, main(["predict", str(world[model]), str(world["image"]), "--device", spec]), *words)


@pytest.mark.gpu
def test_serve_with_an_absent_device_fails_before_opening_a_port(world, capsys, monkeypatch):
    import ursa.apps.serve.runner as runner
    from ursa.apps.serve import ServeConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    opened: list[str] = []
    monkeypatch.setattr(runner, "check_port", lambda *a, **k: opened.append("check_port"))
    monkeypatch.setattr(runner, "create_app", lambda *a, **k: opened.append("create_app"))
    monkeypatch.setattr(runner.uvicorn, "run", lambda *a, **k: opened.append("uvicorn"))
    monkeypatch.setattr(runner.Server, "run", lambda self: opened.append("run"))
    for model in ("lone", "paired"):
        one_line_error(capsys, main(["serve", str(world[model]), "--device", "cuda", "--port", "8123"]), "cuda")
    one_line_error(capsys, main(["serve", str(world["lone"]), "--device", "bogus", "--workers", "2"]), "bogus")
    with pytest.raises(DeviceError):  # the runner's own guard, for callers that skip the CLI
        runner.serve(ServeConfig(model=world["lone"], device="cuda:0"), port=8123)
    assert opened == []


def test_clean_with_a_bad_device_is_one_line(world, capsys, monkeypatch):
    import ursa.apps.clean as clean

    monkeypatch.setattr(clean, "prepare", lambda *a, **k: pytest.fail("the model pass started"))
    one_line_error(capsys, main(["clean", str(world["data"]), "--model", str(world["lone"]), "--device", "bogus"]),
                   "'bogus'")
    if not torch.cuda.is_available():
        one_line_error(capsys, main(["clean", str(world["data"]), "--model", str(world["lone"]), "--export",
                                     str(world["data"].parent / "out"), "--device", "cuda:3"]), "cuda:3")


def test_interpret_model_with_a_bad_device_raises_the_one_line_error(world):
    from ursa.diagnose.interpret import interpret_model

    with pytest.raises(DeviceError, match="nonsense"):
        interpret_model(world["lone"], world["data"], all_images=True, device="nonsense")


@cpu_only
@pytest.mark.parametrize("model,backend", [("lone", "torch"), ("paired", "onnxruntime")])
def test_predict_auto_is_the_cpu_and_says_so_first(world, capsys, model, backend):
    folder = str(world["data"] / "b")
    got = {}
    for spec in ("auto", "cpu"):
        assert main(["predict", str(world[model]), folder, "--json", "--device", spec]) == 0
        out, err = capsys.readouterr()
        first = err.splitlines()[0]
        assert first.startswith(f"backend: {backend} (") and "; device: cpu (" in first, first
        got[spec] = [json.loads(line) for line in out.splitlines()]
    assert len(got["auto"]) == 12 and got["auto"] == got["cpu"]


@cpu_only
def test_serve_and_library_loaders_run_on_the_cpu_here(world):
    from starlette.testclient import TestClient

    from ursa.apps.serve import ServeConfig, create_app
    from ursa.inference.predictor import Predictor, load_predictor

    cfg = ServeConfig(model=world["lone"], backend="torch", device="auto")
    assert ServeConfig.from_env(cfg.to_env()).device == "auto"
    app = create_app(config=cfg)
    with TestClient(app) as client:
        info = client.get("/model").json()
        assert info["device"] == "cpu" and info["backend"] == "torch"
        r = client.post("/predict", content=world["image"].read_bytes())
        assert r.status_code == 200 and r.json()["label"] in CLASSES
    torch_pred = load_predictor(world["lone"])  # device auto by default
    assert isinstance(torch_pred, Predictor) and torch_pred.device.type == "cpu"
    assert torch_pred.device_line().startswith("device: cpu (")
    assert load_predictor(world["paired"]).describe()["device"] == "cpu"
    x = torch_pred.preprocess(world["image"])[None]
    plain = Predictor(torch_pred.model, torch_pred.meta)  # no device: the CPU, as before --device existed
    assert torch.equal(plain.probs(x), Predictor(torch_pred.model, torch_pred.meta, device="cpu").probs(x))


# ---------------------------------------------------------------------------------------------
# The model file holds no device-specific state


def _walk(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, key or leaf value) of every key and leaf of decoded JSON."""
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((f"{path}.{k}", k))
            out += _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _walk(v, f"{path}[{i}]")
    else:
        out.append((path, value))
    return out


def test_the_model_file_holds_no_device_state(world, tmp_path):
    """Weights as plain CPU tensors in the default layout, metadata without any device: loads anywhere with no flag."""
    from safetensors.torch import load_file

    from ursa.inference.header import read_header
    from ursa.inference.modelfile import load_model, save_model
    from ursa.inference.predictor import load_predictor

    model, meta = load_model(world["lone"])
    meta.created = "2024-01-01T00:00:00+00:00"
    meta.config = {"data": str(tmp_path), "arch": meta.arch, "size": 32, "seed": 42}  # a run's config travels too
    plain = save_model(model, tmp_path / "plain.safetensors", meta)
    # What a GPU run leaves behind: channels_last weights (and, on a GPU, CUDA tensors; save_model moves them).
    model.to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in model.parameters()), "the test needs channels_last weights"
    gpu_like = save_model(model, tmp_path / "gpu_like.safetensors", meta)
    tensors, want = load_file(str(gpu_like)), load_file(str(plain))
    assert tensors.keys() == want.keys() and read_header(gpu_like) == read_header(plain)
    for k, t in tensors.items():  # the layout the model ran in must not reach the file
        assert t.device.type == "cpu" and t.is_contiguous() and t.stride() == want[k].stride(), k
        assert torch.equal(t, want[k]), k
    assert {t.dtype for t in tensors.values()} <= {torch.float32, torch.int64}, "no autocast (bf16/fp16) weights"
    header = read_header(gpu_like)
    decoded = {k: json.loads(v) if v[:1] in "{[" else v for k, v in header.items()}
    for where, item in _walk(decoded):
        if isinstance(item, str):
            assert item.lower() != "device", f"a device key in the header at {where}"
            assert "cuda" not in item.lower() and "mps" not in item.lower(), f"device-specific value at {where}: {item!r}"
    pred = load_predictor(gpu_like, backend="torch", device="cpu")
    assert pred.device.type == "cpu" and all(p.device.type == "cpu" for p in pred.model.parameters())
    assert pred.predict_one(world["image"]).label in CLASSES


def test_train_config_device_is_not_stored_in_the_model_file(tmp_path):
    """TrainConfig.device says where to run, not what was learned: config.json and the model file must not carry it.

    Fails until TrainConfig has its ``device`` field (issue 13, training side) and ``to_json`` drops it as ``quiet``.
    """
    from ursa.training.config import TrainConfig

    cfg = TrainConfig(data=tmp_path, device="cuda")
    assert cfg.device == "cuda"
    d = cfg.to_json()
    assert "device" not in d and "cuda" not in json.dumps(d)


# ---------------------------------------------------------------------------------------------
# Streaming: at most two batches of decoded images alive, however many images there are


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_holds_two_batches_at_most_and_keeps_order(workers):
    live, pulled = Live(), []

    class Pixels:  # a decoded image (weak-referenceable)
        def __init__(self, i: int) -> None:
            self.i = i

    def sources():
        for i in range(50):
            pulled.append(i)
            yield i

    def decode(i: int) -> Pixels:
        if i % 7 == 3:
            raise ImageError(f"image {i}", "truncated", "cut short")
        return live.track(Pixels(i))

    first_answer_after: list[int] = []

    def forward(xs: list) -> list:
        if not first_answer_after:
            first_answer_after.append(len(pulled))
        return [x.i * 10 for x in xs]

    out = list(stream_batches(sources(), 4, decode, forward, workers))
    assert [s for s, _ in out] == list(range(50))
    for i, ans in out:
        assert isinstance(ans, ImageError) if i % 7 == 3 else ans == i * 10
    assert live.seen == 50 - len([i for i in range(50) if i % 7 == 3])
    assert live.peak <= 8, f"{live.peak} decoded images alive at once (batches of 4)"
    assert first_answer_after[0] <= 8, "the sources are read lazily, not listed first"


def test_predict_on_a_folder_streams(world, capsys, monkeypatch):
    from ursa.inference.predictor import Predictor, load_predictor

    folder = world["data"].parent / "many"
    folder.mkdir(exist_ok=True)
    for i in range(30):
        shutil.copy2(world["data"] / CLASSES[i % 2] / f"{i % 12}.png", folder / f"{i:02d}.png")
    live = Live()
    original = Predictor.preprocess
    monkeypatch.setattr(Predictor, "preprocess", lambda self, source: live.track(original(self, source)))
    assert main(["predict", str(world["lone"]), str(folder), "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 30 and live.seen == 30
    assert live.peak <= 2, f"{live.peak} decoded images alive at once (the CPU predicts one at a time)"
    pred = load_predictor(world["lone"], backend="torch", device="cpu")
    files = sorted(folder.iterdir())
    for workers in (0, 2):
        live = Live()
        answers = list(pred.stream(files, bs=4, workers=workers))
        assert [f for f, _ in answers] == files and live.seen == 30 and live.peak <= 8, live.peak
    want = [pred.predict_one(f) for f in files[:3]]
    assert [a.label for _, a in answers[:3]] == [w.label for w in want]
    assert max(abs(a.probs[c] - w.probs[c]) for (_, a), w in zip(answers, want) for c in CLASSES) < 1e-5
    onnx = load_predictor(world["paired"], device="cpu")
    live = Live()
    decode = onnx.preprocess
    onnx.preprocess = lambda source: live.track(decode(source))
    assert len(list(onnx.stream(files, bs=4))) == 30 and live.seen == 30 and live.peak <= 8, live.peak


def test_interpret_streams_and_says_its_device(world, monkeypatch):
    from ursa.diagnose.interpret import interpret_model
    from ursa.inference.predictor import Predictor

    live = Live()
    original = Predictor.preprocess
    monkeypatch.setattr(Predictor, "preprocess", lambda self, source: live.track(original(self, source)))
    said: list[str] = []
    interp = interpret_model(world["lone"], world["data"], all_images=True, bs=4, device="cpu", say=said.append)
    assert len(interp) == 24 and live.seen == 24 and interp.features is not None and interp.features.shape[0] == 24
    assert live.peak <= 8, f"{live.peak} decoded images alive at once (batches of 4)"
    assert said == [interp.device] and interp.device.startswith("device: cpu (")
    whole = interpret_model(world["lone"], world["data"], all_images=True, bs=32, device="cpu")
    assert whole.files == interp.files and np.abs(whole.probs - interp.probs).max() < 1e-5


def test_clean_scoring_streams_and_the_device_changes_nothing_on_the_cpu(world, monkeypatch):
    import ursa.apps.clean.scores as scores
    from ursa.apps import clean
    from ursa.inference.modelfile import load_model
    from ursa.vision.data import load_dataset

    ds = load_dataset(world["data"])
    model, meta = load_model(world["lone"])
    live = Live()
    original = scores.read_item

    def spy(path: Path, decode: Any) -> tuple[Any, str, str]:
        x, digest, reason = original(path, decode)
        return (live.track(x) if x is not None else None), digest, reason

    monkeypatch.setattr(scores, "read_item", spy)
    a = scores.score_dataset(ds, model, meta, bs=4, workers=2)
    assert live.seen == 24 and live.peak <= 8, f"{live.peak} decoded images alive at once (batches of 4)"
    b = scores.score_dataset(ds, model, meta, bs=4, workers=2, device=torch.device("cpu"))
    assert np.array_equal(a.probs, b.probs) and np.array_equal(a.emb, b.emb)
    said: list[str] = []
    _, c, _ = clean.prepare(world["data"], world["lone"], quiet=True, device="cpu", say=said.append)
    assert len(said) == 1 and said[0].startswith("device: cpu (") and c.backend.startswith("torch (")
    assert np.abs(c.probs - a.probs).max() < 1e-5
