"""Which unlabelled pictures to label next: scores from the model's answers, a greedy pick for coverage.

Everything here is numpy on what one model pass gives (calibrated probabilities and pooled body
features) plus what the model file and its run already hold (the unknown detector's reference of
training images; the learning curve's per-class fits). Five signals, each scaled to [0, 1] over
the pool:

- ``uncertainty``: 1 - (top probability - second), the margin of the calibrated probabilities
  (or their entropy over log C);
- ``unknown``: how unlike the training pictures a picture is (``UnknownDetector.score``);
- ``need``: how much the learning curve says one more picture of the guessed class lowers the
  overall error (``class_need``), weighted by the probabilities;
- ``typical``: how dense the pool is around a picture (mean similarity to its nearest pool
  pictures), so the pick favours common kinds of picture over odd ones (TypiClust's idea);
- ``diversity``: while picking, the distance (1 - cosine, in the detector's space) to the nearest
  picture already labelled or already picked, so the pick is not twenty copies of one confusion.

A ``Mix`` is the weights (config as data); ``MIXES`` names the ones the benchmark compares
(benchmarks/suggest.py, docs/suggest.md) and ``DEFAULT_MIX`` is the one it measured best. The
picked order and, for each picture, the signal that contributed most (its ``reason``) come back
as a ``Ranking``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

REASONS = ("unsure", "unknown", "need", "typical", "coverage")  # what made a picture's score, in the order of Mix's weights
MEASURES = ("margin", "entropy")


@dataclass(frozen=True)
class Mix:
    """Weights of the five signals; ``measure``: how uncertainty is read from the probabilities."""

    uncertainty: float = 1.0
    unknown: float = 0.0
    need: float = 0.0
    typical: float = 0.0
    diversity: float = 0.0
    measure: str = "margin"

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure: expected one of {', '.join(MEASURES)}, got {self.measure!r}")
        weights = self.weights
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"weights: expected finite numbers >= 0, got {weights}")

    @property
    def weights(self) -> tuple[float, float, float, float, float]:
        """(uncertainty, unknown, need, typical, diversity), in REASONS' order."""
        return (self.uncertainty, self.unknown, self.need, self.typical, self.diversity)


# The mixes benchmarks/suggest.py compares; "random" is its baseline and lives there, not here.
MIXES: dict[str, Mix] = {
    "margin": Mix(),
    "coverage": Mix(uncertainty=0.0, diversity=1.0),
    "coverage+margin/4": Mix(uncertainty=0.25, diversity=1.0),
    "coverage+margin/2": Mix(uncertainty=0.5, diversity=1.0),
    "margin+coverage": Mix(diversity=0.5),
    "margin+need": Mix(need=0.5),
    "typical+coverage": Mix(uncertainty=0.0, typical=1.0, diversity=1.0),
    "margin+typical+coverage": Mix(uncertainty=0.5, typical=1.0, diversity=1.0),
    "all": Mix(unknown=0.25, need=0.25, typical=0.5, diversity=0.5),
}
DEFAULT_MIX = "coverage"  # measured best overall (lowest error on 4 of 6 sets): docs/suggest.md, benchmarks/suggest.py


def uncertainty(probs: np.ndarray, measure: str = "margin") -> np.ndarray:
    """[N] in [0, 1]: 1 - margin between the two most likely classes, or entropy / log C."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs: expected [N, C] with C >= 2, got shape {list(p.shape)}")
    if measure == "entropy":
        q = np.clip(p, 1e-12, 1.0)
        return np.clip(-(q * np.log(q)).sum(1) / math.log(p.shape[1]), 0.0, 1.0)
    top2 = np.sort(p, axis=1)[:, -2:]
    return np.clip(1.0 - (top2[:, 1] - top2[:, 0]), 0.0, 1.0)


def percentile(values: np.ndarray) -> np.ndarray:
    """Each value's rank among all, scaled to [0, 1] (ties share their mean rank); all zeros for a constant."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2 or np.ptp(v) == 0:
        return np.zeros(n)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    _, inverse = np.unique(v, return_inverse=True)
    ranks = np.bincount(inverse, ranks) / np.bincount(inverse)  # mean rank of each distinct value
    return ranks[inverse] / (n - 1)


def class_need(curve: Mapping[str, Any], classes: Sequence[str]) -> np.ndarray | None:
    """[C]: what one more picture of each class buys in overall error, from a curve.json (or report.json's ``curve``).

    For class c with n_c training pictures and fitted law err_c(n) = a n^-b + c, one more picture
    lowers its error by about a b n_c^-(b+1); weighted by its share of the validation pictures.
    None when the curve is for other classes or has no per-class fits.
    """
    try:
        names = list(curve["classes"])
        fits = curve["class_fits"]
        n_last = np.asarray(curve["n_per_class"], dtype=np.float64)[-1]
        counts = np.asarray(curve["valid_counts"], dtype=np.float64)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if sorted(names) != sorted(classes) or len(fits) != len(names) or len(n_last) != len(names):
        return None
    share = counts / max(1.0, counts.sum())
    gain = {}
    for k, name in enumerate(names):
        a, b = float(fits[k].get("a", 0.0)), float(fits[k].get("b", 0.0))
        n = max(1.0, float(n_last[k]))
        g = a * b * n ** -(b + 1) * share[k]
        gain[name] = g if math.isfinite(g) and g > 0 else 0.0
    return np.asarray([gain[c] for c in classes])


