"""Learning curve: how many images are enough, and of which class more would help.

The head is retrained on the cached body features of 10%, 20%, 40%, 70% and 100% of the
training set (stratified per class, several seeded draws each) and scored on the fixed
validation features; a power law err(n) = a * n^-b + c fitted to the mean error against images
per class says what more data would likely buy, overall and per class. Because the body's
features are already cached, this costs seconds, not a retraining of the network.

Every fit takes the same number of optimiser steps as the full run (the epochs scale with the
subset), so a small subset is not also an under-trained one; it uses the frozen stage's batch
source (``CachedFeatures``: view e mod K, precise BatchNorm at the end of each epoch), optimiser
and one-cycle schedule, driven here without the learner's callbacks (no bar, record or guard is
wanted for 15 throwaway heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ursa.training.features import FeatureCache
from ursa.training.optim import make_optimizer, one_cycle, param_groups
from ursa.training.sources import CachedFeatures

FRACTIONS = (0.1, 0.2, 0.4, 0.7, 1.0)
DRAWS = 3
SMALL_RATIO = 2.0  # a class with under half the median class's training images is named as small


@dataclass(frozen=True)
class CurveSettings:
    """How each head is trained (the frozen stage's settings) and which subsets are drawn."""

    epochs: int = 4
    lr: float = 3e-3
    wd: float = 0.01
    bs: int = 32
    label_smoothing: float = 0.0
    fractions: tuple[float, ...] = FRACTIONS
    draws: int = DRAWS
    seed: int = 42


@dataclass
class PowerLaw:
    """err(n) = a * n^-b + c, fitted by least squares (a, c >= 0) over a grid of b."""

    a: float
    b: float
    c: float

    def __call__(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(np.maximum(n, 1e-9), -self.b) + self.c

    def to_json(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c}


def fit_power_law(n: Sequence[float], err: Sequence[float]) -> PowerLaw:
    """The power law nearest the points (n, err), with a >= 0 (error never rises with data) and c >= 0."""
    n = np.asarray(n, dtype=np.float64)
    err = np.asarray(err, dtype=np.float64)
    ok = np.isfinite(err) & (n > 0)
    n, err = n[ok], err[ok]
    if len(n) < 2 or np.ptp(err) == 0:
        return PowerLaw(0.0, 0.0, float(err.mean()) if len(err) else math.nan)
    best: tuple[float, PowerLaw] | None = None
    for b in np.geomspace(0.05, 3.0, 80):
        x = np.power(n, -b)
        a, c = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), err, rcond=None)[0]
        if a < 0:
            a, c = 0.0, err.mean()
        if c < 0:
            c = 0.0
            a = max(0.0, float(x @ err / (x @ x)))
        sse = float(((a * x + c - err) ** 2).sum())
        if best is None or sse < best[0] - 1e-15:
            best = (sse, PowerLaw(float(a), float(b), float(c)))
    assert best is not None
    return best[1]


def stratified_subset(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of `fraction` of each class's items (at least 2 each), drawn without replacement, sorted."""
    out = []
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        k = min(len(idx), max(2, int(round(fraction * len(idx)))))
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out))


