"""ONNX Runtime plumbing for torch models: the exporter keyword, the frozen body as a fast function.

Everything that runs a network on ONNX Runtime (the predictor, the runtime, the feature cache, the
cleaner's model pass) opens its session through ``ort_session`` (torch-free, in
``inference.session``, re-exported here) so thread and logging settings live in one place.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ursa.inference.session import check_session_fits, ort_session
from ursa.inference.static import export_graph, torchscript_exporter

__all__ = ["check_session_fits", "onnx_features", "ort_session", "torchscript_exporter"]

log = logging.getLogger("ursa")


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def onnx_features(model: torch.nn.Module, size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """model.features (body + pooling, eval mode) on ONNX Runtime: ~2x eager torch on CPU (fused conv+BN).

    For passes where the body does not change (the feature cache, `ursa clean`). Exporting
    takes about half a second. None when the export, the session or a check on three random
    images (features within 1e-3 of torch's, at a batch size other than the traced one) fails:
    the caller then runs torch. The model's train/eval modes are left as they were.
    """
    modes = [m.training for m in model.modules()]
    try:
        features = _Features(model).eval()
        # Static "same" padding (inference.static): the body's graph without run-time pad arithmetic.
        graph = export_graph(features, size, "x", "f").SerializeToString()
        # Idle runtime threads sleep instead of spinning, leaving the CPU to the thread that augments
        # the next batch (measured: 6.3 s instead of 8.3 s per view of the bears set on 2 cores).
        sess = ort_session(graph, torch.get_num_threads(), spinning=False)
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
