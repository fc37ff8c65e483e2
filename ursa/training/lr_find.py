"""The learning-rate finder: try exponentially growing learning rates on real batches, watch the loss.

fastai's recipe: start at 1e-7, multiply the learning rate a little after every mini-batch until
it reaches 10 (at most 100 batches, cycling through the training set when it has fewer), smooth
the loss with a debiased moving average, and stop once the smoothed loss is over 4x its minimum.
Two suggestions come out, as fastai's ``SuggestionMethod.Steep`` and ``.Valley``:

- steep: where the smoothed loss falls fastest against log(lr): aggressive, usually fine;
- valley: the middle of the longest stretch over which the loss keeps falling: a safer pick,
  fastai's default.

The one number it suggests (``suggest``) is the recipe's own default unless the sweep shows that
default is too high: while the smoothed loss still falls at the default rate (it lies before the
loss's minimum, or within 10% of the fall from the start to the minimum), the default is kept; only
past that is the valley (below the minimum) suggested. fastai's valley alone sat at 2.5e-4 on bears
where the loss still fell until 1e-1, and following it gave 0.053 error against 0.037 with 3e-3.

The sweep runs in the learner's one training loop, driven by the ``LRFinder`` callback: it
snapshots the weights (BatchNorm running statistics included), the requires-grad flags,
train/eval modes and torch's random state, sets the learning rate before every batch, cancels
the fit when the loss blows up or the schedule ends, and restores everything after; the learner
keeps no optimiser between fits, so there is no optimiser state to put back.

While the body is frozen (and its BatchNorm in eval mode, as when the feature cache is on) the
body is a fixed function, so the frozen sweep trains the head on cached body features (one
augmented view): the same forward pass as the frozen model, many times faster.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ursa.diagnose.plots import plot_lr_find
from ursa.errors import DataError, UrsaError
from ursa.training.callbacks import Callback, CancelFitException
from ursa.training.optim import make_optimizer
from ursa.util.numbers import smooth, smooth_last
from ursa.util.progress import progress_bar

START_LR = 1e-7
END_LR = 10.0
NUM_IT = 100
DIV_FACTOR = 4.0  # stop when the smoothed loss is above this multiple of its minimum
# The default rate is "past the minimum" when its smoothed loss has climbed back by more than this share
# of the fall from the sweep's start to its minimum.
RISE_SHARE = 0.1

EXPLAIN = {
    "valley": "middle of the longest stretch where the loss keeps falling: a safe choice (fastai's default)",
    "steep": "where the loss falls fastest: more aggressive, can be too high on noisy curves",
}


@dataclass
class LRFinderResult:
    """The sweep (learning rates, raw and smoothed losses) and the two suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    valley: float
    valley_loss: float
    steep: float
    steep_loss: float
    frozen: bool
    cached: bool
    stopped_early: bool
    notes: list[str] = field(default_factory=list)
    default: float | None = None  # the recipe's rate for what was swept (--lr, or fine-tuning's top rate)
    suggestion: float = math.nan  # the one number to use (suggest())
    suggestion_why: str = "the valley"

    def suggestions(self) -> dict[str, tuple[float, float]]:
        """name -> (lr, smoothed loss there), for marking the plot."""
        return {"valley": (self.valley, self.valley_loss), "steep": (self.steep, self.steep_loss)}

    def explain(self) -> list[str]:
        """One line per suggestion, in plain words, for the terminal and the report."""
        return [f"{name:<6} {lr:.2e}  {EXPLAIN[name]}" for name, (lr, _) in self.suggestions().items()]

    def to_dict(self) -> dict:
        """JSON-friendly form (lists of floats; NaN kept as None)."""
        d = asdict(self)
        for k in ("losses", "smoothed"):
            d[k] = [v if math.isfinite(v) else None for v in d[k]]
        return d

    def plot(self, path: str | Path) -> Path:
        """lr_find.png: loss against log learning rate with both suggestions marked."""
        return plot_lr_find(self.lrs, self.losses, self.smoothed, self.suggestions(), path)


