"""Predictor: the model file plus its preprocessing, for one image or many, torch or onnxruntime.

Preprocessing is exactly the validation pipeline the model was scored with during training
(``vision.transforms.load_pixels`` at the decode size, with its reduced-size JPEG decode, then
``vision.transforms.eval_transform``), so a served prediction and the reported metrics see the same pixels.

``load_predictor`` is the entry point (``load_learner`` is its fastai-familiar alias). Backend
names are checked in one place, ``check_backend``. Backend rule (shared by ``ursa predict`` and
``ursa serve``), see ``resolve_backend``:

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
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ursa.errors import ModelFileError, UrsaError
from ursa.inference.modelfile import ONNX_META_KEY, ModelMeta, load_model, read_meta
from ursa.inference.onnx import ort_session
from ursa.inference.results import Prediction, check_threshold  # one answer type for torch and the ONNX runtime
from ursa.vision.images import Source
from ursa.vision.transforms import decode_size, eval_transform, load_pixels

log = logging.getLogger("ursa")

BACKENDS = ("auto", "torch", "onnx")


def check_backend(name: str) -> str:
    """The one check of a backend name (CLI, serve and load_predictor alike), so every caller says the same line."""
    if name not in BACKENDS:
        raise UrsaError(f"--backend must be one of {', '.join(BACKENDS)} (got {name!r})")
    return name


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


def default_threads(workers: int = 1) -> int:
    """Intra-op threads per process: the cores shared out between worker processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


class Predictor:
    """Loaded once, used many times: preprocess + forward + softmax, batched."""

    def __init__(self, model: torch.nn.Module | None, meta: ModelMeta, backend: str = "torch",
                 onnx_session: Any = None, bf16: bool = False, source: Path | None = None) -> None:
        self.model, self.meta, self.backend, self.session, self.bf16 = model, meta, backend, onnx_session, bf16
        self.source = source
        cal = getattr(meta, "calibration", None) or {}  # model files before calibration have none
        self.temperature = float(cal.get("temperature") or 1.0)
        self.threshold: float | None = check_threshold(cal.get("threshold"))
        self.classes = list(meta.classes)
        self.size = int(meta.input_size)
        self._decode = decode_size(self.size)
        self._tfm = eval_transform(self.size, meta.mean, meta.std)
        self._input_name = onnx_session.get_inputs()[0].name if onnx_session is not None else None
        if self.model is not None:
            self.model.eval().to(memory_format=torch.channels_last)

    def preprocess(self, source: Source) -> torch.Tensor:
        """Decode and transform to a normalised CHW tensor; raises ImageError for unusable input."""
        with one_torch_thread():
            return self._tfm(load_pixels(source, self._decode))

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) logits for a preprocessed batch [N, 3, H, W]."""
        if self.backend == "onnx":
            arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            return torch.from_numpy(self.session.run(None, {self._input_name: arr})[0]).float()
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float()

    @torch.inference_mode()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities for a preprocessed batch [N, 3, H, W] (the model's temperature applied)."""
        return (self.logits(x) / self.temperature).softmax(1)

    @torch.inference_mode()
    def probs_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities and the pooled body features (None on ONNX Runtime, whose graph ends in logits)."""
        if self.model is None:
            return self.probs(x), None
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            f = self.model.features(x)
            logits = self.model.head(f)
        return (logits.float() / self.temperature).softmax(1), f.float()

    def result(self, p: torch.Tensor, threshold: float | None | str = "model") -> Prediction:
        """One row of probabilities as a Prediction, judged by the model's unsure threshold unless another is given."""
        values = p.tolist()
        i = int(max(range(len(values)), key=values.__getitem__))
        pred = Prediction(self.classes[i], i, {c: float(v) for c, v in zip(self.classes, values)})
        return pred.with_threshold(self.threshold if threshold == "model" else threshold)  # type: ignore[arg-type]

    def predict_tensors(self, xs: Sequence[torch.Tensor], threshold: float | None | str = "model") -> list[Prediction]:
        """Forward already-preprocessed images as one batch."""
        return [self.result(p, threshold) for p in self.probs(torch.stack(list(xs)))]

    def predict(self, source: Source) -> tuple[str, int, dict[str, float]]:
        """(label, index, probs) for one image, as fastai's learn.predict returns."""
        return self.result(self.probs(self.preprocess(source)[None])[0]).as_tuple()

    def predict_one(self, source: Source, threshold: float | None | str = "model") -> Prediction:
        """One image's full answer, unsure flag included ("model": the model's threshold; None: never unsure)."""
        return self.result(self.probs(self.preprocess(source)[None])[0], threshold)

    def predict_batch(self, sources: Sequence[Source], bs: int = 32,
                      threshold: float | None | str = "model") -> list[Prediction]:
        """Many images, batched; raises ImageError on the first unreadable one."""
        out: list[Prediction] = []
        for i in range(0, len(sources), bs):
            out += self.predict_tensors([self.preprocess(s) for s in sources[i:i + bs]], threshold)
        return out

    def describe(self) -> dict[str, Any]:
        """What serve's /model says: enough for a client to know what it is talking to."""
        m = self.meta
        return {
            "classes": self.classes, "arch": m.arch, "input_size": self.size, "metrics": m.metrics,
            "version": m.ursa_version, "created": m.created, "format_version": m.format_version,
            "backend": self.backend + ("+bf16" if self.bf16 and self.backend == "torch" else ""),
            "file": self.source.name if self.source else None,
            "temperature": self.temperature, "unsure_threshold": self.threshold,
        }


