"""The model file: one .safetensors with the weights and JSON metadata in its header.

Nothing is ever pickled, on save or on load: safetensors holds only tensors and strings, so a
model file from a stranger cannot run code. The metadata says how to rebuild the network and
preprocess an image (architecture, head, classes, input size, normalisation), and the training
run's configuration (``config``: split seed, validation share, settings) so later stages need not
guess them. ``config`` is optional: files written before it existed load with an empty one, so the
format version stays "1".
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ursa import __version__
from ursa.errors import ModelFileError
from ursa.vision.models import Classifier, HeadConfig, create_backbone
from ursa.util.files import atomic_path

FORMAT = "ursa.model"
FORMAT_VERSION = "1"
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
        """Parse `to_json`'s form with the same checks as a header; keys this version does not know are ignored."""
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items() if k in known}
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{path}: ursa metadata in the ONNX file is damaged ({e})") from None
        return cls.from_header(header, path)

    @classmethod
    def from_header(cls, h: dict[str, str], path: Path) -> "ModelMeta":
        """Parse and check a header; a clear error for anything that is not an ursa model."""
        if h.get("format") != FORMAT:
            raise ModelFileError(f"{path}: not an ursa model file (no format={FORMAT} in its header); export one with `ursa train`")
        if h.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: model file format version {h.get('format_version')!r}, this ursa ({__version__}) reads "
                f"version {FORMAT_VERSION}; upgrade ursa or re-export the model"
            )
        try:
            config = json.loads(h.get("config", "{}"))
            if not isinstance(config, dict):
                raise TypeError(f"config is a {type(config).__name__}, not an object")
            return cls(
                arch=h["arch"], classes=json.loads(h["classes"]), input_size=int(h["input_size"]),
                mean=json.loads(h["mean"]), std=json.loads(h["std"]), head=json.loads(h["head"]),
                metrics=json.loads(h.get("metrics", "{}")), config=config, ursa_version=h.get("ursa_version", "?"),
                created=h.get("created", ""),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: ursa model header is damaged ({type(e).__name__}: {e})") from None


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
        except (UnicodeDecodeError, ValueError):
            raise ModelFileError(f"{path}: not an ursa model file (damaged safetensors header)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not an ursa model file")
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
    body = create_backbone(meta.arch, pretrained=False)
    model = Classifier(body, HeadConfig(**meta.head), arch=meta.arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not fit architecture {meta.arch!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, meta
