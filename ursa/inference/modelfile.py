"""The model file: one .safetensors with the weights and JSON metadata in its header.

Nothing is ever pickled, on save or on load: safetensors holds only tensors and strings, so a
model file from a stranger cannot run code. The metadata says how to rebuild the network and
preprocess an image (architecture, head, classes, input size, normalisation), and the training
run's configuration (``config``: split seed, validation share, settings) so later stages need not
guess them. ``config`` and ``calibration`` (temperature scaling) are optional: files written before
they existed load with empty ones, so the format version stays "1". Every field is checked on load
against one schema (``inference.metaschema``), for the safetensors header and the ONNX export
alike; the head is also checked against the weights' shapes before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ursa import __version__
from ursa.errors import ModelFileError
from ursa.inference.metaschema import FORMAT, FORMAT_VERSION, REDO_ONNX, checked_fields
from ursa.vision.models import Classifier, HeadConfig, create_backbone, create_head
from ursa.util.files import atomic_path

ONNX_META_KEY = "ursa"  # an ONNX export's custom metadata key holding the full ModelMeta as JSON


@dataclass
class ModelMeta:
    """What the header says about a model: enough to rebuild it and preprocess its inputs."""

    arch: str
    classes: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    head: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the training run's configuration (optional)
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature scaling and threshold (optional)
    ursa_version: str = __version__
    created: str = ""
    format: str = FORMAT
    format_version: str = FORMAT_VERSION

    def to_header(self) -> dict[str, str]:
        """safetensors metadata is str -> str: structured values are JSON."""
        d = asdict(self)
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items()}

    def to_json(self) -> str:
        """The whole metadata as one JSON object: what an ONNX export carries under ONNX_META_KEY."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, path: Path) -> "ModelMeta":
        """Parse `to_json`'s form with the same schema as a header; keys this version does not know are ignored."""
        where = "ONNX file's ursa metadata"
        try:
            raw = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise ModelFileError(f"{path}: {where} is not valid JSON ({type(e).__name__}){REDO_ONNX}") from None
        return cls(**checked_fields(raw, path, where, encoded=False))

    @classmethod
    def from_header(cls, h: dict[str, str], path: Path) -> "ModelMeta":
        """Parse and check a safetensors header's metadata (structured values are JSON strings) against the schema."""
        return cls(**checked_fields(h, path, "model header", encoded=True))


def save_model(model: Classifier, path: str | Path, meta: ModelMeta) -> Path:
    """Write weights + metadata atomically; a crash never leaves a half-written model file."""
    path = Path(path)
    if not meta.created:
        meta.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta.to_header())
    return path


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


def read_meta(path: str | Path) -> ModelMeta:
    """Metadata only: cheap, for `ursa serve`'s /model and for checks."""
    return ModelMeta.from_header(read_header(path), Path(path))


def load_model(path: str | Path) -> tuple[Classifier, ModelMeta]:
    """Rebuild the network from the header and load the weights, on CPU, in eval mode."""
    path = Path(path)
    meta = read_meta(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: model file is truncated or damaged ({e}); export it again") from None
    _check_head_fits(path, meta, state)
    body = create_backbone(meta.arch, pretrained=False)
    model = Classifier(body, HeadConfig(**meta.head), arch=meta.arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not fit architecture {meta.arch!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, meta


def _check_head_fits(path: Path, meta: ModelMeta, state: dict[str, torch.Tensor]) -> None:
    """The head the header describes has the shapes of the weights in the file (built on the meta device: no memory)."""
    with torch.device("meta"):
        head = create_head(HeadConfig(**meta.head))
    want = {f"head.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if k.startswith("head.")}
    if want != got:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ModelFileError(
            f"{path}: the header's head {meta.head} does not fit the weights in the file "
            f"({diff[0]}: header {want.get(diff[0])}, weights {got.get(diff[0])}); export the model again"
        )
