"""Which model `ursa serve` runs, loaded so that the ONNX path never imports torch.

``ursa serve model.onnx`` (or a model.safetensors with a current model.onnx beside it, backend
auto) runs on ``inference.runtime.OnnxPredictor``: numpy arrays from Pillow, ONNX Runtime,
``np.stack`` in the micro-batcher. Only when torch must run (``--backend torch``, no current
export) is ``inference.predictor`` imported, here and nowhere else in the app, so a slim install
(``pip install ursa``, no torch) serves ONNX models and says in one line what to install for the
rest (``cli.main``). The backend rule itself is ``runtime.current_onnx``, shared with ``ursa predict``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ursa.inference.placement import Placement, place
from ursa.inference.preprocess import DECODE_SCALE
from ursa.inference.results import check_backend
from ursa.inference.runtime import current_onnx
from ursa.util.device import default_threads

log = logging.getLogger("ursa.apps.serve")

def load_model(model: Any, backend: str = "auto", threads: int | None = None, bf16: bool = False,
               device: "str | Placement" = "auto") -> tuple[Any, str]:
    """(predictor, why this backend): the ONNX runtime when `backend` (and `device`) pick it, else torch, imported only now."""
    check_backend(backend)
    where = place(device)  # torch-free for cpu, and for auto with no GPU in sight
    threads = threads or default_threads()
    fast, why = current_onnx(model, backend, threads, device=where)
    if fast is not None:
        return fast, why
    if why.stale:
        log.warning("%s; running %s with torch. Re-export with `ursa export %s --onnx`", why, model, model)
    from ursa.inference.predictor import load_predictor  # torch: only on this path

    return load_predictor(model, backend="torch", threads=threads, bf16=bf16, device=where), why


def device_text(pred: Any, workers: int = 1, threads: int | None = None) -> str:
    """Where the predictor runs, as the serving line says it ("device: cpu (2 threads)"; per worker when several)."""
    line = getattr(pred, "device_line", None)
    if workers > 1 and str(getattr(pred, "device", "cpu")) == "cpu":
        return f"device: cpu ({workers} workers, {threads or default_threads(workers)} threads each)"
    return line() if line is not None else "device: cpu"


def batch_runner(pred: Any) -> Callable[[list[Any]], list[Any]]:
    """The predictor's forward over one micro-batch of preprocessed images (arrays on ONNX, tensors on torch)."""
    run = getattr(pred, "predict_arrays", None) if pred.backend == "onnx" else None
    return run or pred.predict_tensors


def decode_side(pred: Any) -> int:
    """The short side images are decoded at (JPEG draft), for counting pixels before the decode."""
    spec = getattr(pred, "spec", None)
    if isinstance(spec, dict) and "decode" in spec:
        return int(spec["decode"]["short_side"])  # what the ONNX file's preprocess metadata says
    return int(round(pred.size * DECODE_SCALE))  # vision.transforms.decode_size, without importing torch
