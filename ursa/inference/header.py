"""A model file's header read without torch: the safetensors JSON header and its checked metadata.

``modelfile`` (which needs torch to load weights) re-exports both, so existing imports work; the
torch-free runtime uses them to tell whether an ONNX export belongs to a model file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ursa.errors import ModelFileError
from ursa.inference.metaschema import ModelMeta


def read_header(path: str | Path) -> dict[str, str]:
    """The __metadata__ of a safetensors file, read without touching the tensors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: not a model file (too short); give the model.safetensors that `ursa train` wrote")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100_000_000:
            raise ModelFileError(f"{path}: not an ursa model file (no safetensors header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ModelFileError(f"{path}: not an ursa model file (damaged safetensors header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not an ursa model file (its safetensors header is a {type(header).__name__}, not an object)")
    return header.get("__metadata__") or {}


def read_meta(path: str | Path, buildable: bool = True) -> ModelMeta:
    """Metadata only: cheap, for `ursa serve`'s /model and for checks (buildable=False: no torch import)."""
    return ModelMeta.from_header(read_header(path), Path(path), buildable)
