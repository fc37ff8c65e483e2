"""The default recipe's decisions, each with its reason: input size, flips, and how much fine-tuning.

``ursa train DATA`` looks at the images before training (``vision.probe``) and at the frozen
stage's result after it, and decides here; the reasons are printed in the first lines of the run,
saved as ``recipe.json`` and shown in the report. Every decision has an option that overrides it
(``--size``, ``--flips``, ``--unfreeze-epochs``, ``--budget``), and ``--config RUN`` replays an
earlier run's decisions. Nothing here reads a clock: how much fine-tuning fits ``--budget`` is
*counted* (images x epochs x the network's FLOPs at the input size, in seconds of a reference
machine), so the same data, seed and options decide the same on an idle, a busy or a faster
machine. See docs/train.md for the evidence behind each threshold.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

from ursa.training.config import DEFAULT_BUDGET, SMALL_IMAGE_BUDGET_FACTOR
from ursa.util.numbers import error_upper_bound
from ursa.vision.probe import ImageProbe

# Smallest input size the recipe picks for small images (upsampled to it). 64 px (a 2x2 map after EfficientNet's five
# stride-2 stages) held on the four sets it was tuned on and missed on 4 of the 5 held-out ones (issue 28); at 128 px
# the small-image sets' held-out error fell from 0.19 to 0.12 on average (docs/train.md).
MIN_SIZE = 128
# Photos at least this share of the network's own size are used at its size (what its weights saw).
NATIVE_SHARE = 0.75
# Mostly grayscale images (digits, text, scans): mirrors can turn one class into another.
GREY_SHARE = 0.9
# The frozen stage's error is already this good (in whole validation pictures, rounded up: on 48
# pictures one error is "within a picture of" 2%): nothing for fine-tuning to win.
GOOD_ENOUGH = 0.02
# ... and the validation pictures are enough to show it: the error's one-sided upper confidence bound (Clopper-Pearson,
# GOOD_ENOUGH_CONFIDENCE) is at most GOOD_ENOUGH_BOUND, so none wrong needs 29 pictures, one wrong 46, two 61. On
# omniglot_greek (the tenth set) with a 10% validation share (14 pictures), one wrong skipped fine-tuning on two seeds:
# 10 and 7 of 32 wrong held out, against 2 for the seed that fine-tuned (docs/train.md).
GOOD_ENOUGH_BOUND, GOOD_ENOUGH_CONFIDENCE = 0.10, 0.95
# Fine-tuning shorter than this does not finish a warm-up and an anneal. At most MAX_EPOCHS per DEFAULT_BUDGET (more
# gained little on the dev sets at 64 px); a larger --budget raises the cap in proportion, so small images' doubled
# default budget (choose_budget) allows 24.
MIN_EPOCHS, MAX_EPOCHS = 3, 12
# When fewer than MIN_EPOCHS fit at the input size (224 px photos, several hundred of them), fine-tune at a smaller
# size: the largest multiple of 32, down to TUNE_MIN_SIZE (inputs of MIN_SIZE or less: half their size, at least
# FLOOR_SIZE), at which MIN_EPOCHS fit. The frozen stage, the validation and the model file stay at the input size
# (training below the test size with random-resized crops costs little: Touvron et al. 2019, "FixRes"). Counted like
# the rest: the network's FLOPs at each smaller size.
TUNE_MIN_SIZE = 128
# Never below this, at any size: EfficientNet's five stride-2 stages leave a 2x2 map at 64 px.
FLOOR_SIZE = 64
# However large the budget: more epochs at these rates gained nothing on the dev sets at 64 px (a doubled
# budget's 24 epochs were no better than 12 there, and one run diverged at epoch 19; at 128 px 24 paid on
# small images: choose_budget).
CEILING_EPOCHS = 30

# The reference machine's costs, in seconds (2 CPU cores, idle; docs/train.md): per image, a fixed part
# (decoding, augmentation, Python) and a part per GFLOP of the network's forward pass at the input size
# (counted by torch's FlopCounterMode). Fitted to the fine-tuning epochs of bears at 224 px (~55 s) and
# mnist/eurosat at 64 px (a sixth of it), the feature cache's ~6.3 s per view of bears on ONNX Runtime.
TRAIN_PER_IMAGE, TRAIN_PER_GFLOP = 0.005, 0.078  # one training image of fine-tuning (forward + backward)
VALID_SHARE = 1 / 3  # a validation image: a forward pass in eval mode
CACHE_PER_IMAGE, CACHE_PER_GFLOP = 0.0015, 0.0065  # one image through the frozen body (feature cache)
DECODE_PER_IMAGE = 0.0013  # decoding once into memory
NO_CACHE_SHARE = 0.6  # a frozen epoch without the cache, against a fine-tuning epoch (138 s / 4 vs 55 s)
RESERVE = 8.0  # what follows training: the report pass, the model file, its ONNX export
# Without --time-limit the wall clock stops fine-tuning only past this multiple of --budget (a safety cap).
TIME_LIMIT_FACTOR = 4.0


class FineTune(str, enum.Enum):
    """How the fine-tuning decision was made (recipe.json's ``fine_tune``)."""

    UNDECIDED = "undecided"
    GIVEN = "given"  # --unfreeze-epochs N: the lesson's recipe as asked
    REPLAYED = "replayed"  # --config RUN: that run's decision
    BUDGET_ZERO = "budget_zero"  # --budget 0: the frozen stage only
    NO_ERROR = "no_error"  # no validation error to judge by
    GOOD_ENOUGH = "good_enough"  # within a picture of GOOD_ENOUGH, its error's bound at most GOOD_ENOUGH_BOUND
    BUDGET_SPENT = "budget_spent"  # the frozen stage counted as the whole budget
    TOO_FEW_FIT = "too_few_fit"  # fewer than MIN_EPOCHS fit what is left
    PLANNED = "planned"  # n epochs fit and may pay


class Stop(str, enum.Enum):
    """Why fine-tuning ended before its planned epochs (recipe.json's ``stopped``)."""

    TIME_LIMIT = "time_limit"  # the wall-clock safety cap cut the run: it is marked as cut
    DIVERGED = "diverged"  # the loss blew up; the best weights so far are kept


@dataclass(frozen=True)
class Work:
    """What the run costs, counted from the data and the network (never timed), in reference seconds."""

    gflops: float  # forward GFLOPs of one image at the fine-tuning size
    frozen_gflops: float  # the same at the frozen stage's size
    n_train: int
    n_valid: int
    frozen_epochs: int
    views: int  # augmented views in the feature cache (0: no cache, the body runs every frozen epoch)
    ranks: int = 1  # processes sharing the work (torchrun)

    @property
    def epoch_seconds(self) -> float:
        """One fine-tuning epoch: every training image forward and backward, the validation images forward (at the
        frozen stage's size, which the model keeps: fine-tuning may train at a smaller one)."""
        each, valid = (TRAIN_PER_IMAGE + TRAIN_PER_GFLOP * g for g in (self.gflops, self.frozen_gflops))
        return (each * self.n_train + valid * VALID_SHARE * self.n_valid) / self.ranks

    @property
    def frozen_seconds(self) -> float:
        """Decoding once, then the frozen stage: the body over each cached view (or every epoch without the cache)."""
        decode = DECODE_PER_IMAGE * (self.n_train + self.n_valid)
        if self.views == 0:
            frozen_epoch = Work(self.frozen_gflops, self.frozen_gflops, self.n_train, self.n_valid, 0, 0, self.ranks)
            return decode + NO_CACHE_SHARE * frozen_epoch.epoch_seconds * self.frozen_epochs
        each = CACHE_PER_IMAGE + CACHE_PER_GFLOP * self.frozen_gflops
        return decode + each * (self.views * self.n_train + self.n_valid) / self.ranks

    @classmethod
    def from_json(cls, d: dict) -> "Work":
        """Back from to_json() (recipe.json, a checkpoint): the inputs only, the costs are recomputed."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_json(self) -> dict:
        return {**asdict(self), "epoch_seconds": round(self.epoch_seconds, 3),
                "frozen_seconds": round(self.frozen_seconds, 3), "reserve_seconds": RESERVE}


@dataclass
class Plan:
    """What the recipe decided and why, in the order it decided it (recipe.json)."""

    size: int
    size_why: str
    flips: str
    flips_why: str
    budget: float  # reference seconds (counted); the wall clock only caps at time_limit
    budget_why: str = "--budget"
    fine_tune_epochs: int = 0
    fine_tune_why: str = "not decided yet"
    fine_tune: FineTune = FineTune.UNDECIDED  # how it was decided (data; the why is its words)
    tune_size: int | None = None  # fine-tuning trains at this smaller size (smaller_tune_size): None, the input size
    balance: str = "none"  # lopsided classes: the remedy (training/balance.py), or none
    balance_why: str = ""
    probe: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)  # Work.to_json(): the counted inputs of the decision
    planned_seconds: float | None = None  # reference seconds the plan adds up to
    time_limit: float | None = None  # wall seconds after which fine-tuning is cut (safety cap)
    stopped: Stop | None = None  # fine-tuning ended before its planned epochs, and why
    epochs_done: int = 0  # fine-tuning epochs that ran
    kept_epoch: int | None = None  # the epoch whose weights the model file holds, when not the last
    seconds: float | None = None  # the one time figure: wall seconds from start to the end of training
    honest: dict = field(default_factory=dict)  # the kept error and its selection-corrected figure (honest.py)
    compare: dict = field(default_factory=dict)  # after --config RUN: validation pictures changed since (compare.py)
    wrong: list = field(default_factory=list)  # validation pictures the kept model gets wrong (a retrain compares)
    pixels: str = "memory"  # decoded pixels kept in memory, or decoded per batch ("stream")
    run: dict = field(default_factory=dict)  # where it ran: device, ranks, resumed from (training/resume.py)
    refit: dict = field(default_factory=dict)  # --refit: the second fit on every picture (training/refit.py)

    @property
    def cut(self) -> bool:
        """The wall-clock cap cut fine-tuning short: this run is not the one the data and options decide."""
        return self.stopped is Stop.TIME_LIMIT

    def lines(self) -> list[str]:
        """The recipe in words, for the first lines of the run and the report."""
        return [f"input size {self.size} px: {self.size_why}", f"flips {self.flips}: {self.flips_why}",
                f"budget {self.budget:g} s: {self.budget_why}", f"balance {self.balance}: {self.balance_why}"]

    def to_json(self) -> dict:
        d = asdict(self)
        d["fine_tune"] = self.fine_tune.value
        d["stopped"] = self.stopped.value if self.stopped else None
        d["cut"] = self.cut
        return d

    def give_budget(self, budget: float, given_limit: float | None) -> None:
        """A budget given after the plan was made (the notebook's ``fine_tune(budget=)``): as --budget."""
        self.budget, self.budget_why = float(budget), "--budget"
        self.time_limit = time_limit(self.budget, given_limit)

    def restore(self, before: dict) -> None:
        """A stopped run's fine-tuning decision (from its checkpoint), to go on with it."""
        self.fine_tune_epochs, self.fine_tune_why = before["fine_tune_epochs"], before["fine_tune_why"]
        self.fine_tune = FineTune(before.get("fine_tune", FineTune.PLANNED.value))
        self.tune_size = before.get("tune_size")
        self.work, self.planned_seconds = before.get("work") or {}, before.get("planned_seconds")

    def advice(self, rows: list[dict], kept: dict | None, last: bool = False) -> str | None:
        """What fine-tuning did or would do here, in a sentence for advice.txt and the report.

        ``last``: --epoch-kept last, so the model file holds the last epoch unless a divergence forced ``kept``."""
        frozen = [r for r in rows if r["stage"] == "frozen"]
        tuned = [r for r in rows if r["stage"] == "unfrozen"]
        if not frozen:
            return None
        f_err = min(r["error_rate"] for r in frozen)
        if not tuned:
            if self.fine_tune in (FineTune.BUDGET_SPENT, FineTune.TOO_FEW_FIT):
                return (f"Fine-tuning might lower the error ({f_err:.1%} with the frozen body) but did not fit the "
                        f"budget: --budget {suggest_budget(self):.0f} lets it try"
                        + (" (its last epoch is kept, --epoch-kept last)." if last else " (the epoch kept is chosen "
                           "on validation images, and the report gives the error corrected for that choice)."))
            return None
        t_err = min(r["error_rate"] for r in tuned)
        if last and kept is None:  # the model file holds the schedule's end, whatever the best epoch was
            return (f"Fine-tuning {'paid' if tuned[-1]['error_rate'] < f_err else 'did not pay here'}: "
                    f"{tuned[-1]['error_rate']:.1%} error at the last epoch, which the model file holds "
                    f"(--epoch-kept last; {t_err:.1%} at best), against {f_err:.1%} at best with the frozen body.")
        if t_err < f_err:
            return (f"Fine-tuning paid: the error went from {f_err:.1%} (frozen body) to {t_err:.1%}"
                    + (f"; the model file holds the best epoch's weights (epoch {kept['epoch']})." if kept else "."))
        return (f"Fine-tuning did not pay here: {t_err:.1%} error at best against {f_err:.1%} with the frozen body"
                + (f"; the model file holds the frozen stage's best weights (epoch {kept['epoch']})."
                   if kept and kept["stage"] == "frozen" else "."))


def choose_size(probe: ImageProbe, arch_size: int, given: int | None) -> tuple[int, str]:
    """The input size: given, the network's own for photos near it, else the images' own (at least MIN_SIZE)."""
    if given is not None:
        return given, "--size"
    if probe.n == 0 or probe.median_short >= NATIVE_SHARE * arch_size:
        return arch_size, f"the network's own size (images are {probe.median_short} px on the short side)"
    own = 32 * math.ceil(probe.median_short / 32)
    size = max(MIN_SIZE, own)
    if size > own:
        return size, (f"the images are {probe.median_short} px on the short side: upsampled to {size} px, where the "
                      f"network's deeper layers still see a {size // 32}x{size // 32} map, at "
                      f"{(size / arch_size) ** 2:.0%} of the compute of its own {arch_size} px")
    return size, (f"the images are {probe.median_short} px on the short side: upsampling them to {arch_size} "
                  f"would cost {(arch_size / size) ** 2:.0f}x the compute and add no detail")


def choose_flips(probe: ImageProbe, given: str | None) -> tuple[str, str]:
    """Flips as augmentation: none for grayscale symbols, horizontal for everything else (--flips all for no "up")."""
    if given is not None and given != "auto":
        return given, "--flips"
    if probe.n and probe.grayscale >= GREY_SHARE:
        return "none", (f"{probe.grayscale:.0%} of the images are grayscale (digits, text, scans?), where a mirror "
                        "image can be another class; --flips horizontal to turn them on")
    return "horizontal", ("photos keep their class in a mirror; --flips all adds vertical flips and quarter turns "
                          "for images with no 'up' (satellite, microscopy), --flips none for symbols")


def choose_budget(probe: ImageProbe, size: int, given: float | None) -> tuple[float, str]:
    """The counted budget: given, else DEFAULT_BUDGET, or SMALL_IMAGE_BUDGET_FACTOR times it for small images
    upsampled to MIN_SIZE or less (their epochs are cheap and twice the fine-tuning paid on them)."""
    if given is not None:
        return float(given), "--budget"
    if probe.n and size <= MIN_SIZE and probe.median_short < size:
        budget = SMALL_IMAGE_BUDGET_FACTOR * DEFAULT_BUDGET
        return budget, (f"counted, not timed: small images ({probe.median_short} px, upsampled to {size}) get "
                        f"{SMALL_IMAGE_BUDGET_FACTOR}x the default {DEFAULT_BUDGET:g} s, up to {epoch_cap(budget)} "
                        "fine-tuning epochs (more fine-tuning paid on small images); --budget to change it")
    return DEFAULT_BUDGET, (f"counted, not timed: the default, up to {epoch_cap(DEFAULT_BUDGET)} fine-tuning epochs; "
                            "--budget to change it")


def epoch_cap(budget: float) -> int:
    """The most fine-tuning epochs a budget asks for: MAX_EPOCHS at the default, in proportion otherwise."""
    return min(CEILING_EPOCHS, max(MIN_EPOCHS, round(MAX_EPOCHS * budget / DEFAULT_BUDGET)))


def within_good_enough(frozen_error: float, n_valid: int) -> bool:
    """The frozen error is at most GOOD_ENOUGH, rounded up to whole validation pictures (one picture's grace)."""
    errors = round(frozen_error * n_valid)
    return errors <= math.ceil(GOOD_ENOUGH * n_valid - 1e-9)


def _bound(errors: int, n_valid: int) -> float:
    return error_upper_bound(errors, n_valid, GOOD_ENOUGH_CONFIDENCE)


def good_enough(frozen_error: float, n_valid: int, counted: bool = True) -> bool:
    """Within a picture of GOOD_ENOUGH, on enough validation pictures to show it (the bound at most GOOD_ENOUGH_BOUND).

    ``counted``: the error is a share of wrong pictures. Multi-label's (1 - macro F1) is not a count, so no binomial
    bound applies to it: the 2% line alone decides there.
    """
    if not within_good_enough(frozen_error, n_valid):
        return False
    return not counted or _bound(round(frozen_error * n_valid), n_valid) <= GOOD_ENOUGH_BOUND


def time_limit(budget: float, given: float | None) -> float:
    """Wall seconds after which the fine-tuning fit is cut: --time-limit, else TIME_LIMIT_FACTOR x --budget."""
    return given if given is not None else TIME_LIMIT_FACTOR * budget


def fine_tune_epochs(frozen_error: float, n_valid: int, work: Work | None, budget: float,
                     cap: int = MAX_EPOCHS, counted: bool = True) -> tuple[int, FineTune, str]:
    """How many epochs of fine-tuning fit the counted budget and are worth it (0 with the reason when none)."""
    if budget <= 0:
        return 0, FineTune.BUDGET_ZERO, "--budget 0: the frozen stage only"
    if not math.isfinite(frozen_error) or n_valid <= 0 or work is None:
        return 0, FineTune.NO_ERROR, "the frozen stage gave no validation error to judge by"
    errors = round(frozen_error * n_valid)
    if good_enough(frozen_error, n_valid, counted):
        shown = (f"{errors} of {n_valid} validation pictures, within a picture of {GOOD_ENOUGH:.0%}; at "
                 f"{GOOD_ENOUGH_CONFIDENCE:.0%} confidence at most {_bound(errors, n_valid):.1%}"
                 if counted else f"on {n_valid} validation pictures, within a picture of {GOOD_ENOUGH:.0%}")
        return 0, FineTune.GOOD_ENOUGH, (
            f"the frozen body already gets {frozen_error:.1%} error ({shown}): nothing left for fine-tuning to win; "
            "--unfreeze-epochs N to try anyway")
    before = work.frozen_seconds + RESERVE
    left = budget - before
    if left <= 0:
        return 0, FineTune.BUDGET_SPENT, (
            f"{frozen_leaves(frozen_error, n_valid)}, but the frozen stage counts as {before:.0f} of the "
            f"{budget:.0f} s of --budget: raise --budget to let fine-tuning try")
    each = work.epoch_seconds
    fit = int(left // max(each, 1e-9))
    if fit < MIN_EPOCHS:
        return 0, FineTune.TOO_FEW_FIT, (
            f"{frozen_leaves(frozen_error, n_valid)}, but the {left:.0f} s left of --budget fit {fit} "
            f"fine-tuning epoch(s) of {each:.0f} s counted (at least {MIN_EPOCHS} are needed): raise --budget "
            "to let it try")
    n = min(fit, cap)
    return n, FineTune.PLANNED, (
        f"{frozen_leaves(frozen_error, n_valid)}: {n} epochs of fine-tuning, {each:.1f} s each "
        f"counted, fit the {left:.0f} s left of --budget")


def frozen_leaves(frozen_error: float, n_valid: int) -> str:
    """What the frozen stage left, and, when it was within a picture of GOOD_ENOUGH, why that was not enough (only a
    counted error gets here within it: uncounted ones are good enough there)."""
    if not within_good_enough(frozen_error, n_valid):
        return f"the frozen body leaves {frozen_error:.1%} error"
    errors = round(frozen_error * n_valid)
    return (f"the frozen body gets {frozen_error:.1%} error ({errors} of {n_valid} validation pictures), too few "
            f"pictures to call it good enough (at {GOOD_ENOUGH_CONFIDENCE:.0%} confidence its error may be up to "
            f"{_bound(errors, n_valid):.1%}, over {GOOD_ENOUGH_BOUND:.0%})")


def smaller_tune_size(frozen_error: float, n_valid: int, work: Work, budget: float, size: int,
                      gflops_at: Callable[[int], float], cap: int = MAX_EPOCHS,
                      counted: bool = True) -> tuple[int, int, str, Work] | None:
    """Where too few epochs fit at ``size``: the largest smaller size where MIN_EPOCHS fit (size, epochs, why, its
    counted work), or None.

    ``gflops_at(s)``: the network's forward GFLOPs at s px (counted), so the choice is counted like the rest.
    """
    # inputs of MIN_SIZE or less (small images, upsampled) may fine-tune down to half their size, never below FLOOR_SIZE
    floor = TUNE_MIN_SIZE if size > MIN_SIZE else max(FLOOR_SIZE, size // 2)
    for s in range(32 * ((size - 1) // 32), floor - 1, -32):
        smaller = replace(work, gflops=gflops_at(s))
        n, how, _ = fine_tune_epochs(frozen_error, n_valid, smaller, budget, cap, counted)
        if how is FineTune.PLANNED:
            left = budget - work.frozen_seconds - RESERVE
            return s, n, (f"{frozen_leaves(frozen_error, n_valid)}; at {size} px fewer than {MIN_EPOCHS} "
                          f"fine-tuning epochs fit the {left:.0f} s left of --budget, so it trains at {s} px: {n} "
                          f"epochs, {smaller.epoch_seconds:.1f} s each counted (validation and the model stay at "
                          f"{size} px)"), smaller
    return None


def suggest_budget(plan: Plan) -> float:
    """A --budget that fits MAX_EPOCHS of fine-tuning after the frozen stage (counted, as the plan counts)."""
    w = plan.work
    each = w.get("epoch_seconds", 0.0)
    before = w.get("frozen_seconds", 0.0) + RESERVE
    return 60 * math.ceil((before + each * MAX_EPOCHS) / 60)


def count_gflops(model, size: int) -> float:
    """Forward GFLOPs of one image through ``model`` at ``size`` px, counted by torch (convolutions, matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    modes = [m.training for m in model.modules()]
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        for m, t in zip(model.modules(), modes):
            m.training = t
    return counter.get_total_flops() / 1e9
