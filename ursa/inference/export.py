"""ONNX export of a model file: for onnxruntime on small CPUs and servers without torch (see docs/deploy.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ursa import __version__
from ursa.errors import ModelFileError
from ursa.inference.modelfile import ONNX_META_KEY, ModelMeta, load_model
from ursa.inference.preprocess import PREPROCESS_KEY, preprocess_spec
from ursa.inference.session import ort_session
from ursa.inference.static import export_graph
from ursa.util.files import atomic_path
from ursa.vision.models import Classifier

log = logging.getLogger("ursa")

ONNX_OPSET = 17  # supported by every onnxruntime since 1.15
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


def onnx_props(meta: ModelMeta, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The custom metadata of an ursa ONNX file: the full ModelMeta, the preprocessing, and a few plain keys."""
    props = {ONNX_META_KEY: meta.to_json(), "classes": json.dumps(meta.classes), "arch": meta.arch,
             "input_size": str(meta.input_size),
             PREPROCESS_KEY: json.dumps(preprocess_spec(meta.input_size, meta.mean, meta.std))}
    props.update(extra or {})
    return props


def set_props(proto: Any, props: dict[str, str]) -> None:
    """Replace the ONNX file's custom metadata keys named in `props`."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in keep + list(props.items()):
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def export_onnx(model_path: str | Path, out: str | Path | None = None, *, opset: int = ONNX_OPSET,
                check: bool = True) -> Path:
    """Write MODEL.onnx (dynamic batch, static padding, classes + metadata + preprocessing inside) for servers without torch.

    ``check`` runs the export once on onnxruntime and refuses a file whose probabilities differ
    from torch's by more than 1e-4.
    """
    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_suffix(".onnx")
    if out.resolve() == model_path.resolve():
        raise ModelFileError(f"{out}: the ONNX file would overwrite the model file; choose another --out")
    model, meta = load_model(model_path)
    try:
        proto = export_graph(model, meta.input_size, ONNX_INPUT, ONNX_OUTPUT, opset)
    except ImportError:  # pragma: no cover - declared dependency
        raise ModelFileError("the onnx package is not installed: pip install onnx onnxruntime") from None
    set_props(proto, onnx_props(meta))
    proto.producer_name, proto.producer_version = "ursa", __version__
    proto.doc_string = f"ursa {meta.arch} classifier: {', '.join(meta.classes)}"
    data = proto.SerializeToString()
    if check:
        check_onnx(data, model, meta.input_size)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


def write_onnx_beside(model_path: str | Path) -> Path | None:
    """MODEL.onnx beside a freshly written model file, for `ursa train`; never fails the run (None and a warning)."""
    try:
        return export_onnx(model_path)
    except Exception as e:  # noqa: BLE001 - the model file is the run's result; the ONNX file is a bonus
        log.warning("%s: no ONNX file written beside it (%s: %s); `ursa export %s --onnx` retries",
                    model_path, type(e).__name__, e, model_path)
        return None


def check_onnx(graph: bytes | str, model: Classifier, size: int, tol: float = 1e-4) -> float:
    """Same probabilities from onnxruntime as from torch, or a ModelFileError; the largest difference."""
    sess = ort_session(graph, threads=1)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x).softmax(1)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]).softmax(1)
    err = float((want - got).abs().max())
    if err > tol:
        raise ModelFileError(f"ONNX export differs from torch by {err:.2g} in probability; not written")
    return err
