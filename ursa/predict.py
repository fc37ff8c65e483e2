"""Kept for users: ``from ursa.predict import load_learner`` keeps working after Structure v2.

New code imports from ``ursa.inference`` (``load_predictor``); this module only re-exports, so
there is one implementation. ``load_learner`` is fastai's name for ``load_predictor``.
"""

from ursa.inference.predictor import Prediction, Predictor, load_learner, load_predictor

__all__ = ["Prediction", "Predictor", "load_learner", "load_predictor"]
