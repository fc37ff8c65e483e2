"""The learning-rate finder: try exponentially growing learning rates on real batches, watch the loss.

fastai's recipe: start at 1e-7, multiply the learning rate a little after every mini-batch until
it reaches 10 (at most 100 batches, cycling through the training set when it has fewer), smooth
the loss with a debiased moving average, and stop once the smoothed loss is over 4x its minimum.
Two suggestions come out, as fastai's ``SuggestionMethod.Steep`` and ``.Valley``:

- steep: where the smoothed loss falls fastest against log(lr): aggressive, usually fine;
- valley: the middle of the longest stretch over which the loss keeps falling: a safer pick,
  fastai's default and ours.

The sweep trains a throw-away copy of the optimiser state on the real weights, so the weights
(BatchNorm running statistics included), the requires-grad flags, train/eval modes and torch's
random state are snapshotted first and restored afterwards; the learner keeps no optimiser
between fits, so there is no optimiser state to put back.

While the body is frozen (and its BatchNorm in eval mode, as when the feature cache is on) the
body is a fixed function, so the frozen sweep trains the head on body features computed once
(``ursa.training.features.compute_features``, one augmented view): the same forward pass as the frozen
model, many times faster.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ursa.util.numbers import smooth

if TYPE_CHECKING:
    from ursa.training.learner import Learner

START_LR = 1e-7
END_LR = 10.0
NUM_IT = 100
DIV_FACTOR = 4.0  # stop when the smoothed loss is above this multiple of its minimum

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

    @property
    def suggestion(self) -> float:
        """The one number to pass as --lr: the valley, as fastai's lr_find() defaults to."""
        return self.valley

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
        d["suggestion"] = self.suggestion
        return d

    def plot(self, path: str | Path) -> Path:
        """lr_find.png: loss against log learning rate with both suggestions marked."""
        from ursa.diagnose.plots import plot_lr_find

        return plot_lr_find(self.lrs, self.losses, self.smoothed, self.suggestions(), path)


def lr_schedule(start_lr: float = START_LR, end_lr: float = END_LR, num_it: int = NUM_IT) -> list[float]:
    """Exponential steps from start_lr to end_lr inclusive: equal spacing on the log axis."""
    if num_it < 2:
        return [start_lr]
    return [start_lr * (end_lr / start_lr) ** (i / (num_it - 1)) for i in range(num_it)]


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """Debiased exponential moving average (fastai's smooth_loss); NaN and inf pass through."""
    return smooth(losses, beta)

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


def lr_find(learn: "Learner", start_lr: float = START_LR, end_lr: float = END_LR, num_it: int = NUM_IT,
            stop_div: bool = True, beta: float = 0.98, cached: bool | None = None,
            plot: str | Path | None = None) -> LRFinderResult:
    """Sweep the learning rate on the learner's current state and suggest one; the state is restored after.

    ``cached``: None (default) sweeps a frozen model's head on cached body features when the
    learner uses the feature cache (same forward pass, much faster); False always runs the model.
    """
    if not (0 < start_lr < end_lr):
        from ursa.errors import UrsaError

        raise UrsaError(f"lr_find needs 0 < start_lr < end_lr (got {start_lr}, {end_lr})")
    model = learn.model
    frozen = bool(model.is_frozen)
    use_cache = frozen and learn.bn_eval_when_frozen and (learn.use_cache if cached is None else cached)
    state = copy.deepcopy(model.state_dict())  # parameters and buffers: BN running stats too
    grads = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    schedule = lr_schedule(start_lr, end_lr, num_it)
    try:
        if use_cache:
            batches, params, forward = _cached_batches(learn)
        else:
            batches, params, forward = _image_batches(learn)
        threads = torch.get_num_threads()
        if use_cache:  # a small head: thread start-up costs more than it saves (a lot on a busy CPU)
            torch.set_num_threads(1)
        try:
            losses = _sweep(learn, schedule, batches, params, forward, stop_div, beta)
        finally:
            torch.set_num_threads(threads)
    finally:
        model.load_state_dict(state)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        for m, t in zip(model.modules(), modes):
            m.training = t
        torch.set_rng_state(rng)
    smoothed = smooth_losses(losses, beta)
    lrs = schedule[:len(losses)]
    t_lrs, t_losses = _trim(lrs, smoothed, num_it)
    valley, valley_loss = suggest_valley(t_lrs, t_losses)
    steep, steep_loss = suggest_steep(t_lrs, t_losses)
    notes = []
    if use_cache:
        notes.append("frozen body: swept the head on cached body features (same forward pass as the frozen model)")
    res = LRFinderResult(lrs, losses, smoothed, valley, valley_loss, steep, steep_loss, frozen, use_cache,
                         len(losses) < len(schedule), notes)
    if plot is not None:
        res.plot(plot)
    return res