def need_scores(probs: np.ndarray, need: np.ndarray | None) -> np.ndarray:
    """[N]: the classes' need weighted by each picture's probabilities (zeros without a curve)."""
    if need is None or not np.any(need > 0):
        return np.zeros(len(probs))
    return np.asarray(probs, dtype=np.float64) @ (np.asarray(need, dtype=np.float64) / float(np.max(need)))


def typicality(feats: np.ndarray, k: int = 20, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """[N]: mean cosine similarity to the k most similar pool pictures (of a seeded sample for a large pool): dense = typical."""
    z = unit_rows(feats)
    ref = z if len(z) <= sample else z[np.random.default_rng(seed).choice(len(z), sample, replace=False)]
    k = max(1, min(k, len(ref) - 1))
    out = np.empty(len(z))
    for i in range(0, len(z), 1024):
        sims = z[i:i + 1024] @ ref.T
        out[i:i + 1024] = np.sort(sims, axis=1)[:, -(k + 1):-1].mean(1) if sims.shape[1] > k else sims.mean(1)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Ranking:
    """The picked order (indices into the pool), each pick's score, its signals and the one that decided it."""

    order: np.ndarray  # [n] pool indices, best first
    score: np.ndarray  # [n] the value each had when picked
    signals: np.ndarray  # [n, 5] the weighted signals at the pick, REASONS' order
    reasons: list[str] = field(default_factory=list)  # [n] one of REASONS

    def __len__(self) -> int:
        return len(self.order)


def rank_pool(probs: np.ndarray, feats: np.ndarray | None, mix: Mix, n: int | None = None, *,
              unknown: np.ndarray | None = None, need: np.ndarray | None = None,
              reference: np.ndarray | None = None) -> Ranking:
    """The n pictures worth labelling first, picked greedily: signals plus coverage of what is not yet near.

    probs [N, C] calibrated probabilities; feats [N, F] features in the space distances are taken
    in (the detector's projection when there is one); unknown [N] detector scores; need [C] from
    ``class_need``; reference [M, F] features of the pictures already labelled, in the same space.
    """
    probs = np.asarray(probs, dtype=np.float64)
    N = len(probs)
    n = N if n is None else max(0, min(int(n), N))
    w_unsure, w_unknown, w_need, w_typical, w_div = mix.weights
    signals = np.zeros((N, 5))
    if N == 0:
        return Ranking(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros((0, 5)), [])
    unsure = uncertainty(probs, mix.measure)
    signals[:, 0] = w_unsure * percentile(unsure) if w_unsure else 0.0
    if w_unknown and unknown is not None:
        signals[:, 1] = w_unknown * percentile(np.asarray(unknown, dtype=np.float64))
    if w_need:
        signals[:, 2] = w_need * percentile(need_scores(probs, need))
    if w_typical and feats is not None:
        signals[:, 3] = w_typical * percentile(typicality(feats))
    base = signals[:, :4].sum(1)
    if not w_div or feats is None:  # no coverage term: the order is the base score's
        order = np.argsort(-base, kind="stable")[:n]
        return Ranking(order, base[order], signals[order], reasons(signals[order], unsure[order]))
    z = unit_rows(feats)
    nearest = np.full(N, 2.0)  # 1 - cosine to the nearest labelled or picked picture (2: nothing yet)
    if reference is not None and len(reference):
        ref = unit_rows(reference)
        for i in range(0, len(ref), 2048):
            nearest = np.minimum(nearest, 1.0 - (z @ ref[i:i + 2048].T).max(1))
    taken = np.zeros(N, dtype=bool)
    order, scores, picked = [], [], []
    for _ in range(n):
        far = nearest[~taken]
        top = float(far.max()) if len(far) else 0.0
        cover = w_div * (nearest / top if top > 0 else np.zeros(N))
        value = np.where(taken, -np.inf, base + cover)
        i = int(np.argmax(value))
        taken[i] = True
        order.append(i)
        scores.append(float(value[i]))
        picked.append(np.r_[signals[i, :4], cover[i]])
        nearest = np.minimum(nearest, 1.0 - z @ z[i])
    sig = np.asarray(picked).reshape(-1, 5)
    return Ranking(np.asarray(order, dtype=np.int64), np.asarray(scores), sig, reasons(sig, unsure[order]))


UNSURE_AT = 0.2  # 1 - margin below this (the top class ahead by over 0.8) is not called "unsure", whatever its rank


def reasons(signals: np.ndarray, unsure: np.ndarray) -> list[str]:
    """Each pick's reason: its largest weighted signal, except "unsure" for a picture the model is sure of."""
    out = []
    for s, u in zip(signals, unsure):
        s = s.copy()
        if u < UNSURE_AT and s[1:].max() > 0:
            s[0] = 0.0
        out.append(REASONS[int(np.argmax(s))])
    return out


def reason_text(reason: str, probs: Sequence[float], classes: Sequence[str]) -> str:
    """The reason as a short phrase for the table and the page, e.g. "unsure: grizzly 0.52 vs black 0.41"."""
    p = np.asarray(probs, dtype=np.float64)
    a, b = (np.argsort(-p)[:2].tolist() + [0])[:2] if len(p) else (0, 0)
    if reason == "unsure":
        if p[a] - p[b] > 1 - UNSURE_AT:  # picked because nothing else was left to pick, not for doubt
            return f"next in line; the model is fairly sure ({classes[a]} {p[a]:.2f})"
        return f"unsure: {classes[a]} {p[a]:.2f} vs {classes[b]} {p[b]:.2f}"
    if reason == "unknown":
        return "unlike the training pictures"
    if reason == "typical":
        return "a common kind of picture in the pool"
    if reason == "need":
        return f"the learning curve says {classes[a]} needs more"
    return "nothing labelled looks like it yet"
