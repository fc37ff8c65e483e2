"""Predictor: the model file plus its preprocessing, for one image or many, torch or onnxruntime.

Preprocessing is the validation transform the model was trained with (short side to the input
size, centre crop, the backbone's normalisation), applied after a reduced-size JPEG decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ursa.data import decode_size, eval_transform, load_pixels
from ursa.errors import UrsaError
from ursa.export import ModelMeta, load_model
from ursa.images import Source


@dataclass
class Prediction:
    """One image's answer: label, its index, and every class's probability."""

    label: str
    index: int
    probs: dict[str, float]

    def as_tuple(self) -> tuple[str, int, dict[str, float]]:
        return self.label, self.index, self.probs


class Predictor:
    """Loaded once, used many times: preprocess + forward + softmax, batched."""

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, backend: str = "torch",
                 onnx_session=None, bf16: bool = False) -> None:
        self.model, self.meta, self.backend, self.session, self.bf16 = model, meta, backend, onnx_session, bf16
        self.classes = list(meta.classes)
        self.size = int(meta.input_size)
        self._tfm = eval_transform(self.size, meta.mean, meta.std)
        if self.model is not None:
            self.model.eval().to(memory_format=torch.channels_last)

    def preprocess(self, source: Source) -> torch.Tensor:
        """Decode (JPEG draft at reduced size) and transform to a normalised CHW tensor."""
        return self._tfm(load_pixels(source, decode_size(self.size)))

    @torch.inference_mode()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for a preprocessed batch [N, 3, H, W]."""
        if self.backend == "onnx":
            import numpy as np

            out = self.session.run(None, {self.session.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]
            return torch.from_numpy(out).float().softmax(1)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        return logits.float().softmax(1)

    def _result(self, p: torch.Tensor) -> Prediction:
        i = int(p.argmax())
        return Prediction(self.classes[i], i, {c: float(v) for c, v in zip(self.classes, p.tolist())})

    def predict(self, source: Source) -> tuple[str, int, dict[str, float]]:
        """(label, index, probs) for one image, as fastai's learn.predict returns."""
        return self._result(self.probs(self.preprocess(source)[None])[0]).as_tuple()

    def predict_batch(self, sources: Sequence[Source], bs: int = 32) -> list[Prediction]:
        """Many images, batched; raises ImageError on the first unreadable one."""
        out: list[Prediction] = []
        for i in range(0, len(sources), bs):
            x = torch.stack([self.preprocess(s) for s in sources[i:i + bs]])
            out += [self._result(p) for p in self.probs(x)]
        return out


def load_learner(path: str | Path, backend: str = "auto", threads: int | None = None) -> Predictor:
    """Load a model file for inference (fastai's name); uses model.onnx beside it when present and asked."""
    path = Path(path)
    if threads:
        torch.set_num_threads(threads)
    if path.suffix == ".onnx" or backend == "onnx":
        return _load_onnx(path)
    model, meta = load_model(path)
    return Predictor(model, meta)


def _load_onnx(path: Path) -> Predictor:
    import json

    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - declared dependency
        raise UrsaError("onnxruntime is not installed: pip install onnxruntime") from None
    onnx_path = path if path.suffix == ".onnx" else path.with_suffix(".onnx")
    if not onnx_path.is_file():
        raise UrsaError(f"{onnx_path}: ONNX file not found; create it with `ursa export MODEL --onnx`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    meta_map = sess.get_modelmeta().custom_metadata_map
    if "ursa" not in meta_map:
        raise UrsaError(f"{onnx_path}: not an ursa ONNX export (no ursa metadata)")
    from ursa.export import ModelMeta

    meta = ModelMeta(**json.loads(meta_map["ursa"]))
    return Predictor(None, meta, backend="onnx", onnx_session=sess)