def _sweep(learn: "Learner", schedule: list[float], batches: Iterator, params: list, forward,
           stop_div: bool, beta: float) -> list[float]:
    """The loop: set the LR, one optimiser step, record the loss; stop on NaN or a 4x blow-up."""
    opt = torch.optim.AdamW(params, lr=schedule[0], weight_decay=learn.wd, betas=(0.9, 0.99))
    losses: list[float] = []
    avg, best = 0.0, math.inf
    with learn._progress() as prog:
        task = prog.add_task("lr_find", total=len(schedule))
        for i, lr in enumerate(schedule, 1):
            for g in opt.param_groups:
                g["lr"] = lr
            xb, yb = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=learn.bf16):
                out = forward(xb)
            loss = learn.loss_func(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            v = float(loss.detach())
            losses.append(v)
            prog.update(task, advance=1, description=f"lr_find lr {lr:.1e} loss {v:.3f}")
            if not math.isfinite(v):
                break
            avg = beta * avg + (1 - beta) * v
            s = avg / (1 - beta**i)
            best = min(best, s)
            if stop_div and s > DIV_FACTOR * best:
                break
    return losses


def _cached_batches(learn: "Learner"):
    """Mini-batches of frozen-body features, reshuffled each pass, and the head to train."""
    from ursa.training.features import compute_features

    cache = learn.feature_cache
    size = learn.train_size or learn.dls.size
    if cache is None or cache.size != size or not cache.train_views:
        cache = compute_features(learn, n_views=1, augment=learn.augment, size=learn.train_size)
    feats, ys = cache.train_views[0], cache.train_y
    head = learn.model.head
    head.train()
    n, bs = len(ys), learn.dls.bs
    g = torch.Generator().manual_seed(learn.seed)

    def gen():
        while True:
            perm = torch.randperm(n, generator=g)
            stop = n - n % bs if n > bs else n  # drop a small last batch, as training does
            for b in range(0, stop, bs):
                idx = perm[b:b + bs]
                yield feats[idx], ys[idx]

    return gen(), [p for p in head.parameters() if p.requires_grad], head


def _image_batches(learn: "Learner"):
    """Augmented training batches through the whole model, cycling when the set runs out."""
    model = learn.model
    dl = learn.dls.loader(learn.dls.dataset.train_idx, train=learn.augment, size=learn.train_size,
                          shuffle=True, generator=torch.Generator().manual_seed(learn.seed))
    model.train()  # the same modes as a training step (Learner._train_batches)
    if model.is_frozen and learn.bn_eval_when_frozen:
        model.body.eval()
    elif not model.is_frozen and getattr(learn, "bn_stats_frozen", False):
        for m in model.body.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()

    def gen():
        while True:
            n = 0
            for xb, yb in dl:
                n += 1
                yield xb, yb
            if n == 0:
                from ursa.errors import DataError

                raise DataError("lr_find: the training set gives no batch; add images or lower --bs")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        from ursa.errors import UrsaError

        raise UrsaError("lr_find: nothing to train, every parameter is frozen")
    return gen(), params, model
