"""Cleaning a multi-label dataset: likely label errors by cleanlab's multi-label methods, decisions that add or
remove one label.

The model's pass is ``ursa interpret``'s (``diagnose.interpret.interpret_model`` over every image):
calibrated sigmoids and pooled body features. Confident learning needs probabilities from a model that
never saw the image: one logistic regression per label on the L2-normalised features, out of fold
(``FOLDS``), as the one-label cleaner does with its multinomial one (``ranking.out_of_fold_probs``).
cleanlab (``cleanlab.multilabel_classification``) then scores each image's label set
(``get_label_quality_scores``, lower: more likely wrong) and flags the likely errors
(``filter.find_label_issues``). Each image's suggestion is the one label the out-of-fold
probabilities disagree with most: "remove X" (given, improbable) or "add X" (not given, probable).

Decisions go through ``Decisions`` (``clean_log.csv`` appended and fsynced, ``cleaned.csv`` rebuilt
from it), a relabel giving the image's whole new set as its label cell: ``LabelSetDecisions.add`` and
``remove`` change one label; ``ursa train DATA --csv DATA/cleaned.csv --multi-label`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ursa.apps.clean.decisions import Decisions
from ursa.apps.clean.ranking import FOLDS, l2_normalise
from ursa.util.files import atomic_write_csv

METHOD = "cleanlab multi-label (find_label_issues, self_confidence) on out-of-fold per-label logistic regressions"


def out_of_fold_label_probs(emb: np.ndarray, targets: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each image's per-label probabilities from logistic regressions that never saw it (a label present in every
    training fold's images, or in none, gets that constant)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    x, t = l2_normalise(emb), np.asarray(targets, dtype=np.int64)
    out = np.zeros(t.shape, dtype=np.float64)
    k = int(min(folds, len(x)))
    for tr, te in KFold(k, shuffle=True, random_state=seed).split(x):
        for j in range(t.shape[1]):
            y = t[tr, j]
            if y.min() == y.max():
                out[te, j] = float(y[0])
                continue
            clf = LogisticRegression(C=1.0, max_iter=2000, tol=1e-3).fit(x[tr], y)
            out[te, j] = clf.predict_proba(x[te])[:, 1]
    return np.clip(out, 1e-4, 1 - 1e-4)


@dataclass
class LabelIssues:
    """The multi-label cleaner's ranking: every image's quality, the likely errors, one suggestion each."""

    names: list[str]
    classes: list[str]
    targets: np.ndarray  # [N, K] 0/1 as labelled
    oof: np.ndarray  # [N, K] out-of-fold probabilities
    quality: np.ndarray  # [N] cleanlab's label quality (lower: more likely wrong)
    issues: list[int]  # likely label errors, most likely first
    method: str = METHOD

    def suggestion(self, i: int) -> tuple[str, str, float]:
        """("add" or "remove", the label, its out-of-fold probability): the one label to change on image i."""
        gap = np.abs(self.targets[i] - self.oof[i])
        j = int(np.argmax(gap))
        return ("remove" if self.targets[i, j] else "add"), self.classes[j], float(self.oof[i, j])

    def write_csv(self, path: Path, delim: str = " ") -> Path:
        """label_issues.csv: the likely errors first, then every other image by quality."""
        rest = [i for i in np.argsort(self.quality, kind="stable") if i not in set(self.issues)]
        rows = []
        for i in [*self.issues, *rest]:
            action, label, p = self.suggestion(i)
            given = delim.join(c for c, v in zip(self.classes, self.targets[i]) if v)
            rows.append([self.names[i], given, f"{self.quality[i]:.5f}", str(i in self.issues), action, label, f"{p:.4f}"])
        return atomic_write_csv(path, ["name", "labels", "quality", "likely_error", "suggest", "label", "prob"], rows)


def find_label_set_issues(names: Sequence[str], classes: Sequence[str], targets: np.ndarray,
                          emb: np.ndarray) -> LabelIssues:
    """Out-of-fold probabilities, then cleanlab's multi-label quality scores and issues."""
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues

    t = np.asarray(targets, dtype=np.int64)
    oof = out_of_fold_label_probs(emb, t)
    labels = [list(np.flatnonzero(row)) for row in t]
    quality = get_label_quality_scores(labels, oof)
    try:
        issues = [int(i) for i in find_label_issues(labels, oof, return_indices_ranked_by="self_confidence")]
    except ValueError:  # too few images of a label for cleanlab's per-label noise estimate: quality alone
        issues = []
    return LabelIssues(list(names), list(classes), t, oof, np.asarray(quality, dtype=np.float64), issues)


class LabelSetDecisions(Decisions):
    """``Decisions`` whose labels are label sets (``delim`` between labels): relabel to any set of the classes."""

    def __init__(self, root: Path, names: Sequence[str], labels: Sequence[str], classes: Sequence[str],
                 delim: str = " ") -> None:
        super().__init__(root, names, labels, classes)
        self.delim = delim

    def parts(self, label: str) -> list[str]:
        from ursa.vision.labelsets import split_labels

        return split_labels(label, self.delim)

    def is_label(self, label: str) -> bool:
        """Any set of the classes, the empty set included."""
        return all(c in self.classes for c in self.parts(label))

    def _changed(self, name: str, label: str, present: bool) -> dict[str, Any]:
        now = self.label_of(name)
        have = self.parts(now if now is not None else self.labels[name])
        want = [c for c in self.classes if (c in have and c != label) or (c == label and present)]
        return self.decide(name, "relabel", self.delim.join(want))

    def add(self, name: str, label: str) -> dict[str, Any]:
        """Give image ``name`` the label too (logged, then cleaned.csv rewritten)."""
        if label not in self.classes:
            raise ValueError(f"unknown label {label!r}; one of {', '.join(self.classes)}")
        return self._changed(name, label, True)

    def remove(self, name: str, label: str) -> dict[str, Any]:
        """Take the label off image ``name`` (logged, then cleaned.csv rewritten)."""
        if label not in self.classes:
            raise ValueError(f"unknown label {label!r}; one of {', '.join(self.classes)}")
        return self._changed(name, label, False)


def clean_label_sets(data: Path, model: Path, csv_path: Path | None, device: str = "auto",
                     say: Any = None) -> tuple[LabelIssues, Any]:
    """The model's pass over every image (``interpret_model``), then ``find_label_set_issues``; and the pass."""
    from ursa.diagnose.interpret import interpret_model
    from ursa.diagnose.label_report import multi_hot

    interp = interpret_model(model, data, all_images=True, csv_path=csv_path, device=device, say=say)
    if interp.features is None:
        raise RuntimeError("the model pass gave no body features")
    targets = multi_hot(interp.targets, len(interp.classes))
    return find_label_set_issues(interp.files, interp.classes, targets, interp.features), interp
