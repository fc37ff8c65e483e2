"""ONNX export of a model file: for onnxruntime on small CPUs and servers without torch (see docs/serve.md)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ursa import __version__
from ursa.errors import ModelFileError
from ursa.inference.modelfile import ONNX_META_KEY, load_model
from ursa.inference.onnx import ort_session, torchscript_exporter
from ursa.util.files import atomic_path
from ursa.vision.models import Classifier


ONNX_OPSET = 17  # supported by every onnxruntime since 1.15
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"


def export_onnx(model_path: str | Path, out: str | Path | None = None, *, opset: int = ONNX_OPSET,
                check: bool = True) -> Path:
    """Write MODEL.onnx (dynamic batch, classes + full ursa metadata inside) so servers need no torch code.

    ``check`` runs the export once on onnxruntime and refuses a file whose probabilities differ
    from torch's by more than 1e-4.
    """
    try:
        import onnx
    except ImportError:  # pragma: no cover - declared dependency
        raise ModelFileError("the onnx package is not installed: pip install onnx onnxruntime") from None
    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_suffix(".onnx")
    if out.resolve() == model_path.resolve():
        raise ModelFileError(f"{out}: the ONNX file would overwrite the model file; choose another --out")
    model, meta = load_model(model_path)
    x = torch.zeros(2, 3, meta.input_size, meta.input_size)
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            # The TorchScript exporter (dynamo=False) needs no onnxscript and is still supported in
            # torch 2.x; its deprecation notice is not the user's concern.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(tmp), **torchscript_exporter(), opset_version=opset,
                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        for key, value in ((ONNX_META_KEY, meta.to_json()), ("classes", json.dumps(meta.classes)),
                           ("arch", meta.arch), ("input_size", str(meta.input_size))):
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value
        proto.producer_name, proto.producer_version = "ursa", __version__
        proto.doc_string = f"ursa {meta.arch} classifier: {', '.join(meta.classes)}"
        onnx.save(proto, str(tmp))
        if check:
            _check_onnx(tmp, model, meta.input_size)
    return out


def _check_onnx(path: Path, model: Classifier, size: int) -> None:
    """Same probabilities from onnxruntime as from torch, or no file."""
    sess = ort_session(str(path), threads=1)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x).softmax(1)
    got = torch.from_numpy(sess.run(None, {ONNX_INPUT: x.numpy()})[0]).softmax(1)
    err = float((want - got).abs().max())
    if err > 1e-4:
        raise ModelFileError(f"ONNX export differs from torch by {err:.2g} in probability; not written")
