"""Which device runs the network: ``--device auto|cpu|cuda|cuda:N|mps``, resolved once, said once.

torch is imported lazily, so the torch-free inference path can ask too (without torch, ``auto``
is the CPU). A device that is unknown or absent is a ``DeviceError``: one line, exit 2.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from ursa.errors import UrsaError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = "Where the network runs: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps."
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def cores() -> int:
    """CPU cores this process may use (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(workers: int = 1) -> int:
    """Intra-op threads per process: the cores shared out between worker processes (predict, serve, workers)."""
    return max(1, cores() // max(1, workers))


class DeviceError(UrsaError):
    """A --device that is not a device name, or one this machine does not have."""


def check_device_name(spec: str) -> str:
    """The spec, lower-cased, when it names a device kind ursa knows (without asking torch)."""
    s = (spec or "auto").strip().lower()
    if not _PATTERN.match(s):
        raise DeviceError(f"--device: expected {DEVICE_CHOICES}, got {spec!r}")
    return s


def resolve_device(spec: str = "auto") -> "torch.device":
    """The torch device for --device; auto takes CUDA, then MPS, then the CPU; absent devices are an error."""
    import torch

    s = check_device_name(spec)
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        if not _mps_available():
            raise DeviceError("--device mps: Apple's Metal (MPS) is not available on this machine; use --device auto or cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {s}: no CUDA GPU is available to torch here (torch {torch.__version__}); "
                          "use --device auto or cpu")
    index = int(s.split(":")[1]) if ":" in s else torch.cuda.current_device()
    n = torch.cuda.device_count()
    if index >= n:
        raise DeviceError(f"--device {s}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return torch.device("cuda", index)


def describe(device: "torch.device") -> str:
    """One line for the first lines a command prints: which device, and how it computes there."""
    import torch

    if device.type == "cuda":
        dtype = autocast_dtype(device)
        name = torch.cuda.get_device_name(device)
        return f"device: {device} ({name}; mixed precision {str(dtype).replace('torch.', '')}, channels_last)"
    if device.type == "mps":
        return "device: mps (Apple Metal)"
    return f"device: cpu ({torch.get_num_threads()} threads)"


def autocast_dtype(device: "torch.device") -> "torch.dtype | None":
    """Mixed precision for training on this device: bf16 where the GPU supports it, else fp16; None on CPU/MPS."""
    import torch

    if device.type != "cuda":
        return None
    # bf16 in hardware from Ampere (compute capability 8) on; is_bf16_supported() also says yes where it is emulated.
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
