"""The cleaner's rankings from one pass's scores: top losses, likely label errors, duplicates; and their CSVs.

Likely label errors come from confident learning (cleanlab) on out-of-fold probabilities of a
logistic regression on the embeddings; near-duplicates from the cosine similarity of the
embeddings, exact duplicates from sha256.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ursa.apps.clean.scores import Scores
from ursa.errors import UrsaError
from ursa.util.files import atomic_write_csv

log = logging.getLogger("ursa")

# Cosine similarity of L2-normalised pooled embeddings above which two images are shown as
# near-duplicates. Measured on bears (benchmarks/clean_eval.py, docs/clean.md): injected resized
# and re-encoded copies score 0.91-1.0; every other pair above 0.88 is a crop or re-shoot of the
# same photo, and distinct photos of similar bears start below about 0.86.
DUP_THRESHOLD = 0.88
MAX_PAIRS = 5000
FOLDS = 5
OOF_METHOD = "confident learning on out-of-fold logistic-regression probabilities"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows to unit length, so a dot product is a cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def out_of_fold_probs(emb: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS,
                      seed: int = 0, C: float = 1.0) -> np.ndarray:
    """Probabilities for each item from a model that never saw it: what confident learning needs.

    A logistic regression on L2-normalised embeddings, K-fold: cheap (seconds) and free of the
    memorisation that makes a network's own training-set probabilities look confident.
    (Standardising the features first made it worse on bears: precision@N 0.81 instead of 0.93.)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = l2_normalise(emb)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise ValueError("a class has fewer than 2 readable images: no out-of-fold probabilities")
    out = np.zeros((len(x), n_classes), dtype=np.float64)
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels):
        clf = LogisticRegression(C=C, max_iter=2000, tol=1e-3)
        clf.fit(x[tr], labels[tr])
        out[np.ix_(te, clf.classes_)] = clf.predict_proba(x[te])
    return out


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(likely errors, most likely first; label quality of every item; flagged by confident learning).

    The list is cleanlab's confident-learning set (``find_label_issues``) together with every item
    whose out-of-fold prediction disagrees with its label, ordered by label quality (self-confidence).
    On bears with 10% flipped labels the confident-learning set alone held only the flipped
    images 0.88-0.93 of the time in its first N, its selection not being by self-confidence; this
    ordering keeps 0.94 (benchmarks/clean_eval.py), and people see the clearest cases first.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels)
    quality = np.asarray(get_label_quality_scores(labels, pred_probs, method="self_confidence"), dtype=np.float64)
    try:
        cl = np.asarray(find_label_issues(labels, pred_probs), dtype=bool)
    except (ValueError, AssertionError) as e:  # too few items per class for the confident joint
        log.warning("confident learning skipped (%s); listing disagreements only", e)
        cl = np.zeros(len(labels), dtype=bool)
    likely = np.flatnonzero(cl | (pred_probs.argmax(1) != labels))
    order = likely[np.argsort(quality[likely], kind="stable")]
    return order.astype(np.int64), quality, cl


@dataclass(frozen=True)
class Pair:
    """Two items that look alike: cosine similarity of embeddings, and whether the bytes are identical."""

    a: int
    b: int
    similarity: float
    exact: bool


def find_duplicates(emb: np.ndarray, hashes: Sequence[str], readable: np.ndarray | None = None,
                    threshold: float = DUP_THRESHOLD, max_pairs: int = MAX_PAIRS, block: int = 1024) -> list[Pair]:
    """Byte-identical files, then pairs above the cosine threshold, most similar first.

    Identical files pair with the first of their group (n copies give n-1 pairs, not n^2/2: a
    placeholder image downloaded 500 times stays readable); similar pairs are compared block by
    block and pruned to the best max_pairs as they come, so memory never grows with N^2.
    """
    n = len(hashes)
    readable = np.ones(n, dtype=bool) if readable is None else np.asarray(readable, dtype=bool)
    first: dict[str, int] = {}
    exact: list[Pair] = []
    for i, h in enumerate(hashes):
        if not h:
            continue
        if h in first:
            exact.append(Pair(first[h], i, 1.0, True))
        else:
            first[h] = i
    idx = np.flatnonzero(readable)
    x = l2_normalise(emb[idx]) if len(idx) else np.zeros((0, 1), dtype=np.float32)
    found: list[tuple[float, int, int]] = []
    for s in range(0, len(idx), block):
        m = x[s:s + block] @ x.T
        rows, cols = np.nonzero(np.triu(m >= threshold, k=s + 1))  # each pair once, j > i
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = int(idx[s + r]), int(idx[c])
            if hashes[a] and hashes[a] == hashes[b]:
                continue  # identical files: already paired with their group's first
            found.append((min(float(m[r, c]), 1.0), a, b))
        if len(found) > 4 * max_pairs:
            found = sorted(found, reverse=True)[:max_pairs]
    near = [Pair(a, b, round(sim, 4), False) for sim, a, b in sorted(found, key=lambda t: (-t[0], t[1], t[2]))]
    return (exact + near)[:max_pairs]


