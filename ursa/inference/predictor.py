"""Predictor: the model file plus its preprocessing, for one image or many, on torch (or the ONNX runtime).

Preprocessing is exactly the validation pipeline the model was scored with during training
(``vision.transforms.load_pixels`` at the decode size, with its reduced-size JPEG decode, then
``vision.transforms.eval_transform``), so a served prediction and the reported metrics see the same pixels.

``load_predictor`` is the entry point (``load_learner`` is its fastai-familiar alias). Backend
names are checked in one place, ``check_backend``. Backend rule (shared by ``ursa predict`` and
``ursa serve``; it lives in ``runtime.current_onnx``, which returns the torch-free
``runtime.OnnxPredictor`` when ONNX Runtime runs):

- a path ending in ``.onnx`` runs on onnxruntime;
- ``backend="onnx"`` runs ``MODEL.onnx`` beside ``MODEL.safetensors`` (an error when missing);
- ``backend="torch"`` runs the safetensors file;
- ``backend="auto"`` (default) runs ``MODEL.onnx`` beside the model only when it is at least as
  new as the model file *and* was exported from it (same ``created`` stamp and classes);
  otherwise torch, so a stale export is never used silently.

Calibration: a model file whose ``calibration`` holds a ``temperature`` (fitted by ``ursa train``
on the validation set) has its logits divided by it before the softmax, on either backend, so
the probabilities mean what they say; its ``threshold`` marks an answer whose top probability is
below it as ``unsure`` (the class is still given). A file without calibration behaves as before
(temperature 1, nothing unsure).

Test-time augmentation (``tta=True``, fastai's ``learn.tta``): each batch also runs the mirrors
the model was trained with, in the same forward pass, and the calibrated probabilities are
averaged; the views and the average are ``tta``'s (numpy), shared with the ONNX runtime.

Devices (``device=``, ``--device``; ``placement.place``): the model file holds CPU tensors only and
loads on the CPU; the torch ``Predictor`` then moves the network to its device (CUDA: channels_last,
autocast in ``util.device.autocast_dtype``; MPS: float32). Preprocessing stays on the CPU, each
batch goes over with a non-blocking copy and the answers come back to the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ursa.errors import ImageError
from ursa.inference.modelfile import ModelMeta, load_model
from ursa.inference.openset import OpenWorld
from ursa.inference.placement import Placement, place
from ursa.inference.runtime import OnnxPredictor, cores, current_onnx, stream_batches
from ursa.util.device import default_threads  # the one home; kept importable from here
from ursa.inference.results import BACKENDS, Prediction, check_backend, check_threshold  # noqa: F401 - re-exported for callers
from ursa.inference.task import task_named, thresholds_of
from ursa.inference.tta import mean_probs, tta_views, view_batch
from ursa.util.device import autocast_dtype, describe
from ursa.vision.images import Source
from ursa.vision.transforms import decode_size, eval_transform, load_pixels

log = logging.getLogger("ursa")

@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run small ops (resize, normalise) on one thread.

    Measured on a busy 2-core machine: the validation transform took 0.7 ms on one thread and
    32 ms on two (a thread waiting at OpenMP barriers for a descheduled partner). Switching
    costs well under a microsecond.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Predictor:
    """Loaded once, used many times: preprocess + forward + softmax, batched."""

    backend = "torch"  # runtime.OnnxPredictor says "onnx"

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, bf16: bool = False, source: Path | None = None,
                 tta: bool = False, device: "torch.device | Placement | str | None" = None) -> None:
        self.model, self.meta, self.bf16, self.source = model, meta, bf16, source
        self.device = torch_device(device)  # None: the CPU, as before devices existed
        self.amp = autocast_dtype(self.device)  # CUDA: bf16 where supported, else fp16; None on CPU and MPS
        self.views = tta_views(getattr(meta, "config", None), tta, source)  # ("original",) unless TTA adds mirrors
        cal = getattr(meta, "calibration", None) or {}  # model files before calibration have none
        self.temperature = float(cal.get("temperature") or 1.0)
        self.threshold: float | None = check_threshold(cal.get("threshold"))
        self.world = OpenWorld.from_meta(meta, source or "model")  # unknown detection and prediction sets (may be absent)
        self.classes = list(meta.classes)
        self.task, self.thresholds = task_named(getattr(meta, "task", "single_label")), thresholds_of(meta)
        self.size = int(meta.input_size)
        self._decode = decode_size(self.size)
        self._tfm = eval_transform(self.size, meta.mean, meta.std)
        self.model.eval().to(self.device, memory_format=torch.channels_last)

    def _autocast(self) -> Any:
        """Mixed precision where the device has it (CUDA), else bf16 on the CPU when asked (--bf16)."""
        if self.amp is not None:
            return torch.autocast(self.device.type, dtype=self.amp)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and self.device.type == "cpu")

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch on the network's device, channels_last (a no-op copy on the CPU)."""
        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def preprocess(self, source: Source) -> torch.Tensor:
        """Decode and transform to a normalised CHW tensor; raises ImageError for unusable input."""
        with one_torch_thread():
            return self._tfm(load_pixels(source, self._decode))

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) logits for a preprocessed batch [N, 3, H, W]."""
        x = self._on_device(x)
        with self._autocast():
            return self.model(x).float().cpu()

    @torch.inference_mode()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities for a preprocessed batch [N, 3, H, W] (the model's temperature applied; averaged over the TTA views)."""
        n = len(self.views)
        if n == 1:
            return torch.from_numpy(self.task.activate(self.logits(x).numpy(), self.temperature))
        logits = self.logits(torch.from_numpy(view_batch(x.cpu().numpy(), n)))
        return torch.from_numpy(mean_probs(logits.numpy(), n, self.temperature, self.task))

    @torch.inference_mode()
    def probs_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities (averaged over the TTA views) and the plain view's pooled body features (interpret's map)."""
        n = len(self.views)
        xs = x if n == 1 else torch.from_numpy(view_batch(x.cpu().numpy(), n))
        xs = self._on_device(xs)
        with self._autocast():
            f = self.model.features(xs)
            logits = self.model.head(f)
        logits, f = logits.float().cpu(), f[: len(x)].float().cpu()
        if n == 1:
            return torch.from_numpy(self.task.activate(logits.numpy(), self.temperature)), f
        return torch.from_numpy(mean_probs(logits.numpy(), n, self.temperature, self.task)), f

    def logits_and_evidence(self, x: torch.Tensor) -> tuple[Any, Any]:
        """Raw logits [N, K] and per-class evidence maps [N, K, h, w] (numpy, float32) of a preprocessed batch (``inference.explain``)."""
        from ursa.inference.evidence import evidence

        logits, maps = evidence(self.model, self._on_device(x))
        return logits.cpu().numpy(), maps.cpu().numpy()

    def result(self, p: torch.Tensor, threshold: float | None | str = "model", score: float | None = None) -> Prediction:
        """One row of probabilities (and its unknown score) as a Prediction, judged by the model's thresholds unless another is given."""
        values = p.tolist()
        i = int(max(range(len(values)), key=values.__getitem__))
        pred = Prediction(self.classes[i], i, {c: float(v) for c, v in zip(self.classes, values)}, unknown_score=score)
        pred = pred.with_threshold(self.threshold if threshold == "model" else threshold)  # type: ignore[arg-type]
        return self.world.judge(self.task.answer(pred, self.thresholds))

    def predict_tensors(self, xs: Sequence[torch.Tensor], threshold: float | None | str = "model") -> list[Prediction]:
        """Forward already-preprocessed images as one batch (with the body features when the model has an unknown detector)."""
        x = torch.stack(list(xs))
        if self.world.detector is None:
            return [self.result(p, threshold) for p in self.probs(x)]
        probs, feats = self.probs_and_features(x)
        return [self.result(p, threshold, s) for p, s in zip(probs, self.world.scores(feats.numpy()))]

    def predict(self, source: Source) -> tuple[str, int, dict[str, float]]:
        """(label, index, probs) for one image, as fastai's learn.predict returns."""
        return self.predict_one(source).as_tuple()

    def predict_one(self, source: Source, threshold: float | None | str = "model") -> Prediction:
        """One image's full answer, unsure and unknown flags included ("model": the model's threshold; None: never unsure)."""
        return self.predict_tensors([self.preprocess(source)], threshold)[0]

    def predict_batch(self, sources: Sequence[Source], bs: int = 32,
                      threshold: float | None | str = "model") -> list[Prediction]:
        """Many images, batched; raises ImageError on the first unreadable one."""
        out: list[Prediction] = []
        for i in range(0, len(sources), bs):
            out += self.predict_tensors([self.preprocess(s) for s in sources[i:i + bs]], threshold)
        return out

    def stream(self, sources: Iterable[Source], bs: int = 32, threshold: float | None | str = "model",
               workers: int | None = None) -> Iterator[tuple[Source, Prediction | ImageError]]:
        """(source, Prediction or the ImageError that made it unreadable) in input order, ``bs`` images a batch.

        Never more than two batches of decoded images are held (``runtime.stream_batches``). ``workers``
        decode ahead in threads; default: none on the CPU (the network needs the cores), 4 on a GPU.
        """
        if workers is None:
            workers = 0 if self.device.type == "cpu" else min(4, cores())
        yield from stream_batches(sources, bs, self.preprocess, lambda xs: self.predict_tensors(xs, threshold), workers)

    def device_line(self) -> str:
        """Where this runs, for the first line a command prints (``util.device.describe``)."""
        return describe(self.device)

    def describe(self) -> dict[str, Any]:
        """What serve's /model says: enough for a client to know what it is talking to."""
        m = self.meta
        return {
            "classes": self.classes, "arch": m.arch, "input_size": self.size, "metrics": m.metrics,
            "version": m.ursa_version, "created": m.created, "format_version": m.format_version,
            "backend": "torch" + ("+bf16" if self.bf16 and self.amp is None else ""), "device": str(self.device),
            "file": self.source.name if self.source else None,
            "temperature": self.temperature, "unsure_threshold": self.threshold, **self.world.describe(),
            "task": self.task.name, "thresholds": self.thresholds,
        }