def suggest(lrs: Sequence[float], smoothed: Sequence[float], valley: float, default: float | None) -> tuple[float, str]:
    """The one rate to use: the default while the loss still falls there, else the valley (below the minimum)."""
    if default is None or not lrs:
        return valley, "the valley: " + EXPLAIN["valley"]
    finite = [(lr, v) for lr, v in zip(lrs, smoothed) if math.isfinite(v)]
    if not finite:
        return default, "the default: the sweep gave no finite loss to judge by"
    lr_min, v_min = min(finite, key=lambda t: t[1])
    start = finite[0][1]
    if default <= lr_min:
        return default, "the default: the loss still falls there (lr_find.png)"
    at_default = min(finite, key=lambda t: abs(math.log(t[0]) - math.log(default)))[1]
    if default <= finite[-1][0] and at_default - v_min <= RISE_SHARE * max(start - v_min, 0.0):
        return default, "the default: the loss is still near its minimum there (lr_find.png)"
    return min(valley, default), ("the valley: the loss is already rising again at the default, which is too high "
                                  "here (lr_find.png)")


def lr_schedule(start_lr: float = START_LR, end_lr: float = END_LR, num_it: int = NUM_IT) -> list[float]:
    """Exponential steps from start_lr to end_lr inclusive: equal spacing on the log axis."""
    if num_it < 2:
        return [start_lr]
    return [start_lr * (end_lr / start_lr) ** (i / (num_it - 1)) for i in range(num_it)]


def _trim(lrs: Sequence[float], losses: Sequence[float], num_it: int) -> tuple[list[float], list[float]]:
    """fastai drops the first tenth and the last five points (noise, blow-up) and anything after a NaN."""
    lrs, losses = list(lrs), list(losses)
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        lrs, losses = lrs[:bad], losses[:bad]
    lo, hi = num_it // 10, len(losses) - 5
    if hi - lo >= 3:
        return lrs[lo:hi], losses[lo:hi]
    return lrs, losses  # too short a sweep to trim: use it all


