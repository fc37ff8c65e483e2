"""ONNX Runtime plumbing: one way to open a session, the exporter keyword, the frozen body as a fast function.

Everything that runs a network on ONNX Runtime (the predictor, the feature cache, the cleaner's
model pass) opens its session through ``ort_session`` so thread and logging settings live here.
"""

from __future__ import annotations

import inspect
import io
import logging
import warnings
from typing import Any, Callable

import torch

from ursa.errors import ModelFileError, UrsaError

log = logging.getLogger("ursa")


def ort_session(model: bytes | str, threads: int, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads; spinning=False lets idle threads sleep.

    Tuned for small machines: all graph optimisations, one op at a time (the inter-op pool off).
    """
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - declared dependency
        raise UrsaError("onnxruntime is not installed: pip install onnxruntime") from None

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def check_session_fits(session: Any, n_classes: int, size: int, path: object) -> None:
    """An ONNX graph whose input is not [N, 3, size, size] or whose output is not one logit per class is refused.

    Otherwise a server would start and then fail every request (metadata and graph disagreeing).
    Dimensions the graph leaves symbolic (the batch) are not checked.
    """
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or len(outs) < 1:
        raise ModelFileError(f"{path}: an ursa ONNX export has one input and one output, this graph has {len(ins)} and {len(outs)}; "
                             "export it again with `ursa export MODEL --onnx`")
    checks = (("input", list(ins[0].shape)[1:], [3, size, size]), ("output", list(outs[0].shape)[1:], [n_classes]))
    for what, got, want in checks:
        if len(got) != len(want) or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise ModelFileError(f"{path}: the graph's {what} is [N, {', '.join(map(str, got))}] but its metadata says "
                                 f"[N, {', '.join(map(str, want))}]; export it again with `ursa export MODEL --onnx`")


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def torchscript_exporter() -> dict:
    """torch.onnx.export's keyword for the TorchScript exporter (needs no onnxscript); torch < 2.5 has only that one."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def onnx_features(model: torch.nn.Module, size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """model.features (body + pooling, eval mode) on ONNX Runtime: ~2x eager torch on CPU (fused conv+BN).

    For passes where the body does not change (the feature cache, `ursa clean`). Exporting
    takes about half a second. None when the export, the session or a check on three random
    images (features within 1e-3 of torch's, at a batch size other than the traced one) fails:
    the caller then runs torch. The model's train/eval modes are left as they were.
    """
    modes = [m.training for m in model.modules()]
    try:
        buf = io.BytesIO()
        features = _Features(model).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter deprecation and tracer notes: the check below decides
            torch.onnx.export(features, (torch.zeros(2, 3, size, size),), buf, **torchscript_exporter(),
                              opset_version=17, input_names=["x"], output_names=["f"],
                              dynamic_axes={"x": {0: "n"}, "f": {0: "n"}})
        # Idle runtime threads sleep instead of spinning, leaving the CPU to the thread that augments
        # the next batch (measured: 6.3 s instead of 8.3 s per view of the bears set on 2 cores).
        sess = ort_session(buf.getvalue(), torch.get_num_threads(), spinning=False)
        probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = features(probe)
        got = torch.from_numpy(sess.run(None, {"x": probe.numpy()})[0])
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-3, rtol=1e-3):
            raise ValueError(f"exported body differs from torch's by {(got - want).abs().max():.2g}")
    except Exception as e:  # noqa: BLE001 - any failure here only means: use torch
        log.warning("running the body on torch: ONNX Runtime could not take it (%s: %s)", type(e).__name__, e)
        return None
    finally:
        for m, training in zip(model.modules(), modes):
            m.training = training

    def run(xb: torch.Tensor) -> torch.Tensor:
        # 8 images per call: measured fastest on 2 cores, and the runtime's arena stays ~0.2 GB.
        x = xb.contiguous().numpy()
        return torch.cat([torch.from_numpy(sess.run(None, {"x": x[j:j + 8]})[0]) for j in range(0, len(x), 8)])

    return run