def resolve_backend(path: str | Path, backend: str = "auto") -> tuple[str, Path]:
    """Which backend runs which file: the one rule for predict and serve (see the module doc)."""
    path = Path(path)
    check_backend(backend)
    if path.suffix.lower() == ".onnx":
        if backend == "torch":
            raise UrsaError(f"{path}: --backend torch needs the model.safetensors file, not the ONNX export")
        if not path.is_file():
            raise ModelFileError(f"{path}: ONNX file not found; create it with `ursa export MODEL --onnx`")
        return "onnx", path
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    beside = path.with_suffix(".onnx")
    if backend == "onnx":
        if not beside.is_file():
            raise UrsaError(f"{beside}: ONNX file not found; create it with `ursa export {path} --onnx`")
        return "onnx", beside
    if backend == "auto" and beside.is_file() and beside.stat().st_mtime >= path.stat().st_mtime:
        return "onnx", beside
    return "torch", path


def load_predictor(path: str | Path, backend: str = "auto", threads: int | None = None,
                   bf16: bool = False) -> Predictor:
    """Load a model file for inference, on the backend `resolve_backend` picks: the one loader for predict and serve."""
    path = Path(path)
    check_backend(backend)
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    kind, file = resolve_backend(path, backend)
    if kind == "onnx":
        pred = _load_onnx(file, threads)
        if backend == "auto" and file != path:
            stale = _stale_reason(pred.meta, read_meta(path))
            if stale:
                log.warning("%s: not used (%s); running %s with torch. Re-export with `ursa export %s --onnx`",
                            file, stale, path, path)
                return _load_torch(path, bf16)
        return pred
    return _load_torch(file, bf16)


load_learner = load_predictor
"""fastai's name for `load_predictor` (``learn = load_learner(path)``), kept so fastai-style code reads the same."""


def _load_torch(path: Path, bf16: bool) -> Predictor:
    model, meta = load_model(path)
    return Predictor(model, meta, backend="torch", bf16=bf16, source=path)


def _stale_reason(onnx_meta: ModelMeta, meta: ModelMeta) -> str | None:
    """Why an ONNX export does not belong to this model file, or None when it does (mtimes lie, metadata doesn't)."""
    if onnx_meta.created != meta.created:
        return f"exported from the model created {onnx_meta.created or '?'}, this model file was created {meta.created or '?'}"
    if onnx_meta.classes != meta.classes:
        return "its classes differ from the model file's"
    return None


def onnx_session(path: Path, threads: int) -> Any:
    """A session for a user's .onnx file (`ort_session`'s settings), with one clear line when it is not ONNX."""
    try:
        return ort_session(str(path), threads, spinning=True)
    except UrsaError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def onnx_meta(session: Any, path: Path) -> ModelMeta:
    """The ursa metadata an `ursa export --onnx` file carries (custom metadata key "ursa")."""
    meta_map = session.get_modelmeta().custom_metadata_map
    if ONNX_META_KEY not in meta_map:
        raise ModelFileError(f"{path}: not an ursa ONNX export (no {ONNX_META_KEY!r} metadata); create one with `ursa export MODEL --onnx`")
    return ModelMeta.from_json(meta_map[ONNX_META_KEY], path)


def _load_onnx(path: Path, threads: int) -> Predictor:
    sess = onnx_session(path, threads)
    return Predictor(None, onnx_meta(sess, path), backend="onnx", onnx_session=sess, source=path)
