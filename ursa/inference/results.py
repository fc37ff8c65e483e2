"""One image's answer, torch-free: shared by the torch predictor and the ONNX runtime so both return the same thing."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ursa.errors import ModelOutputError, UrsaError
from ursa.util.numbers import softmax

__all__ = ["BACKENDS", "Prediction", "check_backend", "check_threshold", "softmax"]  # softmax: util.numbers' one


@dataclass
class Prediction:
    """One image's answer: label, its index, every class's probability, whether it is below the unsure threshold,
    and whether it looks like none of the classes (``unknown``; None: the model cannot tell, ``note`` says why)."""

    label: str
    index: int
    probs: dict[str, float]
    unsure: bool = False
    threshold: float | None = None  # the threshold the answer was judged by (None: none)
    unknown: bool | None = None  # unlike the training images (inference.openset); None: cannot tell
    unknown_score: float | None = None  # higher: less like the training images
    unknown_threshold: float | None = None
    note: str | None = None  # why unknown is None
    labels: list[str] | None = None  # the prediction set, when one was asked for (--set)
    level: float | None = None  # its coverage level
    chosen: list[str] | None = None  # a multi-label model's answer: the labels at or above their thresholds

    def __post_init__(self) -> None:
        """A NaN or infinite probability is never an answer (nor bare NaN in JSON): the model itself is damaged."""
        if not all(math.isfinite(p) for p in self.probs.values()):
            raise ModelOutputError("the model gave probabilities that are not finite numbers (NaN or infinity): "
                                   "its weights are damaged; train or export it again")

    def as_tuple(self) -> tuple[str, int, dict[str, float]]:
        """fastai's (label, index, probs) shape."""
        return self.label, self.index, self.probs

    @property
    def confidence(self) -> float:
        """The probability of the predicted class."""
        return self.probs[self.label]

    def with_threshold(self, threshold: float | None) -> "Prediction":
        """The same answer judged by another threshold (a per-request setting); None: never unsure."""
        check_threshold(threshold)
        unsure = threshold is not None and self.confidence < threshold
        return replace(self, unsure=unsure, threshold=threshold)

    def with_unknown(self, threshold: float | None, note: str | None = None) -> "Prediction":
        """The same answer judged unknown (score above ``threshold``) or not; None: cannot tell (``note``: why)."""
        if threshold is None or self.unknown_score is None:
            return replace(self, unknown=None, unknown_threshold=None, note=note)
        return replace(self, unknown=bool(self.unknown_score > threshold), unknown_threshold=float(threshold), note=None)

    def with_set(self, labels: list[str], level: float) -> "Prediction":
        """The same answer with its prediction set."""
        return replace(self, labels=list(labels), level=float(level))

    @property
    def shown(self) -> str:
        """The console's and the page's words: the label (a multi-label model's set), or "none of these (closest: ...)"."""
        words = self.label if self.chosen is None else (" ".join(self.chosen) or "(no label)")
        return f"none of these (closest: {words})" if self.unknown else words

    @property
    def answer_text(self) -> str:
        """The console's answer: "LABEL (0.973)", or a multi-label model's set "red (0.973), blue (0.819)" / "no label"."""
        if self.chosen is None:
            return f"{self.label} ({self.confidence:.3f})"
        return ", ".join(f"{c} ({self.probs[c]:.3f})" for c in self.chosen) or "no label"

    def _repr_html_(self) -> str:
        """In a notebook: the label (and whether it is unsure), then one bar per class, most likely first."""
        from html import escape

        rows = "".join(
            f"<tr><td>{escape(c)}</td><td><div style='background:#4c78a8;height:0.8em;width:{100 * p:.0f}px'></div>"
            f"</td><td>{p:.3f}</td></tr>" for c, p in sorted(self.probs.items(), key=lambda kv: -kv[1]))
        head = f"<b>{escape(self.label)}</b> ({self.confidence:.3f})" + (
            f" <i>unsure: below {self.threshold:.2f}</i>" if self.unsure and self.threshold is not None else "")
        return f"<div>{head}<table>{rows}</table></div>"

    def to_json(self) -> dict[str, Any]:
        """What the web API returns for one image (fields are only ever added, never renamed)."""
        out = {"label": self.label, "index": self.index, "probs": self.probs, "unsure": self.unsure,
               "threshold": self.threshold, "unknown": self.unknown, "unknown_score": self.unknown_score,
               "unknown_threshold": self.unknown_threshold}
        if self.note:
            out["note"] = self.note
        if self.labels is not None:
            out["set"], out["set_level"] = self.labels, self.level
        if self.chosen is not None:  # multi-label: the set of labels, each with its probability
            out["labels"] = [{"label": c, "prob": self.probs[c]} for c in self.chosen]
        return out


def check_threshold(threshold: float | None) -> float | None:
    """An unsure threshold must be a probability; one clear line otherwise."""
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
        raise UrsaError(f"unsure threshold: expected a probability from 0 to 1, got {threshold!r}")
    return None if threshold is None else float(threshold)


BACKENDS = ("auto", "torch", "onnx")


def check_backend(name: str) -> str:
    """The one check of a backend name (CLI, serve, load_predictor and the runtime alike): torch-free, one line."""
    if name not in BACKENDS:
        raise UrsaError(f"--backend must be one of {', '.join(BACKENDS)} (got {name!r})")
    return name