def fit_head(head: nn.Module, cache: FeatureCache, steps: int, s: CurveSettings, seed: int) -> None:
    """Train a fresh head on a feature cache for about `steps` optimiser steps (one cycle, the frozen stage's recipe)."""
    g = torch.Generator()
    g.manual_seed(seed)
    source = CachedFeatures(head, cache, s.bs, g)
    epochs = max(s.epochs, math.ceil(steps / max(1, source.n_batches)))
    opt = make_optimizer(param_groups([list(head.parameters())], s.lr), s.wd)
    sched = one_cycle(opt, epochs * source.n_batches)
    for e in range(epochs):
        source.train_modes()
        for xb, yb in source.batches(e):
            loss = F.cross_entropy(source.forward(xb), yb, label_smoothing=s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        source.end_epoch()


@torch.inference_mode()
def _valid_errors(head: nn.Module, cache: FeatureCache, n_classes: int) -> tuple[float, list[float]]:
    head.eval()
    pred = torch.cat([head(cache.valid[i:i + 1024]).argmax(1) for i in range(0, len(cache.valid), 1024)])
    y = cache.valid_y
    wrong = (pred != y).float()
    per = [float(wrong[y == c].mean()) if bool((y == c).any()) else math.nan for c in range(n_classes)]
    return float(wrong.mean()), per


@dataclass
class LearningCurve:
    """Errors per fraction and draw, overall and per class, with the fitted laws and what they say."""

    classes: list[str]
    fractions: list[float]
    n_per_class: np.ndarray  # [F, C] training images of each class at each fraction
    errors: np.ndarray  # [F, D] validation error of each draw
    class_errors: np.ndarray  # [F, D, C] error on each class's validation images
    valid_counts: list[int]  # validation images per class
    seconds: float = 0.0
    fit: PowerLaw = field(init=False)
    class_fits: list[PowerLaw] = field(init=False)

    def __post_init__(self) -> None:
        self.fit = fit_power_law(self.n_per_class.mean(1), self.errors.mean(1))
        self.class_fits = [fit_power_law(self.n_per_class[:, c], self.class_errors[:, :, c].mean(1))
                           for c in range(len(self.classes))]

    @property
    def n_valid(self) -> int:
        return int(sum(self.valid_counts))

    def verdict(self) -> dict[str, Any]:
        """Still falling or flat, since when, and the class where more images would likely help most."""
        mean = self.errors.mean(1)
        full, n_full = float(mean[-1]), float(self.n_per_class[-1].mean())
        spread = float(self.errors[-1].std(ddof=1)) if self.errors.shape[1] > 1 else 0.0
        tol = max(1.0 / max(1, self.n_valid), 2 * spread / math.sqrt(max(1, self.errors.shape[1])))
        flat_from = len(mean) - 1
        while flat_from > 0 and mean[flat_from - 1] - full <= tol:
            flat_from -= 1
        # what the curves say 40% more images of one class would buy, in overall error
        shares = np.asarray(self.valid_counts, dtype=np.float64) / max(1, self.n_valid)
        best: dict[str, Any] | None = None
        for c, law in enumerate(self.class_fits):
            n_c = float(self.n_per_class[-1, c])
            more = _round_nice(0.4 * n_c)
            drop = float(law(n_c) - law(n_c + more)) if more > 0 else 0.0
            gain = drop * shares[c]
            if best is None or gain > best["overall_drop"]:
                best = {"class": self.classes[c], "more": more, "class_error": float(self.class_errors[-1, :, c].mean()),
                        "class_drop": drop, "overall_drop": gain}
        more_all = float(self.fit(n_full) - self.fit(1.4 * n_full))
        # Falling: the last step (70% -> 100%) still lowered the error by more than the noise, or the
        # error fell until 70% and the fitted law says 40% more images would buy at least half that.
        falling = flat_from == len(mean) - 1 or (flat_from == len(mean) - 2 and more_all >= tol / 2)
        # a class far worse than the rest whose own curve does not fall: more of its images will not fix it
        stuck = None
        for c, law in enumerate(self.class_fits):
            err_c, n_c = float(self.class_errors[-1, :, c].mean()), float(self.n_per_class[-1, c])
            if err_c >= max(2 * full, 0.1) and law(n_c) - law(1.4 * n_c) < tol and (stuck is None or err_c > stuck[1]):
                stuck = (self.classes[c], err_c)
        return {"falling": bool(falling), "error": full, "n_per_class": n_full, "flat_from": self.fractions[flat_from],
                "flat_from_n": float(self.n_per_class[flat_from].mean()), "tolerance": tol,
                "drop_with_40pct_more": more_all, "best_class": best,
                "stuck_class": None if stuck is None else {"class": stuck[0], "error": stuck[1]},
                "small_classes": self.small_classes()}

    def small_classes(self) -> list[dict[str, Any]]:
        """Classes with under 1/SMALL_RATIO of the median class's training images, smallest first: how many more
        images would bring each to the median, and what its own curve says that buys (its error now and then)."""
        n = self.n_per_class[-1]
        median = float(np.median(n))
        out = []
        for c in np.argsort(n, kind="stable"):
            n_c = float(n[c])
            if n_c * SMALL_RATIO > median:
                break
            err = float(self.class_errors[-1, :, c].mean())
            out.append({"class": self.classes[c], "n": int(n_c), "median": int(round(median)),
                        "more": _round_nice(median - n_c), "class_error": err,
                        "class_error_then": float(max(0.0, min(err, self.class_fits[c](median))))})
        return out

    def words(self) -> str:
        """What more data would likely buy, in one or two sentences; the small classes by name."""
        stuck = self.verdict()["stuck_class"]
        small = self.small_classes()
        return self._words() + (
            "; small classes: " + ", ".join(
                f"about {s['more']} more images of {s['class']} (it has {s['n']}, the median class "
                f"{s['median']}; its error {100 * s['class_error']:.0f}%)" for s in small[:3])
            + " would help most" if small else "") + (
            f"; {stuck['class']} is wrong {100 * stuck['error']:.0f}% of the time and more of its images do not "
            "lower that: check its labels and what it is confused with" if stuck else "") + (
            f" (with {self.n_valid} validation images, one image is {100 / self.n_valid:.1f} points: a rough reading)"
            if 0 < self.n_valid < 100 else "")

    def _words(self) -> str:
        v = self.verdict()
        head = f"error {100 * v['error']:.1f}% with ~{v['n_per_class']:.0f} per class"
        if v["falling"] and v["best_class"] is not None:
            b = v["best_class"]
            pace = "" if v["drop_with_40pct_more"] >= 2 * v["tolerance"] else ", slowly"
            return (f"{head}; the curve is still falling{pace}: ~{b['more']} more images of {b['class']} would likely help "
                    f"most (its error {100 * b['class_error']:.1f}% -> ~{100 * max(0.0, b['class_error'] - b['class_drop']):.1f}%, "
                    f"overall -{100 * b['overall_drop']:.1f} points; 40% more of every class: "
                    f"-{100 * v['drop_with_40pct_more']:.1f} points)")
        if v["error"] == 0:
            return (f"{head}; no validation mistakes from {100 * v['flat_from']:.0f}% of the images "
                    f"(~{v['flat_from_n']:.0f} per class) on: more images will not help here")
        return (f"{head}; flat since {100 * v['flat_from']:.0f}% (~{v['flat_from_n']:.0f} per class): more images will "
                "not help; clean labels (ursa clean) or fine-tune (--unfreeze-epochs 2) instead")

    def to_json(self) -> dict[str, Any]:
        """curve.json / report.json's ``curve``."""
        return {"classes": self.classes, "fractions": self.fractions, "n_per_class": self.n_per_class.tolist(),
                "errors": self.errors.tolist(), "class_errors": self.class_errors.tolist(),
                "valid_counts": self.valid_counts, "fit": self.fit.to_json(),
                "class_fits": [f.to_json() for f in self.class_fits], "verdict": self.verdict(), "words": self.words(),
                "seconds": self.seconds}


def _round_nice(x: float) -> int:
    """A round number of images to suggest: 10, 20, 50, 100, 150 ..."""
    if x <= 0:
        return 0
    step = 5 if x < 50 else 10 if x < 200 else 50
    return int(max(step, step * round(x / step)))


def learning_curve(cache: FeatureCache, make_head: Callable[[], nn.Module], classes: Sequence[str],
                   settings: CurveSettings | None = None,
                   progress: Callable[[int, int], None] | None = None) -> LearningCurve:
    """Retrain the head on stratified subsets of the cached training features, score each on the validation features."""
    import time

    t0 = time.perf_counter()
    s = settings or CurveSettings()
    y = cache.train_y.numpy()
    n_classes = len(classes)
    full_steps = s.epochs * CachedFeatures(nn.Identity(), cache, s.bs, torch.Generator()).n_batches
    fr = [float(f) for f in s.fractions]
    n_per_class = np.zeros((len(fr), n_classes))
    errors = np.zeros((len(fr), s.draws))
    class_errors = np.zeros((len(fr), s.draws, n_classes))
    total, done = len(fr) * s.draws, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a head on a batch of 32 is too small to share out; threads only wait on each other
    try:
        for fi, f in enumerate(fr):
            for d in range(s.draws):
                seed = s.seed * 1000 + fi * 100 + d
                idx = stratified_subset(y, f, np.random.default_rng(seed))
                n_per_class[fi] = np.bincount(y[idx], minlength=n_classes)
                t_idx = torch.from_numpy(idx)
                sub = FeatureCache([v[t_idx] for v in cache.train_views], cache.train_y[t_idx], cache.valid,
                                   cache.valid_y, cache.size, cache.augmented)
                torch.manual_seed(seed)
                head = make_head()
                fit_head(head, sub, full_steps, s, seed)
                errors[fi, d], class_errors[fi, d] = _valid_errors(head, cache, n_classes)
                done += 1
                if progress:
                    progress(done, total)
    finally:
        torch.set_num_threads(threads)
    valid_counts = np.bincount(cache.valid_y.numpy(), minlength=n_classes).tolist()
    return LearningCurve(list(classes), fr, n_per_class, errors, class_errors, valid_counts,
                         time.perf_counter() - t0)
