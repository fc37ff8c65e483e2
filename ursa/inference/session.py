"""The one way to open an ONNX Runtime session (torch-free): thread, spinning and logging settings live here."""

from __future__ import annotations

from typing import Any

from ursa.errors import ModelFileError, UrsaError
from ursa.util.device import DeviceError


def ort_session(model: bytes | str, threads: int, spinning: bool = True, device: str = "cpu") -> Any:
    """An ONNX Runtime session with `threads` intra-op threads; spinning=False lets idle threads sleep.

    Tuned for small machines: all graph optimisations, one op at a time (the inter-op pool off).
    ``device``: "cpu", or "cuda:N" for onnxruntime-gpu's CUDA provider (a DeviceError when it does not start).
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
    if device == "cpu":
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    index = int(device.split(":")[1]) if ":" in device else 0
    sess = ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", {"device_id": index}),
                                                      "CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in sess.get_providers():  # onnxruntime falls back to the CPU quietly
        raise DeviceError(f"--device {device}: ONNX Runtime could not start its CUDA provider on {device}; "
                          "use --device cpu, or check the CUDA libraries onnxruntime-gpu needs")
    return sess


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
