"""ursa: build your own image classifier from your own pictures, offline, on a laptop CPU.

From Python (a notebook: docs/notebook.md), fastai's names::

    import ursa
    dls = ursa.ImageDataLoaders.from_folder("bears")
    learn = ursa.vision_learner(dls)
    learn.fine_tune()

The names load lazily (``__getattr__``): ``import ursa`` imports nothing else, so the slim install
(no torch) and the CLI's start-up stay as they were.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# name -> the module that defines it (imported on first use)
_LAZY = {
    "ImageDataLoaders": "ursa.notebook.data",
    "vision_learner": "ursa.notebook.learner",
    "VisionLearner": "ursa.notebook.learner",
    "ClassificationInterpretation": "ursa.notebook.interpret",
    "ImageClassifierCleaner": "ursa.notebook.cleaner",
    "load_learner": "ursa.predict",
    "Prediction": "ursa.inference.results",
}

__all__ = ["__version__", *_LAZY]


# What a missing package means: the extra that brings it (pip install 'ursa[EXTRA]').
_EXTRAS = {"ipywidgets": "notebook", "torch": "train", "torchvision": "train", "timm": "train",
           "safetensors": "train", "matplotlib": "train"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:
            extra = _EXTRAS.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            raise ModuleNotFoundError(f"ursa.{name} needs the {extra!r} extra (no module {e.name!r} here): "
                                      f"pip install 'ursa[{extra}]'", name=e.name) from None
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ursa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
