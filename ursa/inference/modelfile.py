"""The model file: one .safetensors with the weights and JSON metadata in its header.

Nothing is ever pickled, on save or on load: safetensors holds only tensors and strings, so a
model file from a stranger cannot run code. The metadata says how to rebuild the network and
preprocess an image (architecture, head, classes, input size, normalisation), and the training
run's configuration (``config``: split seed, validation share, settings) so later stages need not
guess them. ``config`` and ``calibration`` (temperature scaling) are optional: files written before
they existed load with empty ones, so the format version stays "1". Every field is checked on load
against one schema (``inference.metaschema``, which also holds ``ModelMeta`` so the torch-free
runtime can read it; it is re-exported here), for the safetensors header and the ONNX export
alike; the head is also checked against the weights' shapes before anything is allocated.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ursa.errors import ModelFileError
from ursa.inference.header import read_header, read_meta
from ursa.inference.metaschema import FORMAT, FORMAT_VERSION, ONNX_META_KEY, ModelMeta
from ursa.vision.models import Classifier, HeadConfig, create_backbone, create_head
from ursa.util.files import save_tensors

__all__ = ["ONNX_META_KEY", "ModelMeta", "load_model", "read_header", "read_meta", "save_model", "weights_fingerprint"]


def save_model(model: Classifier, path: str | Path, meta: ModelMeta) -> Path:
    """Write weights + metadata atomically; a crash never leaves a half-written model file."""
    path = Path(path)
    if not meta.created:
        meta.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta.fingerprint = weights_fingerprint(state)
    return save_tensors(path, state, metadata=meta.to_header())  # a full disk: one NoSpaceError line


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name): which weights these are.

    Stored in the model file's header and copied into its ONNX export, so the runtime can tell
    whether a model.onnx beside a model file was exported from it without reading either's weights.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
