"""``ursa.ClassificationInterpretation``: fastai's interpretation of the validation set, with pictures inline.

The numbers are ``ursa.diagnose.interpret.Interpretation``'s (the report's), the pictures
``ursa.diagnose.plots``' (the run folder's confusion_matrix.png and top_losses.png), shown inline.
"""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np

from ursa.diagnose.interpret import Interpretation
from ursa.diagnose.plots import confusion_figure, top_losses_figure
from ursa.errors import ImageError
from ursa.notebook.pictures import Picture, show
from ursa.vision.images import open_image

THUMB = 224  # the long side of a top-loss picture's image


class ClassificationInterpretation:
    """The confusion matrix, the most confused pairs and the top losses of a learner's validation set."""

    def __init__(self, interp: Interpretation) -> None:
        self.interp = interp

    @classmethod
    def from_learner(cls, learn: Any) -> "ClassificationInterpretation":
        """One pass of the learner's model over its validation images (``vision_learner``'s or a training Learner)."""
        learner = getattr(learn, "learner", learn)
        ds = learner.dls.dataset
        probs, y = learner.get_preds()
        idx = ds.valid_idx
        return cls(Interpretation(list(ds.classes), [ds.rel(i) for i in idx], [ds.files[i] for i in idx],
                                  y.numpy(), probs.numpy(), "valid", list(ds.skipped)))

    @property
    def error_rate(self) -> float:
        return self.interp.error_rate

    def confusion_matrix(self) -> np.ndarray:
        """counts[actual, predicted]."""
        return self.interp.confusion_matrix()

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        """(actual, predicted, count), most first."""
        return self.interp.most_confused(min_val)

    def top_losses(self, k: int | None = None) -> list[tuple[str, str, str, float, float]]:
        """(file, actual, predicted, loss, probability of the prediction), highest loss first."""
        return self.interp.top_losses(k)

    def confusion_picture(self) -> Picture:
        return Picture.from_figure(confusion_figure(self.confusion_matrix(), self.interp.classes), "confusion matrix")

    def top_losses_picture(self, k: int = 9, ncols: int = 3) -> Picture:
        images, titles = [], []
        for i, (_, actual, pred, loss, prob) in zip(self.interp.top_loss_indices(k), self.top_losses(k)):
            try:
                images.append(open_image(self.interp.paths[i], max_side=THUMB))
            except ImageError:
                continue  # gone or damaged since the pass: the others still show
            titles.append(f"{pred}/{actual}\n{loss:.2f} / {prob:.2f}")
        return Picture.from_figure(top_losses_figure(images, titles, ncols), "top losses")

    def plot_confusion_matrix(self) -> Any:
        """The confusion matrix, inline (actual down the side, predicted along the bottom)."""
        return show(self.confusion_picture())

    def plot_top_losses(self, k: int = 9, ncols: int = 3) -> Any:
        """The k images the model is most wrong about, titled predicted/actual, loss / probability, inline."""
        return show(self.top_losses_picture(k, ncols))

    def _repr_html_(self) -> str:
        cm, classes = self.confusion_matrix(), self.interp.classes
        head = "<tr><th>actual \\ predicted</th>" + "".join(f"<th>{escape(c)}</th>" for c in classes) + "</tr>"
        body = "".join(f"<tr><th>{escape(c)}</th>" + "".join(f"<td>{int(v)}</td>" for v in cm[i]) + "</tr>"
                       for i, c in enumerate(classes))
        return (f"<div>error rate {self.error_rate:.4f} on {len(self.interp)} validation images"
                f"<table>{head}{body}</table></div>")

    def __repr__(self) -> str:
        return f"ClassificationInterpretation({len(self.interp)} images, error rate {self.error_rate:.4f})"
