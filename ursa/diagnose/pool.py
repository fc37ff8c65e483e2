"""A folder of unlabelled pictures through the model: probabilities, body features, unknown scores; then the ranking.

One streaming pass with whichever predictor ``load_predictor`` gives (ONNX Runtime from a current
model.onnx, else torch; both return calibrated probabilities and the pooled body features), so
the pictures are read once and at most two batches of pixels are held. A picture that does not
decode is skipped, counted and reported with its reason; the pass goes on. Then
``suggest.rank_pool`` with what the model file and its run folder hold: the unknown detector
(its reference of training pictures is also where "already labelled" lives for coverage) and,
when the run measured one, the learning curve's per-class fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ursa.diagnose.suggest import DEFAULT_MIX, MIXES, Mix, Ranking, class_need, rank_pool, reason_text
from ursa.errors import DataError, ImageError
from ursa.inference.runtime import stream_batches
from ursa.vision.images import is_image_file


def pool_files(root: Path) -> list[Path]:
    """The pool's image files, sorted; hidden files and folders and ursa's own (``_quarantine``...) left out."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the folder of pictures you have not labelled yet")
    out = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts
        if any(p.startswith((".", "_")) for p in rel[:-1]) or not f.is_file() or not is_image_file(f):
            continue
        out.append(f)
    return out


@dataclass
class PoolScores:
    """The model's view of every pool picture; unreadable ones have no row, only their reason."""

    root: Path
    files: list[Path]  # readable pictures, in pass order
    probs: np.ndarray  # [N, C] calibrated
    feats: np.ndarray  # [N, F] pooled body features
    classes: list[str]
    unreadable: dict[str, str] = field(default_factory=dict)  # name in the pool -> why

    def name(self, i: int) -> str:
        """The picture's path inside the pool, with forward slashes."""
        return self.files[i].relative_to(self.root).as_posix()


def score_pool(pred: Any, root: Path, files: Sequence[Path], bs: int = 32,
               progress: Callable[[int], None] | None = None) -> PoolScores:
    """One pass of the predictor over the pool's files (either backend), unreadable pictures skipped and counted."""
    torch_backend = getattr(pred, "backend", "onnx") == "torch"

    def forward(xs: list) -> list:
        if torch_backend:
            import torch

            p, f = pred.probs_and_features(torch.stack(xs))
            p, f = p.numpy(), f.numpy()
        else:
            p, f = pred.probs_and_features(np.stack(xs))
        return list(zip(p, f))

    kept, probs, feats, bad = [], [], [], {}
    for src, ans in stream_batches(files, bs, pred.preprocess, forward, 0 if torch_backend else 2):
        if isinstance(ans, ImageError):
            bad[Path(src).relative_to(root).as_posix()] = str(ans).splitlines()[0][:200]
        else:
            kept.append(Path(src))
            probs.append(ans[0])
            feats.append(ans[1])
        if progress:
            progress(1)
    n_classes = len(pred.classes)
    p = np.asarray(probs, dtype=np.float32).reshape(len(kept), n_classes)
    f = np.asarray(feats, dtype=np.float32).reshape(len(kept), -1)
    return PoolScores(Path(root), kept, p, f, list(pred.classes), bad)


def run_curve(model_path: Path) -> dict[str, Any] | None:
    """The learning curve the model's run measured (report.json's ``curve``, or ``ursa curve``'s curve.json beside it)."""
    run = Path(model_path).parent
    for name, key in (("curve.json", None), ("report.json", "curve")):
        try:
            d = json.loads((run / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        d = d.get(key) if key and isinstance(d, dict) else d
        if isinstance(d, dict) and d.get("class_fits"):
            return d
    return None


@dataclass
class Suggestion:
    """One picture worth labelling: where it is, the model's guess and its probability, and why it was picked."""

    file: str
    guess: str
    prob: float
    reason: str  # one of suggest.REASONS
    why: str  # the reason in words
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "guess": self.guess, "prob": round(self.prob, 4), "reason": self.reason,
                "why": self.why, "score": round(self.score, 4)}


def suggest(scores: PoolScores, world: Any, n: int, mix: Mix | str = DEFAULT_MIX,
            curve: dict[str, Any] | None = None) -> tuple[list[Suggestion], Ranking]:
    """The n pictures to label first; ``world``: the predictor's ``OpenWorld`` (its detector, when the model has one)."""
    mix = MIXES[mix] if isinstance(mix, str) else mix
    det = getattr(world, "detector", None)
    unknown = reference = None
    feats = scores.feats
    if det is not None and len(feats):
        det.check_features(feats.shape[1], "model")
        unknown = det.score(feats)
        feats, reference = det.project(feats), det.reference  # coverage in the detector's space, where the training pictures are
    need = class_need(curve, scores.classes) if curve else None
    ranking = rank_pool(scores.probs, feats, mix, n, unknown=unknown, need=need, reference=reference)
    out = []
    for i, reason, s in zip(ranking.order.tolist(), ranking.reasons, ranking.score.tolist()):
        p = scores.probs[i]
        k = int(np.argmax(p))
        out.append(Suggestion(scores.name(i), scores.classes[k], float(p[k]), reason,
                              reason_text(reason, p, scores.classes), float(s)))
    return out, ranking
