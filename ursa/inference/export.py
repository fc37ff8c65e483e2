"""ONNX export of a model file: for onnxruntime on small CPUs and servers without torch (see docs/deploy.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ursa import __version__
from ursa.errors import ModelFileError
from ursa.inference.evidence import EvidenceModel, NoEvidenceMaps
from ursa.inference.modelfile import ONNX_META_KEY, ModelMeta, load_model
from ursa.inference.preprocess import PREPROCESS_KEY, preprocess_spec
from ursa.inference.runtime import EVIDENCE_OUTPUT, FEATURES_OUTPUT
from ursa.inference.session import ort_session
from ursa.inference.static import export_graph
from ursa.util.files import atomic_write_bytes
from ursa.util.names import printable
from ursa.vision.models import Classifier

log = logging.getLogger("ursa")

ONNX_OPSET = 17  # supported by every onnxruntime since 1.15
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
# Output 1: the pooled body features the head consumes (``Classifier.features``), for interpret's
# embedding map and the cleaner's rankings; output 0 stays the logits, so one-output readers still work.
ONNX_FEATURES = FEATURES_OUTPUT
# Output 2: the per-class evidence maps [N, K, h, w] (``evidence``: the exact CAM of ursa's head), so
# `ursa predict --explain` and serve's /explain draw heat maps without torch. Heads it cannot map exactly
# (not ursa's own) export without it.
ONNX_EVIDENCE = EVIDENCE_OUTPUT


class LogitsAndFeatures(torch.nn.Module):
    """A classifier that also returns the pooled body features: (logits, features), one forward pass."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.features(x)
        return self.model.head(f), f


def export_two_outputs(model: Classifier, size: int, opset: int = ONNX_OPSET) -> Any:
    """The classifier as an ONNX ModelProto with outputs (logits, features[, evidence]): dynamic batch, static padding folded."""
    try:
        module: torch.nn.Module = EvidenceModel(model)
    except NoEvidenceMaps as e:
        log.info("no evidence maps in the ONNX export: %s", e)
        return export_graph(LogitsAndFeatures(model), size, ONNX_INPUT, [ONNX_OUTPUT, ONNX_FEATURES], opset)
    return export_graph(module, size, ONNX_INPUT, [ONNX_OUTPUT, ONNX_FEATURES, ONNX_EVIDENCE], opset)


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

    Outputs: ``logits`` (output 0), ``features`` (the pooled body features, for interpret and
    clean) and ``evidence`` (the heat maps' per-class evidence, ``inference.evidence``). ``check`` runs
    the export once on onnxruntime and refuses a file whose probabilities differ from torch's by more
    than 1e-4, or whose features or evidence maps differ by more than 1e-3 (relative).
    """
    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path.with_suffix(".onnx")
    if out.resolve() == model_path.resolve():
        raise ModelFileError(f"{out}: the ONNX file would overwrite the model file; choose another --out")
    model, meta = load_model(model_path)
    try:
        proto = export_two_outputs(model, meta.input_size, opset)
    except ImportError:  # pragma: no cover - declared dependency
        raise ModelFileError("the onnx package is not installed: pip install onnx onnxruntime") from None
    set_props(proto, onnx_props(meta))
    proto.producer_name, proto.producer_version = "ursa", __version__
    # protobuf strings are UTF-8: a class name that is not (its raw bytes) is shown escaped; the metadata keeps it whole
    proto.doc_string = printable(f"ursa {meta.arch} classifier: {', '.join(meta.classes)}")
    data = proto.SerializeToString()
    if check:
        check_onnx(data, model, meta.input_size)
    atomic_write_bytes(out, data)  # a full disk: one NoSpaceError line, no partial file
    return out


def write_onnx_beside(model_path: str | Path) -> Path | None:
    """MODEL.onnx beside a freshly written model file, for `ursa train`; never fails the run (None and a warning)."""
    try:
        return export_onnx(model_path)
    except Exception as e:  # noqa: BLE001 - the model file is the run's result; the ONNX file is a bonus
        log.warning("%s: no ONNX file written beside it (%s: %s); `ursa export %s --onnx` retries",
                    model_path, type(e).__name__, e, model_path)
        return None


def check_onnx(graph: bytes | str, model: Classifier, size: int, tol: float = 1e-4, feature_tol: float = 1e-3) -> float:
    """Same probabilities (and body features, when the graph has them) from onnxruntime as from torch, or a
    ModelFileError; the largest probability difference."""
    sess = ort_session(graph, threads=1)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f = model.features(x)
        want = model.head(f).softmax(1)
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    got = torch.from_numpy(outs[0]).softmax(1)
    err = float((want - got).abs().max())
    if err > tol:
        raise ModelFileError(f"ONNX export differs from torch by {err:.2g} in probability; not written")
    if len(outs) > 1:
        got_f = torch.from_numpy(outs[1])
        if got_f.shape != f.shape or not torch.allclose(got_f, f, atol=feature_tol, rtol=feature_tol):
            ferr = float((got_f - f).abs().max()) if got_f.shape == f.shape else float("inf")
            raise ModelFileError(f"ONNX export's body features differ from torch's by {ferr:.2g}; not written")
    if len(outs) > 2:
        check_evidence(outs[2], model, x, feature_tol)
    return err


def check_evidence(got: Any, model: Classifier, x: torch.Tensor, tol: float) -> None:
    """The graph's evidence maps against torch's (``evidence.evidence``), relative to the largest value; a ModelFileError."""
    from ursa.inference.evidence import evidence

    want = evidence(model, x)[1]
    got_m = torch.from_numpy(got)
    scale = float(want.abs().max()) or 1.0
    err = float((got_m - want).abs().max()) / scale if got_m.shape == want.shape else float("inf")
    if err > tol:
        raise ModelFileError(f"ONNX export's evidence maps differ from torch's by {err:.2g} (relative); not written")
