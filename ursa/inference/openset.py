"""Open world at prediction time, torch-free: "none of these" (unknown detection) and prediction sets.

Both are fitted by ``ursa train`` (``diagnose.openset``) and stored in the model metadata, so the
torch ``Predictor``, the ONNX runtime and ``ursa serve`` all score with this one module, from the
pooled body features and calibrated probabilities they already compute.

**Unknown.** ``UnknownDetector.score``: 1 minus the mean cosine similarity of a picture's body
features to its ``k`` nearest training images (higher: less like the training images). The
reference is the training images' L2-normalised features, centred, projected on their leading
principal axes and normalised again, stored float16 (``dims`` x 2 bytes per training image:
256 KB per 1000 images at 128 dims). A picture is ``unknown`` when its score is above the threshold
that keeps ``keep`` of the validation images (``threshold_for``; the sorted validation scores are
stored, so another share can be asked for one call). benchmarks/openset.py measured the candidates
(docs/open-world.md).

**Prediction sets.** ``ConformalSets``: split conformal on the validation images with the score
1 - p(true class) (calibrated). ``labels(p, level)``: every class whose probability is at least
1 - q, q the ceil((n+1) level)-th smallest validation score, so the set holds the true class with
probability at least ``level`` for pictures like the validation images (the top class is always in
it, which can only raise coverage).

Arrays live in the metadata as ``{"dtype", "shape", "data": base64}`` (``encode_array``), so the
safetensors header and the ONNX export's JSON carry them alike and the runtime needs neither torch
nor the model file beside it.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ursa.errors import ModelFileError, UrsaError

DTYPES = ("float16", "float32")
CANNOT_TELL = "this model file has no unknown-detection reference (trained before ursa had one): it cannot tell; train it again"
REFIT_CANNOT_TELL = ("this model was refit on every picture (ursa train --refit): no unseen pictures were left to set an "
                     "unknown threshold on, so it cannot tell; train without --refit for one")


def encode_array(a: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    """An array as JSON-able metadata: dtype, shape and the little-endian bytes in base64."""
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: Any, name: str, where: object) -> np.ndarray:
    """``encode_array``'s form back to a float32 array; a damaged one is a ModelFileError naming the field."""
    bad = f"{where}: model metadata field {name!r} is damaged"
    if not isinstance(d, dict) or d.get("dtype") not in DTYPES or not isinstance(d.get("data"), str):
        raise ModelFileError(f"{bad}: expected an object with dtype ({', '.join(DTYPES)}), shape and data; train the model again")
    shape = d.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ModelFileError(f"{bad}: expected a shape of non-negative integers, got {shape!r:.60}; train the model again")
    try:
        raw = base64.b64decode(d["data"], validate=True)
    except ValueError:
        raise ModelFileError(f"{bad}: its data is not base64; train the model again") from None
    dt = np.dtype(d["dtype"]).newbyteorder("<")
    if len(raw) != math.prod(shape) * dt.itemsize:
        raise ModelFileError(f"{bad}: expected {math.prod(shape) * dt.itemsize} bytes for shape {shape}, "
                             f"got {len(raw)}; train the model again")
    a = np.frombuffer(raw, dtype=dt).reshape(shape).astype(np.float32)
    if not np.isfinite(a).all():
        raise ModelFileError(f"{bad}: it holds values that are not finite numbers; train the model again")
    return a


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def keep_share(keep: Any, what: str = "keep") -> float:
    """A share of validation pictures to keep: a number above 0 and at most 1 ("expected ..., got ...")."""
    try:
        ok = isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0.0 < float(keep) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UrsaError(f"{what}: expected a share of validation pictures above 0 and at most 1 (e.g. 0.95), got {keep!r}")
    return float(keep)


