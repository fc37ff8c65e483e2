"""The open-world parts of a model file, fitted once at the end of a run (``run.write_run`` calls ``fit_open_world``).

The unknown-detection reference needs the final model's body features of the training images:
one pass of the final model over them with the evaluation transform, as the validation images and
every picture sent later are seen (the feature cache holds augmented views of a body that
fine-tuning may have changed since; benchmarks/openset.py measured the evaluation-transform
reference). The threshold is chosen on the validation features the run
writer already has; the prediction sets' scores come from the same pass's calibrated probabilities.
Fitting never fails a run: on any error the model file is written without them (it then says it
cannot tell) and the console says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console

from ursa.diagnose.openset import MAX_REFERENCE, fit_conformal, fit_unknown, open_world_insight, unknown_summary
from ursa.inference.openset import CANNOT_TELL, UnknownDetector
from ursa.training.learner import Learner
from ursa.vision.data import ImageDataset


def training_features(learn: Learner, ds: ImageDataset) -> tuple[np.ndarray, str]:
    """The final model's pooled body features of the training images (evaluation transform), and where they came from."""
    idx = list(ds.train_idx)
    if len(idx) > MAX_REFERENCE:  # the reference keeps at most this many: run only those (evenly spaced, deterministic)
        idx = [idx[i] for i in np.linspace(0, len(idx) - 1, MAX_REFERENCE).round().astype(int)]
    _, y, feats = learn.get_logits(idx, features=True)
    assert feats is not None
    keep = (y >= 0).numpy()  # an image that changed or vanished since the scan has a negative label: not a reference
    return feats.numpy()[keep], "the final model over the training images (evaluation transform)"


def fit_open_world(learn: Learner, ds: ImageDataset, keep: float, valid_feats: np.ndarray | None,
                   valid_probs: np.ndarray | None, valid_y: np.ndarray | None,
                   console: Console) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """ModelMeta fields ``openset`` and ``conformal`` (each empty when it could not be fitted), and the report's section."""
    out: dict[str, Any] = {"openset": {}, "conformal": {}}
    det: UnknownDetector | None = None
    note = CANNOT_TELL
    if valid_probs is not None and valid_y is not None and len(valid_y):
        out["conformal"] = fit_conformal(valid_probs, valid_y).to_meta()
    try:
        if valid_feats is None or len(ds.train_idx) == 0:
            raise RuntimeError("no validation features")
        feats, source = training_features(learn, ds)
        det = fit_unknown(feats, valid_feats, keep, source=source)
        if valid_probs is not None and len(valid_probs):  # serve's drift line compares its answers with these
            answered = np.bincount(np.asarray(valid_probs).argmax(1), minlength=len(ds.classes)) / len(valid_probs)
            det.figures["valid_mix"] = {c: float(v) for c, v in zip(ds.classes, answered)}
        out["openset"] = det.to_meta()
        console.print(unknown_summary(det), highlight=False)
    except Exception as e:  # noqa: BLE001 - the model file matters more; it then says it cannot tell
        det, note = None, f"not fitted: {type(e).__name__}: {e}"
        console.print(f"[yellow]warning:[/] no unknown detection in the model file: {type(e).__name__}: {e}", highlight=False)
    insight = None
    if valid_probs is not None and valid_y is not None:
        insight = open_world_insight(valid_probs, valid_y, ds.classes, None, det, None if det else note)
    return out, insight
