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
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ursa.errors import ModelFileError, UrsaError
from ursa.inference.modelfile import ONNX_META_KEY, ModelMeta, load_model, read_meta
from ursa.inference.onnx import ort_session
from ursa.vision.images import Source
from ursa.vision.transforms import decode_size, eval_transform, load_pixels

log = logging.getLogger("ursa")

BACKENDS = ("auto", "torch", "onnx")


def check_backend(name: str) -> str:
    """The one check of a backend name (CLI, serve and load_predictor alike), so every caller says the same line."""
    if name not in BACKENDS:
        raise UrsaError(f"--backend must be one of {', '.join(BACKENDS)} (got {name!r})")
    return name


@dataclass
class Prediction:
    """One image's answer: label, its index, and every class's probability."""

    label: str
    index: int
    probs: dict[str, float]

    def as_tuple(self) -> tuple[str, int, dict[str, float]]:
        """fastai's (label, index, probs) shape."""
        return self.label, self.index, self.probs

    def to_json(self) -> dict[str, Any]:
        """What the web API returns for one image."""
        return {"label": self.label, "index": self.index, "probs": self.probs}


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
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for a preprocessed batch [N, 3, H, W]."""
        if self.backend == "onnx":
            arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            logits = self.session.run(None, {self._input_name: arr})[0]
            return torch.from_numpy(logits).float().softmax(1)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        return logits.float().softmax(1)

    def result(self, p: torch.Tensor) -> Prediction:
        """One row of probabilities as a Prediction."""
        values = p.tolist()
        i = int(max(range(len(values)), key=values.__getitem__))
        return Prediction(self.classes[i], i, {c: float(v) for c, v in zip(self.classes, values)})

    def predict_tensors(self, xs: Sequence[torch.Tensor]) -> list[Prediction]:
        """Forward already-preprocessed images as one batch."""
        return [self.result(p) for p in self.probs(torch.stack(list(xs)))]

    def predict(self, source: Source) -> tuple[str, int, dict[str, float]]:
        """(label, index, probs) for one image, as fastai's learn.predict returns."""
        return self.result(self.probs(self.preprocess(source)[None])[0]).as_tuple()

    def predict_batch(self, sources: Sequence[Source], bs: int = 32) -> list[Prediction]:
        """Many images, batched; raises ImageError on the first unreadable one."""
        out: list[Prediction] = []
        for i in range(0, len(sources), bs):
            out += self.predict_tensors([self.preprocess(s) for s in sources[i:i + bs]])
        return out

    def describe(self) -> dict[str, Any]:
        """What serve's /model says: enough for a client to know what it is talking to."""
        m = self.meta
        return {
            "classes": self.classes, "arch": m.arch, "input_size": self.size, "metrics": m.metrics,
            "version": m.ursa_version, "created": m.created, "format_version": m.format_version,
            "backend": self.backend + ("+bf16" if self.bf16 and self.backend == "torch" else ""),
            "file": self.source.name if self.source else None,
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
