"""Inference: the model file, its ONNX export and the predictor; the names users and later layers import.

The submodules never import this package's names (``from ursa.inference import ...``), only each
other by full module path, so importing any one of them cannot cycle back through here.
"""

from ursa.inference.export import export_onnx
from ursa.inference.modelfile import ModelMeta, load_model, read_meta, save_model
from ursa.inference.predictor import Prediction, Predictor, load_learner, load_predictor

__all__ = [
    "ModelMeta",
    "Prediction",
    "Predictor",
    "export_onnx",
    "load_learner",
    "load_model",
    "load_predictor",
    "read_meta",
    "save_model",
]