@dataclass
class Rankings:
    """The three views' orders: top losses, likely label errors, duplicates."""

    top_losses: list[int]
    issues: list[int]  # likely label errors, most likely first (see label_issues)
    quality: np.ndarray  # [N] label quality (out-of-fold self-confidence), NaN for unreadable
    suggested: np.ndarray  # [N] class the out-of-fold model prefers, -1 for unreadable
    duplicates: list[Pair]
    confident: np.ndarray | None = None  # [N] bool: flagged by confident learning itself
    threshold: float = DUP_THRESHOLD
    method: str = OOF_METHOD


def rank(scores: Scores, threshold: float = DUP_THRESHOLD) -> Rankings:
    """All rankings from one pass's scores; unreadable items take part only in exact duplicates."""
    n = len(scores.names)
    ok = np.flatnonzero(scores.readable)
    top = ok[np.argsort(-scores.loss[ok], kind="stable")].tolist()
    quality = np.full(n, np.nan)
    suggested = np.full(n, -1, dtype=np.int64)
    confident = np.zeros(n, dtype=bool)
    issues: list[int] = []
    method = OOF_METHOD
    if len(ok):
        try:
            oof = out_of_fold_probs(scores.avg_emb[ok], scores.labels[ok], len(scores.classes))
        except ValueError as e:
            log.warning("%s; using the model's own probabilities", e)
            oof = scores.probs[ok].astype(np.float64)
            method = "confident learning on the model's own probabilities (too few images for K-fold)"
        likely, q, cl = label_issues(scores.labels[ok], oof)
        quality[ok] = q
        suggested[ok] = oof.argmax(1)
        confident[ok] = cl
        issues = ok[likely].tolist()
    dups = find_duplicates(scores.emb, scores.sha256, scores.readable, threshold)
    return Rankings(top, issues, quality, suggested, dups, confident, threshold, method)


def export_rankings(out: Path, scores: Scores, ranks: Rankings) -> dict[str, Path]:
    """top_losses.csv, label_issues.csv, duplicates.csv (and unreadable.csv) in out; nothing else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UrsaError(f"{out}: exists and is not a folder; give --export a folder")
    out.mkdir(parents=True, exist_ok=True)
    c, names, pred = scores.classes, scores.names, scores.pred
    files = {
        "top_losses": out / "top_losses.csv",
        "label_issues": out / "label_issues.csv",
        "duplicates": out / "duplicates.csv",
        "unreadable": out / "unreadable.csv",
    }
    atomic_write_csv(files["top_losses"], ["name", "label", "predicted", "loss"],
                     [[names[i], c[scores.labels[i]], c[pred[i]], f"{scores.loss[i]:.5f}"] for i in ranks.top_losses])
    cl = ranks.confident if ranks.confident is not None else np.zeros(len(names), dtype=bool)
    atomic_write_csv(files["label_issues"], ["name", "label", "suggested", "quality", "confident_learning"],
                     [[names[i], c[scores.labels[i]], c[ranks.suggested[i]], f"{ranks.quality[i]:.5f}",
                       str(bool(cl[i])).lower()] for i in ranks.issues])
    atomic_write_csv(files["duplicates"], ["a", "b", "similarity", "exact"],
                     [[names[p.a], names[p.b], f"{p.similarity:.4f}", str(p.exact).lower()] for p in ranks.duplicates])
    atomic_write_csv(files["unreadable"], ["name", "reason"],
                     [[names[i], r] for i, r in sorted(scores.unreadable.items())])
    return files


def summary_line(scores: Scores, ranks: Rankings) -> str:
    """One line for the terminal: how much there is to look at."""
    n_exact = sum(p.exact for p in ranks.duplicates)
    n_cl = int(ranks.confident.sum()) if ranks.confident is not None else 0
    return (f"{len(scores.names)} images, {len(scores.classes)} classes: {_n(len(ranks.issues), 'likely label error')} "
            f"({n_cl} flagged by confident learning), {_n(len(ranks.duplicates), 'duplicate pair')} ({n_exact} exact), "
            f"{len(scores.unreadable)} unreadable")


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"