@dataclass
class UnknownDetector:
    """The reference and threshold of unknown detection (see the module doc); ``to_meta``/``from_meta`` for the model file."""

    k: int
    center: np.ndarray  # [F] mean of the normalised training features
    basis: np.ndarray  # [F, d] leading principal axes
    reference: np.ndarray  # [N, d] the training images, projected and normalised
    valid_scores: np.ndarray  # sorted scores of the validation images
    keep: float  # the default share of validation images kept
    figures: dict[str, Any] = field(default_factory=dict)  # what the threshold was chosen on

    @property
    def threshold(self) -> float:
        """The default threshold: keeps ``keep`` of the validation images."""
        return self.threshold_for(self.keep)

    def threshold_for(self, keep: float) -> float:
        """The score at or below which ``keep`` of the validation images lie (unknown: above it)."""
        keep = keep_share(keep)
        v = self.valid_scores
        if len(v) == 0:
            return float("inf")
        return float(v[min(len(v) - 1, max(0, math.ceil(keep * len(v)) - 1))])

    def project(self, feats: np.ndarray) -> np.ndarray:
        """Body features -> the reference's space: normalise, centre, project, normalise."""
        return normalise((normalise(feats) - self.center) @ self.basis)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """How unlike the training images each row of body features is: 1 - mean cosine similarity to the k nearest."""
        z = self.project(np.atleast_2d(feats))
        sims = z @ self.reference.T
        k = min(self.k, sims.shape[1])
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        return (1.0 - top.mean(axis=1)).astype(np.float64)

    def nbytes(self) -> int:
        """What the reference costs in the model file (float16), before base64."""
        return 2 * (self.reference.size + self.basis.size) + 4 * self.center.size

    def to_meta(self) -> dict[str, Any]:
        """The metadata ``openset`` field."""
        return {"method": "knn", "k": int(self.k), "keep": float(self.keep), "threshold": self.threshold,
                "valid_scores": [float(s) for s in self.valid_scores], "figures": dict(self.figures),
                "center": encode_array(self.center, "float32"), "basis": encode_array(self.basis, "float16"),
                "reference": encode_array(self.reference, "float16")}

    @classmethod
    def from_meta(cls, d: dict[str, Any] | None, where: object) -> "UnknownDetector | None":
        """The detector a model file carries, or None for one written before unknown detection (it cannot tell)."""
        if not d:
            return None
        center = decode_array(d.get("center"), "openset.center", where)
        basis = decode_array(d.get("basis"), "openset.basis", where)
        ref = decode_array(d.get("reference"), "openset.reference", where)
        if (center.ndim != 1 or basis.ndim != 2 or ref.ndim != 2 or basis.shape[0] != center.shape[0]
                or ref.shape[1] != basis.shape[1] or ref.shape[0] == 0 or basis.shape[1] == 0):
            raise ModelFileError(f"{where}: model metadata field 'openset' is damaged: its arrays' shapes do not fit "
                                 f"(center {list(center.shape)}, basis {list(basis.shape)}, reference {list(ref.shape)}); "
                                 "train the model again")
        scores = np.sort(np.asarray(d.get("valid_scores") or [], dtype=np.float64))
        return cls(int(d["k"]), center, basis, ref, scores, float(d["keep"]), dict(d.get("figures") or {}))

    def check_features(self, n_features: int, where: object) -> None:
        """The reference was made from features of this width (a model file edited by hand would not be)."""
        if n_features != self.center.shape[0]:
            raise ModelFileError(f"{where}: model metadata field 'openset' is damaged: its reference has "
                                 f"{self.center.shape[0]} features, the network gives {n_features}; train the model again")


def level_share(level: Any) -> float:
    """A prediction-set coverage level: a number strictly between 0 and 1."""
    ok = isinstance(level, (int, float)) and not isinstance(level, bool) and 0.0 < float(level) < 1.0
    if not ok:
        raise UrsaError(f"--set: expected a coverage level between 0 and 1 (e.g. 0.9), got {level!r}")
    return float(level)


@dataclass
class ConformalSets:
    """Split-conformal prediction sets from the validation images' scores 1 - p(true class) (see the module doc)."""

    scores: np.ndarray  # sorted

    def quantile(self, level: float) -> float:
        """q: the ceil((n+1) level)-th smallest score (inf when there are too few images for this level)."""
        level = level_share(level)
        n = len(self.scores)
        rank = math.ceil((n + 1) * level)
        return float("inf") if rank > n or n == 0 else float(self.scores[rank - 1])

    def indices(self, probs: Sequence[float], level: float) -> list[int]:
        """Classes in the set, most probable first; the top class always."""
        p = np.asarray(probs, dtype=np.float64)
        q = self.quantile(level)
        order = [int(i) for i in np.argsort(-p, kind="stable")]
        return [i for j, i in enumerate(order) if j == 0 or 1.0 - p[i] <= q + 1e-12]

    def to_meta(self) -> dict[str, Any]:
        """The metadata ``conformal`` field."""
        return {"score": "1-p_true", "scores": [float(s) for s in self.scores]}

    @classmethod
    def from_meta(cls, d: dict[str, Any] | None) -> "ConformalSets | None":
        """The sets a model file carries, or None for one written before them."""
        if not d or not d.get("scores"):
            return None
        return cls(np.sort(np.asarray(d["scores"], dtype=np.float64)))


