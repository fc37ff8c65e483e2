"""Where inference runs (``--device``), decided torch-free: torch is asked only when a GPU may be there.

``place(spec)`` checks the name (``util.device.check_device_name``) and resolves it once. ``cpu``,
and ``auto`` on a machine with no sign of a GPU (no NVIDIA/ROCm device node, not an Apple Silicon
Mac, torch not loaded yet), never import torch, so the ONNX Runtime path stays torch-free and as
fast to start as before; ``auto`` without torch installed is the CPU. Otherwise
``util.device.resolve_device`` decides (CUDA, then MPS, then the CPU; an absent device is a
``DeviceError``: one line, exit 2). ``onnx_device`` says whether ONNX Runtime can run there
(the CPU; CUDA with onnxruntime-gpu's CUDAExecutionProvider); where it cannot, torch runs.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

from ursa.util.device import DeviceError, check_device_name

ORT_CUDA = "CUDAExecutionProvider"
# Device nodes that exist only where a GPU driver is loaded: NVIDIA, AMD ROCm (torch.cuda too), WSL2's GPU.
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


@dataclass(frozen=True)
class Placement:
    """A resolved --device: its kind and index, and the torch device when torch was asked."""

    kind: str = "cpu"  # "cpu", "cuda" or "mps"
    index: int | None = None
    torch_device: Any = None  # a torch.device, or None when torch was not imported

    @property
    def name(self) -> str:
        """The device as torch spells it: cpu, cuda:0, mps."""
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def is_cpu(self) -> bool:
        """Whether this is the CPU (today's behaviour everywhere)."""
        return self.kind == "cpu"

    def torch(self) -> Any:
        """The torch.device (imports torch: the torch backend only)."""
        if self.torch_device is not None:
            return self.torch_device
        import torch

        return torch.device(self.name)


CPU = Placement()


def gpu_possible() -> bool:
    """Whether this machine may have a GPU torch can use; False means `auto` is the CPU without asking torch."""
    if "torch" in sys.modules or os.name == "nt":
        return True  # torch is loaded (asking costs nothing), or no cheap sign to look for
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return any(os.path.exists(p) for p in GPU_NODES)


def ort_has_cuda() -> bool:
    """Whether the installed onnxruntime has the CUDA execution provider (onnxruntime-gpu)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return ORT_CUDA in ort.get_available_providers()


def place(spec: "str | Placement | None" = "auto") -> Placement:
    """Resolve --device once: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps; DeviceError when absent."""
    if isinstance(spec, Placement):
        return spec
    s = check_device_name(spec or "auto")
    if s == "cpu" or (s == "auto" and not gpu_possible()):
        return CPU
    from ursa.util.device import resolve_device

    try:
        dev = resolve_device(s)  # imports torch
    except ImportError:
        return _without_torch(s)
    return Placement(dev.type, dev.index if dev.type == "cuda" else None, dev)


def _without_torch(s: str) -> Placement:
    """A slim install (no torch): the CPU for auto, ONNX Runtime's CUDA provider for cuda, else one line."""
    if s == "auto":
        return CPU
    if s.startswith("cuda") and ort_has_cuda():
        return Placement("cuda", int(s.split(":")[1]) if ":" in s else 0)
    what = (f"torch is not installed here and ONNX Runtime has no {ORT_CUDA}" if s.startswith("cuda")
            else "Apple MPS runs through torch, which is not installed here")
    raise DeviceError(f"--device {s}: {what}; use --device auto or cpu (or pip install 'ursa[train]')")


def onnx_device(where: Placement) -> str | None:
    """What ONNX Runtime runs on for this placement ("cpu", "cuda:N"), or None when it cannot run there (torch does)."""
    if where.is_cpu:
        return "cpu"
    if where.kind == "cuda" and ort_has_cuda():
        return where.name if where.index is not None else "cuda:0"
    return None


def onnx_refusal(where: Placement, what: object) -> DeviceError:
    """The one line for an ONNX-only model (or --backend onnx) asked to run where ONNX Runtime cannot."""
    return DeviceError(f"--device {where.name}: {what} runs on ONNX Runtime, which cannot use {where.name} here "
                       f"(no {ORT_CUDA if where.kind == 'cuda' else 'MPS support'}); give the model.safetensors "
                       "file (torch runs it there) or use --device cpu")


def onnx_line(device: str, threads: int) -> str:
    """The device line for an ONNX Runtime session, in the words of util.device.describe."""
    if device == "cpu":
        return f"device: cpu ({threads} threads)"
    return f"device: {device} (ONNX Runtime {ORT_CUDA})"
