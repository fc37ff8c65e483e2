"""What the learner optimises and measures, chosen once from the dataset: one class per picture, or a set of labels.

``SingleLabel``: cross-entropy, softmax, error rate and accuracy (the lesson's). ``MultiLabel``
(``ursa train --multi-label``): binary cross-entropy with logits against the multi-hot targets
(``vision.labelsets.multi_hot``), a sigmoid per label, and as the loop's ``error_rate`` one minus the
macro F1 at threshold 0.5 (so the best epoch, the fine-tuning decision and the rules use a
multi-label figure), as its ``accuracy`` fastai's ``accuracy_multi`` at 0.5, and three more columns
in the epoch table and history.csv: ``macro_f1``, ``samples_f1`` and ``map``. The per-label
thresholds are chosen once, at the end, by the run writer (``diagnose.multilabel``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ursa.diagnose.calibration import calibrate, reliability, softmax
from ursa.diagnose.insight_plots import plot_reliability
from ursa.diagnose.multilabel import DEFAULT, as_binary, calibrate_labels, label_figures
from ursa.inference.task import MULTI_LABEL, SINGLE_LABEL, sigmoid
from ursa.training.balance import balanced_loss
from ursa.training.sources import metrics_from_probs
from ursa.vision.data import ImageDataset
from ursa.vision.labelsets import multi_hot


@dataclass(frozen=True)
class SingleLabel:
    """One class per picture."""

    name: str = SINGLE_LABEL
    columns: tuple[str, ...] = ()  # columns beyond valid_loss, error_rate, accuracy, balanced_error
    balanced: bool = True  # the epoch table shows the balanced error (diagnose.recall)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, config: Any) -> torch.Tensor:
        """Cross-entropy with the config's label smoothing and lopsided-classes remedy (``training.balance``)."""
        return balanced_loss(logits, y, config)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)

    def metrics(self, probs: torch.Tensor, y: torch.Tensor) -> tuple[float, ...]:
        return metrics_from_probs(probs, y)

    def correct(self, probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Which pictures the answer gets right (an unreadable one, label < 0, never)."""
        return probs.argmax(1) == y

    def calibrate(self, logits: np.ndarray, y: np.ndarray, classes: Sequence[str], target_precision: float,
                  picture: Path) -> Any:
        """Temperature scaling and the unsure threshold (``diagnose.calibration``), and reliability.png."""
        cal = calibrate(logits, y, target_precision)
        plot_reliability(reliability(softmax(logits), y), reliability(softmax(logits, cal.temperature), y),
                         cal.ece_before, cal.ece_after, cal.temperature, picture)
        return cal

    def calibrated(self, logits: np.ndarray, cal: Any) -> np.ndarray:
        """What predict will say: the calibrated softmax."""
        return softmax(logits, cal.temperature if cal else 1.0)

    def thresholds(self, cal: Any) -> list[float]:
        """The model file's ``thresholds``: none for one class per picture."""
        return []


@dataclass(frozen=True)
class MultiLabel:
    """A set of labels per picture (labels encoded by ``vision.labelsets.encode``)."""

    n_labels: int
    name: str = MULTI_LABEL
    columns: tuple[str, ...] = ("macro_f1", "samples_f1", "map")
    balanced: bool = False  # macro F1 already weighs every label the same; the balanced_error column holds NaN

    def loss(self, logits: torch.Tensor, y: torch.Tensor, config: Any = None) -> torch.Tensor:
        """Binary cross-entropy with logits (label smoothing and --balance do not apply to label sets)."""
        return F.binary_cross_entropy_with_logits(logits, multi_hot(y, self.n_labels))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def metrics(self, probs: torch.Tensor, y: torch.Tensor) -> tuple[float, ...]:
        """valid_loss (BCE), 1 - macro F1, accuracy_multi, (no balanced error), macro F1, sample F1, mAP; at 0.5."""
        keep = y >= 0
        probs, y = probs[keep], y[keep]
        if len(y) == 0:
            return (math.nan,) * 7
        t = multi_hot(y, self.n_labels)
        loss = F.binary_cross_entropy(probs.float().clamp(1e-7, 1 - 1e-7), t).item()
        f = label_figures(probs.float().numpy(), t.numpy(), [str(k) for k in range(self.n_labels)],
                          [DEFAULT] * self.n_labels)
        return loss, 1.0 - f.macro_f1, f.accuracy_multi, math.nan, f.macro_f1, f.samples_f1, f.mean_ap

    def correct(self, probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Which pictures get their whole label set right at 0.5 (an unreadable one never)."""
        return ((probs >= DEFAULT).float() == multi_hot(y, self.n_labels)).all(1) & (y >= 0)

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Encoded label sets -> multi-hot 0/1 [N, K] (numpy)."""
        return multi_hot(torch.as_tensor(np.asarray(y), dtype=torch.long), self.n_labels).numpy()

    def calibrate(self, logits: np.ndarray, y: np.ndarray, classes: Sequence[str], target_precision: float,
                  picture: Path) -> Any:
        """One temperature, each label's threshold (``diagnose.multilabel``), and reliability.png over every decision."""
        t = self.targets(y)
        cal = calibrate_labels(logits, t, classes)
        before, after = sigmoid(logits), sigmoid(logits, cal.temperature)
        plot_reliability(reliability(*as_binary(before, t)), reliability(*as_binary(after, t)), cal.ece_before,
                         cal.ece_after, cal.temperature, picture)
        return cal

    def calibrated(self, logits: np.ndarray, cal: Any) -> np.ndarray:
        """What predict will say: a calibrated sigmoid per label."""
        return sigmoid(logits, cal.temperature if cal else 1.0)

    def thresholds(self, cal: Any) -> list[float]:
        """The model file's ``thresholds``: each label's, chosen on the validation images (0.5 each without)."""
        return list(cal.thresholds) if cal is not None else [DEFAULT] * self.n_labels


def task_for(ds: ImageDataset | None) -> SingleLabel | MultiLabel:
    """The dataset's task: label sets when it was read with --multi-label (no dataset: one class per picture)."""
    return MultiLabel(len(ds.classes)) if getattr(ds, "multi_label", False) else SingleLabel()