class OpenWorld:
    """A model's unknown detector and prediction sets, as the predictors and serve use them (both may be absent).

    ``scores(feats)``: unknown scores of a batch (None when the model cannot tell); ``judge``: a
    Prediction with its unknown flag for the model's threshold or another share kept, and its
    prediction set when a level is asked for. Built once per loaded model (``from_meta``).
    """

    def __init__(self, detector: UnknownDetector | None, sets: ConformalSets | None, why: str | None = None,
                 refit: bool = False) -> None:
        self.detector, self.sets = detector, sets
        self.refit = refit  # the weights are `ursa train --refit`'s, which leaves both parts out
        # why it cannot tell, if it cannot
        self.why = why or (None if detector is not None else REFIT_CANNOT_TELL if refit else CANNOT_TELL)

    @classmethod
    def from_meta(cls, meta: Any, where: object) -> "OpenWorld":
        """From a ModelMeta's ``openset`` and ``conformal`` fields (checked against the head's feature width)."""
        det = UnknownDetector.from_meta(getattr(meta, "openset", None), where)
        if det is not None:
            pooled = int(meta.head["n_features"]) * (2 if meta.head.get("pool", "concat") == "concat" else 1)
            det.check_features(pooled, where)  # the pooled width: max and average side by side for "concat"
        refit = isinstance((getattr(meta, "metrics", None) or {}).get("refit"), dict)  # metrics.refit: Refit.meta()
        return cls(det, ConformalSets.from_meta(getattr(meta, "conformal", None)), refit=refit)

    def without_features(self, why: str) -> "OpenWorld":
        """The same model run by a graph with no body-features output: it cannot tell (``why``)."""
        return OpenWorld(None, self.sets, why if self.detector is not None else None, self.refit)

    def scores(self, feats: np.ndarray | None) -> list[float | None]:
        """Unknown scores of a batch's body features, or Nones."""
        if self.detector is None or feats is None:
            return [None] * (0 if feats is None else len(feats))
        return [float(s) if np.isfinite(s) else None for s in self.detector.score(np.asarray(feats, dtype=np.float32))]

    def threshold(self, keep: float | None = None) -> float | None:
        """The unknown threshold for a share kept (None: the model's own), or None when it cannot tell."""
        if self.detector is None:
            return None
        return self.detector.threshold if keep is None else self.detector.threshold_for(keep)

    def judge(self, pred: Any, keep: float | None = None, level: float | None = None) -> Any:
        """``pred`` judged unknown or not at the threshold keeping ``keep`` (None: the model's), with its set at ``level``."""
        t = self.threshold(keep)
        why = self.why or (None if pred.unknown_score is not None else
                           "this answer was computed without the body features (an explain pass), so it cannot tell")
        pred = pred.with_unknown(t, why)
        if level is not None:
            self.check_sets()
            classes = list(pred.probs)
            pred = pred.with_set([classes[i] for i in self.sets.indices(list(pred.probs.values()), level)], level)
        return pred

    def check_sets(self) -> None:
        """Prediction sets need their validation scores: one line when the model file has none."""
        if self.sets is None:
            raise UrsaError("--set: this model file has no prediction-set scores ("
                            + ("refit on every picture by ursa train --refit, none were left to set them on; train "
                               "without --refit for them)" if self.refit else
                               "trained before ursa had them); train it again"))

    def describe(self) -> dict[str, Any]:
        """What serve's /model says about it."""
        d = self.detector
        return {"unknown_threshold": None if d is None else d.threshold, "keep": None if d is None else d.keep,
                "unknown_note": self.why, "unknown_figures": None if d is None else d.figures,
                "prediction_sets": self.sets is not None}
