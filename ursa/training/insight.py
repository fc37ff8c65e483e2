"""What a training run measures besides the model: leakage across the split, the learning curve, the data at a glance.

``train`` (``recipe.py``) calls these around its stages and hands the results to the run writer,
which adds calibration (it needs the final model's validation logits) and writes them into
report.html/json; ``ursa curve`` runs the learning curve alone (``run_curve``), ``ursa show``
the data summary. Each part's cost on the bears set is in docs/insight.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ursa.diagnose.insight_plots import plot_curve
from ursa.errors import DataError
from ursa.training.config import TrainConfig
from ursa.training.curve import DRAWS, CurveSettings, LearningCurve, learning_curve
from ursa.training.learner import Learner
from ursa.util.files import atomic_write_text
from ursa.util.progress import progress_bar
from ursa.vision import dedupe
from ursa.vision.data import ImageDataset, dedupe_split, is_valid_split
from ursa.vision.models import create_head
from ursa.vision.show import imbalance_warning, split_counts

LEAK_METHOD = (f"Exact copies by sha256 of the bytes; near-duplicates by perceptual hashes of a grayscale thumbnail "
               f"(pHash within {dedupe.NEAR_DISTANCE} and dHash within {dedupe.DHASH_DISTANCE} of 64 bits). "
               "No model is involved, so different photos of one scene are not counted.")


def apply_dedupe_split(ds: ImageDataset, valid_pct: float, seed: int, console: Console | None = None) -> int:
    """--dedupe-split with a console line: ``vision.data.dedupe_split``; items moved.

    A split given by the folder layout or a CSV column is the user's: left alone, with a warning.
    """
    done = dedupe_split(ds, valid_pct, seed)
    if done is None:
        if console is not None:
            console.print("[yellow]warning:[/] --dedupe-split: the split comes from the folder layout or the CSV's "
                          "is_valid column, so it is left as given", highlight=False)
        return 0
    groups, moved = done
    if console is not None:
        console.print(f"--dedupe-split: {groups} group(s) of near-duplicates kept on one side ({moved} image(s) "
                      "moved)", highlight=False)
    return moved


def leakage_audit(ds: ImageDataset, dedupe_split: bool = False) -> dict[str, Any]:
    """Near-duplicate pairs straddling the split (train item, valid item), for report.json's ``leakage``."""
    t0 = time.perf_counter()
    hashes = dedupe.hash_images(ds.files)
    pairs = dedupe.near_pairs(hashes)
    cross = dedupe.cross_split(pairs, ds.is_valid)
    label = ds.label_text
    return {
        "n_pairs": len(cross), "n_pairs_all": len(pairs),
        "pairs": [{"train": ds.rel(p.i), "valid": ds.rel(p.j), "distance": p.distance, "exact": p.exact,
                   "labels": [label(p.i), label(p.j)]} for p in cross],
        "root": str(ds.root), "method": LEAK_METHOD, "dedupe_split": dedupe_split,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def leakage_line(leak: dict[str, Any]) -> str:
    """One line for the console."""
    n = leak["n_pairs"]
    if n == 0:
        return "leakage audit: no training image has a copy in the validation set"
    conflicts = sum(1 for p in leak["pairs"] if p["labels"][0] != p["labels"][1])
    extra = f", {conflicts} of them labelled differently" if conflicts else ""
    return (f"leakage audit: {n} near-duplicate pair(s) straddle the split{extra}: the validation score is a little "
            "optimistic; see report.html, or train with --dedupe-split")


def data_summary(ds: ImageDataset) -> dict[str, Any]:
    """report.json's ``data``: images per class on each side, and the imbalance warning if any."""
    counts = split_counts(ds)
    return {"per_class": {c: list(v) for c, v in counts.items()},
            "warning": imbalance_warning({c: t + v for c, (t, v) in counts.items()})}


def curve_settings(cfg: TrainConfig, draws: int = DRAWS) -> CurveSettings:
    """The frozen stage's settings, for the heads of the learning curve."""
    return CurveSettings(epochs=max(1, cfg.epochs), lr=cfg.lr, wd=cfg.wd, bs=cfg.bs, label_smoothing=cfg.label_smoothing,
                         draws=draws, seed=cfg.seed)


def learner_curve(learn: Learner, cfg: TrainConfig, draws: int = DRAWS, quiet: bool = True) -> LearningCurve | None:
    """The learning curve on the learner's feature cache (None when there is none: --no-cache, or fine-tuned)."""
    cache = learn.feature_cache
    if cache is None:
        return None
    with progress_bar(learn.console, quiet) as prog:
        task = prog.add_task("learning curve", total=None)
        return learning_curve(cache, lambda: create_head(learn.model.head_cfg), list(learn.dls.classes),
                              curve_settings(cfg, draws), progress=lambda k, n: prog.update(task, completed=k, total=n))


@dataclass
class CurveRun:
    """What ``ursa curve`` made: the curve, where its files went, and how long the parts took."""

    curve: LearningCurve
    png: Path
    json: Path
    seconds_features: float
    seconds_curve: float


def run_curve(learn: Learner, cfg: TrainConfig, out: Path, draws: int = DRAWS, views: int = 1) -> CurveRun:
    """`ursa curve`: the body's features once (one view: the curve compares sizes, not augmentation), then the curve.

    Writes curve.png and curve.json into out; the learner comes from ``recipe.build_learner(cfg)``.
    """
    out = Path(out)
    t0 = time.perf_counter()
    learn.freeze()
    learn.cached_features(views)
    t1 = time.perf_counter()
    curve = learner_curve(learn, cfg, draws, cfg.quiet)
    if curve is None:  # pragma: no cover - the cache was just computed
        raise DataError(f"{cfg.data}: no body features to draw the curve from")
    out.mkdir(parents=True, exist_ok=True)
    d = curve.to_json()
    png = plot_curve(d, out / "curve.png")
    path = out / "curve.json"
    atomic_write_text(path, json.dumps(d, indent=1) + "\n")
    learn.drop_features()
    return CurveRun(curve, png, path, t1 - t0, time.perf_counter() - t1)