def load_predictor(path: str | Path, backend: str = "auto", threads: int | None = None,
                   bf16: bool = False, tta: bool = False, device: "str | Placement" = "auto") -> Predictor | OnnxPredictor:
    """Load a model file for inference on the backend ``runtime.current_onnx`` picks: the one loader for predict and serve.

    ONNX Runtime (a ``runtime.OnnxPredictor``, numpy in and out) for a .onnx path, for backend "onnx",
    and for "auto" with a current MODEL.onnx beside the model; torch (``Predictor``) otherwise.
    ``tta``: also run the mirrors the model was trained with and average (``Predictor.views`` says which).
    ``device``: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps, or a ``placement.Placement``;
    torch runs on a GPU that ONNX Runtime cannot use. An unknown or absent device is a ``DeviceError``.
    """
    check_backend(backend)
    where = place(device)
    threads = threads or default_threads()
    fast, why = current_onnx(path, backend, threads, tta, where)
    if fast is not None:
        return fast
    if why.stale:
        log.warning("%s; running %s with torch. Re-export with `ursa export %s --onnx`", why, path, path)
    torch.set_num_threads(threads)
    return _load_torch(Path(path), bf16, tta, where)


load_learner = load_predictor
"""fastai's name for `load_predictor` (``learn = load_learner(path)``), kept so fastai-style code reads the same."""


def torch_device(device: "torch.device | Placement | str | None") -> torch.device:
    """A torch.device from what callers give: None (the CPU), a name (``placement.place``'s rules) or a Placement."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return place(device).torch()


def _load_torch(path: Path, bf16: bool, tta: bool = False, device: "Placement | None" = None) -> Predictor:
    model, meta = load_model(path)  # CPU tensors: the file holds nothing device-specific
    return Predictor(model, meta, bf16=bf16, source=path, tta=tta, device=device)
