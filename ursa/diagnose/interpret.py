"""Reading a model's mistakes: fastai's ClassificationInterpretation on a set of images.

Predictions on the validation set (or every image, as the lesson does before cleaning), then the
confusion matrix (rows: actual, columns: predicted), ``most_confused``, precision and recall per
class, and the top losses: the images the model is most wrong, or least sure, about.

Which images are "the validation set" for a model file: the ``split.csv`` that ``ursa train``
wrote beside it (the exact assignment used in training) when present; otherwise the split is
recomputed from DATA with the validation share and split seed the run used (its config, stored
in the model file's metadata), which gives the same assignment for the same files because the
split hashes each file's relative path. Unreadable images are skipped, counted and listed, never fatal.
With ``tta=True`` the probabilities are averaged over the mirrors the model was trained with
(``inference.tta``); the features for the embedding map stay the plain view's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ursa.diagnose.recall import balanced_error
from ursa.errors import DataError

log = logging.getLogger("ursa")


@dataclass
class Interpretation:
    """Probabilities and targets for a set of images, and what they say about the model."""

    classes: list[str]
    files: list[str]  # names shown to people (relative to the data folder)
    paths: list[Path]  # where to read each image (thumbnails)
    targets: np.ndarray  # [n] actual class index
    probs: np.ndarray  # [n, n_classes]
    split: str = "valid"  # "valid" or "all"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    features: np.ndarray | None = None  # [n, d] pooled body features, when known: the report's embedding map
    backend: str = ""  # what ran the model, e.g. "ONNX Runtime (model.onnx is current)"; "" when not recorded
    tta: str = ""  # the test-time views averaged, e.g. "2 views (original, horizontal mirror)"; "" without TTA
    device: str = ""  # where the model ran, e.g. "device: cpu (2 threads)"; "" when not recorded
    open_world: dict[str, Any] | None = None  # unknown scores and prediction sets on these images (diagnose.openset)
    thresholds: list[float] | None = None  # a multi-label model's: targets are label sets (vision.labelsets.encode)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64).reshape(-1)
        self.probs = np.asarray(self.probs, dtype=np.float64).reshape(len(self.targets), len(self.classes))
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32).reshape(len(self.targets), -1)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def preds(self) -> np.ndarray:
        """Predicted class index of each image."""
        return self.probs.argmax(1) if len(self) else np.zeros(0, dtype=np.int64)

    @property
    def losses(self) -> np.ndarray:
        """Cross-entropy of each image: -log p(actual class)."""
        if not len(self):
            return np.zeros(0)
        p = self.probs[np.arange(len(self)), self.targets]
        return -np.log(np.clip(p, 1e-12, 1.0))

    @property
    def error_rate(self) -> float:
        """Share of images whose predicted class is not the actual one."""
        return float((self.preds != self.targets).mean()) if len(self) else math.nan

    def confusion_matrix(self) -> np.ndarray:
        """counts[actual, predicted]."""
        n = len(self.classes)
        cm = np.zeros((n, n), dtype=np.int64)
        np.add.at(cm, (self.targets, self.preds), 1)
        return cm

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        """(actual, predicted, count) for off-diagonal cells with at least min_val, most first."""
        cm = self.confusion_matrix()
        out = [(self.classes[i], self.classes[j], int(cm[i, j]))
               for i in range(len(self.classes)) for j in range(len(self.classes))
               if i != j and cm[i, j] >= min_val]
        return sorted(out, key=lambda t: (-t[2], t[0], t[1]))

    @property
    def balanced_error(self) -> float:
        """One minus the mean recall over the classes with images here (diagnose/recall.py): lopsided classes show."""
        return balanced_error(self.preds, self.targets, len(self.classes)) if len(self) else math.nan

    def per_class(self) -> dict[str, dict[str, float | int]]:
        """Precision (of the class's predictions, how many were right) and recall (of its images, how many found)."""
        cm = self.confusion_matrix()
        out = {}
        for i, c in enumerate(self.classes):
            tp, predicted, actual = int(cm[i, i]), int(cm[:, i].sum()), int(cm[i, :].sum())
            out[c] = {
                "precision": tp / predicted if predicted else 0.0,
                "recall": tp / actual if actual else 0.0,
                "support": actual,
            }
        return out

    def top_losses(self, k: int | None = None) -> list[tuple[str, str, str, float, float]]:
        """(file, actual, predicted, loss, probability of the prediction), highest loss first."""
        order = np.argsort(-self.losses, kind="stable")[: k if k is not None else len(self)]
        preds, losses = self.preds, self.losses
        return [(self.files[i], self.classes[self.targets[i]], self.classes[preds[i]], float(losses[i]),
                 float(self.probs[i, preds[i]])) for i in order]

    def top_loss_indices(self, k: int) -> list[int]:
        """Item indices of the k highest losses (to find their images)."""
        return [int(i) for i in np.argsort(-self.losses, kind="stable")[:k]]

    def confusion_text(self) -> str:
        """The confusion matrix as an aligned text table (actual down, predicted across)."""
        cm = self.confusion_matrix()
        w = max(6, *(len(c) for c in self.classes), len(str(int(cm.max()) if cm.size else 0)))
        head = " " * w + " | " + " ".join(f"{c:>{w}}" for c in self.classes) + "   <- predicted"
        lines = [head, "-" * len(head)]
        for i, c in enumerate(self.classes):
            lines.append(f"{c:>{w}} | " + " ".join(f"{int(v):>{w}}" for v in cm[i]))
        lines.append("(rows: actual)")
        return "\n".join(lines)

    def to_json(self, k: int | None = None) -> dict:
        """report.json's interpretation keys (top_losses: k highest, default every item)."""
        return {
            "classes": list(self.classes),
            "split": self.split,
            "n_items": len(self),
            "error_rate": self.error_rate if len(self) else None,
            "balanced_error": self.balanced_error if len(self) else None,
            "confusion_matrix": self.confusion_matrix().tolist(),
            "most_confused": [list(t) for t in self.most_confused()],
            "per_class": self.per_class(),
            "top_losses": [list(t) for t in self.top_losses(k)],
            "skipped": [list(s) for s in self.skipped],
        }


def load_items(model_path: str | Path, data: str | Path, classes: Sequence[str], all_images: bool = False,
               csv_path: str | Path | None = None,
               config: dict | None = None) -> tuple[list[tuple[str, Path, int]], str, list[tuple[str, str]]]:
    """(name, path, class index) of the images to interpret, which split that is, and items left out."""
    from ursa.vision.data import dedupe_setting, read_split, split_settings

    from ursa.vision.labelsets import encode, load_labelled, split_labels

    data = Path(data)
    split_csv = Path(model_path).parent / "split.csv"
    index = {c: i for i, c in enumerate(classes)}
    skipped: list[tuple[str, str]] = []
    delim = (config or {}).get("label_delim", " ") if (config or {}).get("multi_label") else None

    def target(labels: list[str]) -> int:  # a class index, or (multi-label) the encoded label set
        return encode(index[c] for c in labels) if delim is not None else index[labels[0]]

    if not all_images and csv_path is None and split_csv.is_file():
        rows = read_split(split_csv)
        items = []
        for name, label, is_valid in rows:
            if not is_valid:
                continue
            labels = split_labels(label, delim) if delim is not None else [label]
            bad = [c for c in labels if c not in index]
            if bad:
                raise DataError(f"{split_csv}: label {bad[0]!r} is not a class of the model ({', '.join(classes)})")
            items.append((name, data / name, target(labels)))
        if items and not any(p.is_file() for _, p, _ in items):
            raise DataError(f"{data}: none of the {len(items)} validation images named in {split_csv} are there; "
                            "give the folder the model was trained on, or --all")
        skipped += [(name, "missing: file not found") for name, p, _ in items if not p.is_file()]
        return [it for it in items if it[1].is_file()], "valid", skipped
    valid_pct, seed = split_settings(config)
    ds = load_labelled(data, csv_path, valid_pct, seed, dedupe=dedupe_setting(config), label_delim=delim)
    unknown = sorted(set(ds.classes) - set(classes))
    if unknown:
        raise DataError(f"{data}: class(es) {', '.join(unknown)} are not classes of the model ({', '.join(classes)})")
    idx = range(len(ds)) if all_images else ds.valid_idx
    items = [(ds.rel(i), ds.files[i], target([ds.classes[k] for k in ds.label_indices(i)])) for i in idx]
    return items, "all" if all_images else "valid", skipped


def interpret_model(model_path: str | Path, data: str | Path, all_images: bool = False,
                    csv_path: str | Path | None = None, bs: int = 32,
                    progress: Callable[[int, int], None] | None = None, backend: str = "auto",
                    tta: bool = False, device: str = "auto",
                    say: Callable[[str], None] | None = None) -> Interpretation:
    """Load a model file and predict its validation set (or every image) in batches; bad files are skipped.

    ONNX Runtime runs when a current MODEL.onnx with the body-features output sits beside the model
    (``runtime.current_onnx_with_features``; backend "auto") and can run on ``device``, torch otherwise
    or with backend "torch"; ``Interpretation.backend`` says which. Both give calibrated probabilities
    and pooled features. ``tta``: average over the mirrors the model was trained with
    (``Interpretation.tta`` says which views). ``device``: auto, cpu, cuda, cuda:N or mps (a
    ``DeviceError`` when unknown or absent); ``say`` hears its line once, before the pass
    (``Interpretation.device`` keeps it). The images stream through in batches of ``bs``
    (``runtime.stream_batches``): at most two batches of pixels are held, never the whole set.
    """
    from ursa.errors import ImageError
    from ursa.inference.placement import place
    from ursa.inference.runtime import backend_line, cores, current_onnx_with_features, stream_batches
    from ursa.inference.tta import NO_VIEWS, views_text

    if backend not in ("auto", "torch"):
        raise ValueError(f"interpret_model: backend must be 'auto' or 'torch' (got {backend!r})")
    where = place(device)
    fast, why = (current_onnx_with_features(model_path, tta=tta, device=where) if backend == "auto"
                 else (None, "--backend torch"))
    if fast is not None:
        pred, stack, to_numpy = fast, np.stack, np.asarray
    else:
        import torch

        from ursa.inference.predictor import load_predictor

        pred = load_predictor(model_path, backend="torch", tta=tta, device=where)
        stack, to_numpy = torch.stack, (lambda t: t.numpy())
    if tta and len(pred.views) == 1:
        log.warning(NO_VIEWS)
    items, split, skipped = load_items(model_path, data, pred.classes, all_images, csv_path, pred.meta.config)
    if not items:
        raise DataError(f"{data}: no images to interpret")
    line = pred.device_line()
    if pred.world.refit and split == "valid":  # the weights are --refit's, which trained on the validation images too
        line += ("\nnote: this model was refit on every picture (ursa train --refit), the validation images included: "
                 "its figures here are on pictures it trained on; the run's report.html has the first fit's, on unseen ones")
    if say is not None:  # after the checks of model and data, so their errors stay one line
        say(line)

    def forward(xs: list) -> list[tuple[Any, Any, Any]]:
        p, f = pred.probs_and_features(stack(xs))  # calibrated; features for the embedding map
        p, f = to_numpy(p), (None if f is None else to_numpy(f))
        s = pred.world.scores(f) if f is not None else [None] * len(xs)  # unknown scores (None: cannot tell)
        return [(p[i], None if f is None else f[i], s[i]) for i in range(len(xs))]

    names, paths, targets, probs, feats, scores = [], [], [], [], [], []
    decoders = 0 if where.is_cpu else min(4, cores())  # the CPU decodes between batches, as it always did
    answers = stream_batches(items, bs, lambda item: pred.preprocess(item[1]), forward, decoders)
    for k, ((name, path, target), ans) in enumerate(answers, 1):
        if isinstance(ans, ImageError):
            skipped.append((name, f"{ans.kind}: {ans.reason}"))
        else:
            names.append(name)
            paths.append(path)
            targets.append(target)
            probs.append(ans[0])
            scores.append(ans[2])
            if ans[1] is not None:
                feats.append(ans[1])
        if progress:
            progress(k, len(items))
    if not names:
        raise DataError(f"{data}: none of the {len(items)} images could be read")
    features = np.stack(feats) if len(feats) == len(probs) else None
    from ursa.diagnose.openset import open_world_insight

    multi = pred.task.multi  # label sets: no prediction sets (they are one-class-per-picture figures)
    ow = open_world_insight(np.stack(probs), [] if multi else targets, pred.classes, scores, pred.world.detector,
                            pred.world.why)
    return Interpretation(pred.classes, names, paths, np.array(targets), np.stack(probs), split, skipped, features,
                          backend_line(fast, why), views_text(pred.views) if len(pred.views) > 1 else "", line, ow,
                          list(pred.thresholds) if multi else None)
