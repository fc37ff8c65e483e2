"""The lesson's verbs from ``import ursa``, for a notebook (fastai's names; pictures inline).

``ImageDataLoaders`` (data), ``vision_learner`` (learner), ``ClassificationInterpretation``
(interpret), ``ImageClassifierCleaner`` (cleaner, needs the ``notebook`` extra: ipywidgets),
``load_learner`` (the inference predictor, as ``ursa predict`` loads it). A thin layer over the
stages; ``ursa/__init__.py`` exports these names lazily, so ``import ursa`` stays light.
"""

from ursa.notebook.data import ImageDataLoaders
from ursa.notebook.interpret import ClassificationInterpretation
from ursa.notebook.learner import SuggestedLR, VisionLearner, vision_learner
from ursa.notebook.pictures import Picture
from ursa.predict import load_learner

__all__ = ["ClassificationInterpretation", "ImageDataLoaders", "Picture", "SuggestedLR", "VisionLearner",
           "load_learner", "vision_learner"]
