"""Inference: the model file, its ONNX export and the predictor; the names users and later layers import.

The submodules never import this package's names (``from ursa.inference import ...``), only each
other by full module path, so importing any one of them cannot cycle back through here. The names
below are loaded on first use (PEP 562), so ``import ursa.inference.runtime`` (the torch-free
ONNX path) never pulls torch in through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ModelMeta": "ursa.inference.metaschema",
    "Prediction": "ursa.inference.predictor",
    "Predictor": "ursa.inference.predictor",
    "OnnxPredictor": "ursa.inference.runtime",
    "Placement": "ursa.inference.placement",
    "export_onnx": "ursa.inference.export",
    "load_learner": "ursa.inference.predictor",
    "load_model": "ursa.inference.modelfile",
    "load_onnx": "ursa.inference.runtime",
    "load_predictor": "ursa.inference.predictor",
    "place": "ursa.inference.placement",
    "read_meta": "ursa.inference.modelfile",
    "save_model": "ursa.inference.modelfile",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'ursa.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
