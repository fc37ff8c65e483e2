"""The default recipe's decisions, each with its reason: input size, flips, and how much fine-tuning.

``ursa train DATA`` looks at the images before training (``vision.probe``) and at the frozen
stage's result after it, and decides here; the reasons are printed in the first lines of the run,
saved as ``recipe.json`` and shown in the report. Every decision has an option that overrides it
(``--size``, ``--flips``, ``--unfreeze-epochs``, ``--budget``). The thresholds are measured, not
guessed: see docs/train.md for the evidence behind each.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ursa.training.config import DEFAULT_BUDGET
from ursa.training.learner import Learner
from ursa.training.optim import set_train_modes
from ursa.vision.probe import ImageProbe

# Smallest input size the recipe picks: EfficientNet's five stride-2 stages leave a 2x2 map at 64 px.
MIN_SIZE = 64
# Photos at least this share of the network's own size are used at its size (what its weights saw).
NATIVE_SHARE = 0.75
# Mostly grayscale images (digits, text, scans): mirrors can turn one class into another.
GREY_SHARE = 0.9
# The frozen stage's last epoch is already this good: nothing for fine-tuning to win. Above it the
# budget decides: on bears (0.026-0.037 frozen) one fine-tuning epoch at 224 px is ~55 s, which the
# default budget cannot fit three times, so the recipe stops after timing three batches.
GOOD_ENOUGH = 0.02
# Fine-tuning shorter than this does not finish a warm-up and an anneal. At most MAX_EPOCHS with the
# default budget (more gained little on the dev sets); a larger --budget raises the cap in proportion.
MIN_EPOCHS, MAX_EPOCHS = 3, 12
# However large the budget: more epochs at these rates gained nothing on the dev sets (a doubled
# budget's 24 epochs were no better than 12, and one run diverged at epoch 19).
CEILING_EPOCHS = 30


@dataclass
class Plan:
    """What the recipe decided and why, in the order it decided it."""

    size: int
    size_why: str
    flips: str
    flips_why: str
    budget: float
    fine_tune_epochs: int = 0
    fine_tune_why: str = "not decided yet"
    budget_short: bool = False  # fine-tuning would pay, but --budget did not fit it (advice: raise --budget)
    budget_stopped: bool = False  # --budget stopped fine-tuning before its planned epochs
    probe: dict = field(default_factory=dict)
    epoch_seconds: float | None = None  # measured cost of one fine-tuning epoch
    spent: float | None = None  # seconds the run had taken when fine-tuning was decided
    pixels: str = "memory"  # decoded pixels kept in memory, or decoded per batch ("stream")
    run: dict = field(default_factory=dict)  # where it ran: device, ranks, resumed from (training/resume.py)

    def lines(self) -> list[str]:
        """The recipe in words, for the first lines of the run and the report."""
        return [f"input size {self.size} px: {self.size_why}", f"flips {self.flips}: {self.flips_why}"]

    def decide_fine_tuning(self, decision: tuple[int, str], frozen_error: float) -> None:
        """Record ``fine_tune_epochs``' answer; a refusal on a finite error above GOOD_ENOUGH is the budget's."""
        self.fine_tune_epochs, self.fine_tune_why = decision
        self.budget_short = (decision[0] == 0 and math.isfinite(frozen_error)
                             and round(frozen_error, 6) > GOOD_ENOUGH)

    def to_json(self) -> dict:
        return asdict(self)

    def advice(self, rows: list[dict], kept: dict | None) -> str | None:
        """What fine-tuning did or would do here, in a sentence for advice.txt and the report."""
        frozen = [r for r in rows if r["stage"] == "frozen"]
        tuned = [r for r in rows if r["stage"] == "unfrozen"]
        if not frozen:
            return None
        f_err = min(r["error_rate"] for r in frozen)
        if not tuned:
            if self.budget_short:
                return (f"Fine-tuning might lower the error ({f_err:.1%} with the frozen body) but did not fit the "
                        f"budget: --budget {suggest_budget(self):.0f} lets it try (the best epoch is kept, so it "
                        "cannot end worse on the validation set).")
            return None
        t_err = min(r["error_rate"] for r in tuned)
        if t_err < f_err:
            return (f"Fine-tuning paid: the error went from {f_err:.1%} (frozen body) to {t_err:.1%}"
                    + (f"; the model file holds the best epoch's weights (epoch {kept['epoch']})." if kept else "."))
        return (f"Fine-tuning did not pay here: {t_err:.1%} error at best against {f_err:.1%} with the frozen body"
                + (f"; the model file holds the frozen stage's best weights (epoch {kept['epoch']})."
                   if kept and kept["stage"] == "frozen" else "."))


def choose_size(probe: ImageProbe, arch_size: int, given: int | None) -> tuple[int, str]:
    """The input size: given, the network's own for photos near it, else the images' own (at least 64 px)."""
    if given is not None:
        return given, "--size"
    if probe.n == 0 or probe.median_short >= NATIVE_SHARE * arch_size:
        return arch_size, f"the network's own size (images are {probe.median_short} px on the short side)"
    size = max(MIN_SIZE, 32 * math.ceil(probe.median_short / 32))
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


def epoch_cap(budget: float) -> int:
    """The most fine-tuning epochs a budget asks for: MAX_EPOCHS at the default, in proportion otherwise."""
    return min(CEILING_EPOCHS, max(MIN_EPOCHS, round(MAX_EPOCHS * budget / DEFAULT_BUDGET)))


def fine_tune_epochs(frozen_error: float, seconds_left: float, epoch_seconds: float,
                     cap: int = MAX_EPOCHS) -> tuple[int, str]:
    """How many epochs of fine-tuning fit the budget and are worth it (0 with the reason when none)."""
    if not math.isfinite(frozen_error):
        return 0, "the frozen stage gave no validation error to judge by"
    if round(frozen_error, 6) <= GOOD_ENOUGH:  # float32 error rates: 4/80 is 0.0500000007
        return 0, (f"the frozen body already gets {frozen_error:.1%} error (at most {GOOD_ENOUGH:.0%}): nothing "
                   "left for fine-tuning to win; --unfreeze-epochs N to try anyway")
    if seconds_left <= 0:
        return 0, (f"the frozen body leaves {frozen_error:.1%} error, but --budget is spent: raise --budget to let "
                   "fine-tuning try")
    fit = int(seconds_left // max(epoch_seconds, 1e-6))
    if fit < MIN_EPOCHS:
        return 0, (f"the frozen body leaves {frozen_error:.1%} error, but the {seconds_left:.0f} s left of --budget "
                   f"fit {fit} fine-tuning epoch(s) of ~{epoch_seconds:.0f} s (at least {MIN_EPOCHS} are needed): "
                   "raise --budget to let it try")
    n = min(fit, cap)
    return n, (f"the frozen body leaves {frozen_error:.1%} error: {n} epochs of fine-tuning, "
               f"~{epoch_seconds:.0f} s each, fit the {seconds_left:.0f} s left of --budget")


def suggest_budget(plan: Plan) -> float:
    """A --budget that fits MAX_EPOCHS of fine-tuning after what this run spent before it (and the run's writing)."""
    each = plan.epoch_seconds or 0.0
    before = max(plan.spent or 0.0, 0.0) + 10.0
    return 60 * math.ceil((before + each * MAX_EPOCHS) / 60)


def epoch_seconds(learn: Learner, size: int | None = None, bf16: bool = False, batches: int = 2) -> float:
    """Seconds one fine-tuning epoch will take here, timed on a few real batches (the weights are left as they were).

    Forward and backward of the whole network on augmented images, per image, times the training
    set, plus the validation pass (a forward in eval mode: about a third of a training step).
    """
    model, dls = learn.model, learn.dls
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dl = dls.loader(dls.dataset.train_idx, train=learn.config.augment, size=size, shuffle=False)
    per_image: list[float] = []
    with torch.random.fork_rng(devices=[]):
        set_train_modes(model, False, learn.config.cache, learn.config.bn_stats_frozen)
        t = start = time.perf_counter()
        first = 0.0
        for i, (xb, yb) in enumerate(dl):
            xb, yb = xb.to(learn.device, non_blocking=True), yb.to(learn.device, non_blocking=True)
            with learn.autocast(bf16):
                loss = learn.loss_func(model(xb).float(), yb)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if learn.device.type == "cuda":
                torch.cuda.synchronize(learn.device)  # time the work, not its queueing
            now = time.perf_counter()
            if i > 0:  # the first batch pays for warm-up (allocations, kernel choice)
                per_image.append((now - t) / len(xb))
            else:
                first = (now - start) / len(xb)
            t = now
            if i >= batches:
                break
    model.load_state_dict(state)
    each = sum(per_image) / len(per_image) if per_image else first  # a one-batch set: its only batch, warm-up and all
    n_train, n_valid = len(dls.dataset.train_idx), len(dls.dataset.valid_idx)
    return each * (n_train + n_valid / 3) / learn.dist.world  # under torchrun each rank does its share