def suggest_steep(lrs: Sequence[float], losses: Sequence[float], window: int | None = None) -> tuple[float, float]:
    """Learning rate (and loss) where the loss falls fastest against log(lr): fastai's Steep.

    The slope is taken over a few points (5% of the curve) rather than between neighbours, so
    one noisy step near the flat start cannot win; with window=1 it is exactly fastai's rule.
    """
    n = len(lrs)
    if n < 2:
        return (lrs[0], losses[0]) if lrs else (math.nan, math.nan)
    w = max(1, min(n - 1, window if window is not None else n // 20))
    grads = [(losses[i + w] - losses[i]) / (math.log(lrs[i + w]) - math.log(lrs[i])) for i in range(n - w)]
    i = min(range(len(grads)), key=grads.__getitem__) + w // 2  # the middle of the steepest window
    return lrs[i], losses[i]


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """Learning rate (and loss) in the longest falling stretch of the curve: fastai's Valley.

    The longest decreasing subsequence ending at each point marks the valley; the pick sits
    a half of the way into it (first third plus a sixth), away from both the flat start and
    the blow-up at the end.
    """
    n = len(losses)
    if n == 0:
        return math.nan, math.nan
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
    max_end = max(range(n), key=lambda i: (lds[i], -i))  # the first longest
    max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = min(n - 1, max(0, max_start + int(sections) + int(sections / 2)))
    return lrs[idx], losses[idx]


class LRFinder(Callback):
    """The sweep as a callback: saves the state, sets the rate each batch, cancels on blow-up, restores after.

    Built before the batch source, so torch's random state is saved before anything draws from it.
    """

    order = 1

    def __init__(self, learn: Any, schedule: Sequence[float], stop_div: bool = True, beta: float = 0.98) -> None:
        model = learn.model
        self.schedule, self.stop_div, self.beta = list(schedule), stop_div, beta
        self.state = copy.deepcopy(model.state_dict())  # parameters and buffers: BN running stats too
        self.grads = [p.requires_grad for p in model.parameters()]
        self.modes = [m.training for m in model.modules()]
        self.rng = torch.get_rng_state()
        self.losses: list[float] = []
        self.best = math.inf
        self.bar: Any = None
        self.restored = False

    def before_fit(self, learn: Any) -> None:
        self.bar = progress_bar(learn.console, learn.config.quiet)
        self.bar.start()
        self.task = self.bar.add_task("lr_find", total=len(self.schedule))

    def before_batch(self, learn: Any) -> None:
        lr = self.schedule[len(self.losses)]
        for g in learn.opt.param_groups:
            g["lr"] = lr

    def after_batch(self, learn: Any) -> None:
        if learn.batch_cancelled:
            return
        v = learn.loss_value
        self.losses.append(v)
        self.bar.update(self.task, advance=1, description=f"lr_find lr {learn.lr:.1e} loss {v:.3f}")
        if not math.isfinite(v):
            raise CancelFitException()
        s = smooth_last(self.losses, self.beta)
        self.best = min(self.best, s)
        if (self.stop_div and s > DIV_FACTOR * self.best) or len(self.losses) >= len(self.schedule):
            raise CancelFitException()

    def after_fit(self, learn: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.restore(learn)

    def restore(self, learn: Any) -> None:
        """Put back the weights, requires-grad flags, modes and random state saved at construction (once)."""
        if self.restored:
            return
        self.restored = True
        model = learn.model
        model.load_state_dict(self.state)
        for p, g in zip(model.parameters(), self.grads):
            p.requires_grad_(g)
        for m, t in zip(model.modules(), self.modes):
            m.training = t
        torch.set_rng_state(self.rng)


def lr_find(learn: Any, start_lr: float = START_LR, end_lr: float = END_LR, num_it: int = NUM_IT,
            stop_div: bool = True, beta: float = 0.98, cached: bool | None = None, bf16: bool = False,
            plot: str | Path | None = None, default: float | None = None) -> LRFinderResult:
    """Sweep the learning rate on the learner's current state and suggest one; the state is restored after.

    ``cached``: None (default) sweeps a frozen model's head on cached body features when the
    learner uses the feature cache (same forward pass, much faster); False always runs the model.
    ``default``: the rate the recipe would use; the suggestion keeps it unless the sweep shows it too high.
    """
    if not (0 < start_lr < end_lr):
        raise UrsaError(f"lr_find needs 0 < start_lr < end_lr (got {start_lr}, {end_lr})")
    model = learn.model
    frozen = bool(model.is_frozen)
    use_cache = frozen and learn.config.cache and (cached is None or cached)
    schedule = lr_schedule(start_lr, end_lr, num_it)
    finder = LRFinder(learn, schedule, stop_div, beta)
    threads = torch.get_num_threads()
    try:
        # The sweep's feature cache is not kept: a later fit computes its own, seeded as in a run without a sweep.
        source = learn.batch_source(use_cache, n_views=1, generator=torch.Generator().manual_seed(learn.config.seed),
                                    keep=False)
        if source.n_batches == 0:
            raise DataError("lr_find: the training set gives no batch; add images or lower --bs")
        params = [p for p in source.module.parameters() if p.requires_grad]
        if not params:
            raise UrsaError("lr_find: nothing to train, every parameter is frozen")
        opt = make_optimizer([{"params": params, "lr": schedule[0]}], learn.config.wd)
        if use_cache:  # a small head: thread start-up costs more than it saves (a lot on a busy CPU)
            torch.set_num_threads(1)
        learn.run(math.ceil(len(schedule) / source.n_batches) + 1, source, opt, stage="lr_find", bf16=bf16,
                  validate=False, cbs=[finder])
    finally:
        torch.set_num_threads(threads)
        finder.restore(learn)  # also when the sweep never started
    losses = finder.losses
    smoothed = smooth(losses, beta)
    lrs = schedule[:len(losses)]
    t_lrs, t_losses = _trim(lrs, smoothed, num_it)
    valley, valley_loss = suggest_valley(t_lrs, t_losses)
    steep, steep_loss = suggest_steep(t_lrs, t_losses)
    notes = []
    if use_cache:
        notes.append("frozen body: swept the head on cached body features (same forward pass as the frozen model)")
    # Judged on the smoothed curve before the blow-up (the last points are dropped as fastai does).
    pick, why = suggest(t_lrs, t_losses, valley, default)
    res = LRFinderResult(lrs, losses, smoothed, valley, valley_loss, steep, steep_loss, frozen, use_cache,
                         len(losses) < len(schedule), notes, default, pick, why)
    if plot is not None:
        res.plot(plot)
    return res
