"""The lesson's four failure modes, read off a training history and said in plain words.

- learning rate too high: the loss diverges (NaN/inf, valid loss 10x its best, or the training
  loss shooting up past where it started);
- learning rate too low: the training loss barely moves;
- too few epochs (underfitting): the loss is still falling fast at the end, or the training
  loss sits above the validation loss;
- too many epochs: the error rate has been getting worse for 2+ epochs after its best.

Each rule is a small pure function ``History -> Advice | None``; ``RULES`` lists them as data so
a report can show which fired. During training, ``ursa.training.callbacks`` applies them: the
``DivergenceGuard`` stops a diverging run (``DivergedError``, exit 3) with the ``diverged`` rule's
words, and the ``AdvicePrinter`` says "too many epochs" at the end of the fit where it shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ursa.util.files import atomic_write_text
from ursa.util.numbers import smooth

# Thresholds, named so tests and docs can refer to them.
VALID_BLOWUP = 10.0  # valid loss this many times its best so far: diverged (as the learner checks)
VALID_FLOOR = 0.1  # a valid loss under this (the true class at ~90% on average) is never divergence, whatever its ratio
# ...nor a valid loss that jumps while the error rate stays within this of its best: one picture turned confidently
# wrong on a near-perfect model (cc0_textures, issue 28's benchmark: loss 0.0005 -> 0.87, error 0 -> 1 picture) is
# overconfidence the next epochs anneal (and the best epoch is kept), not a learning rate that broke the model
VALID_ERROR_RISE = 0.1
VALID_BROKEN = 2.0  # ...unless the loss is over this (above a uniform guess over 7 classes): the model is broken
# whatever its error says (a collapse to the majority class keeps a lopsided set's error low)
VALID_MIN = 10  # on fewer validation pictures the valid loss is one or two pictures' loss: no divergence is read from
# it (a studio project of 32 pictures, 2 for validation: one confidently wrong picture took it over VALID_BROKEN);
# NaN, and the training loss (every training picture) still are
TRAIN_BLOWUP = 4.0  # smoothed train loss this many times its minimum (and above its start): diverged
LOW_LR_DROP = 0.2  # the train loss fell by less than this fraction over the whole run: LR too low
STILL_FALLING = 0.1  # valid loss fell by more than this fraction in the last epoch: train longer
TRAIN_ABOVE_VALID = 1.1  # final train loss above this multiple of valid loss: underfitting
RISING_EPOCHS = 2  # epochs of error above its best before "too many epochs" fires


@dataclass
class History:
    """What the rules read: one row per epoch plus the per-batch train loss and LR."""

    rows: list[dict]
    batch_losses: list[float] = field(default_factory=list)
    batch_epochs: list[float] = field(default_factory=list)
    batch_lrs: list[float] = field(default_factory=list)
    stopped_diverged: bool = False  # the learner itself stopped the run as diverging
    stage: str | None = None  # the stage running when the history was taken (its epoch may have no row yet)
    n_valid: int | None = None  # validation pictures per row's figures (None: not known, e.g. read from history.csv)

    @classmethod
    def read_csv(cls, path: str | Path) -> "History":
        """Rows from a run folder's history.csv (no batch losses: rules fall back to epoch values)."""
        import csv

        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                row: dict = {k: _num(v) for k, v in r.items()}
                row["epoch"], row["stage"] = int(row["epoch"]), str(r["stage"])
                rows.append(row)
        return cls(rows)


def _num(v: str) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


@dataclass(frozen=True)
class Advice:
    """One finding: which rule, a short title, and what it means and what to do, in plain words."""

    rule: str
    title: str
    message: str
    severity: str = "warning"  # "error": the run failed; "warning": worth acting on
    epoch: int | None = None  # the epoch the finding points at (best epoch, or where it diverged)

    def text(self) -> str:
        """One paragraph for the terminal and advice.txt: the headline, then the evidence and what to do."""
        return f"{self.title}. {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


# --- helpers -----------------------------------------------------------------------------------


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _train_curve(h: History) -> tuple[list[float], list[float]]:
    """(smoothed train loss, epoch position) per batch, or per epoch when there are no batches."""
    if h.batch_losses:
        xs = h.batch_epochs if len(h.batch_epochs) == len(h.batch_losses) else list(range(len(h.batch_losses)))
        return smooth(h.batch_losses), list(xs)
    return [r["train_loss"] for r in h.rows], [r["epoch"] + 1 for r in h.rows]


def _stage_at(h: History, pos: float) -> str | None:
    """Stage of the epoch containing fractional epoch position pos (batch positions end at e + 1)."""
    e = max(0, math.ceil(pos) - 1)
    for r in h.rows:
        if r["epoch"] == e:
            return r["stage"]
    return None


def _peak_lr(h: History, stage: str | None) -> float | None:
    """Highest learning rate reached by the batches of this stage (the head's, as recorded)."""
    if not h.batch_lrs:
        return None
    epochs = {r["epoch"] for r in h.rows if r["stage"] == stage} if stage else set()
    lrs = [lr for lr, pos in zip(h.batch_lrs, h.batch_epochs) if not epochs or max(0, math.ceil(pos) - 1) in epochs]
    lrs = [v for v in lrs if _finite(v)]
    return max(lrs) if lrs else None


def _lower_lr_hint(h: History, stage: str | None) -> str:
    """Concrete flag to try: 10x below what was used in the stage that failed."""
    peak = _peak_lr(h, stage)
    if stage == "unfrozen":
        if peak:
            return f"--unfreeze-lr {peak / 100:.1g},{peak / 10:.1g}"
        return "--unfreeze-lr 10x lower"
    if peak:
        return f"--lr {peak / 10:.1g}"
    return "--lr 10x lower"


# --- the rules ---------------------------------------------------------------------------------


def diverged(h: History) -> Advice | None:
    """Learning rate too high: NaN/inf loss, valid loss 10x its best (and over VALID_FLOOR), or the train loss blowing up."""
    where: tuple[str, float] | None = None  # (what happened, epoch position)
    for loss, pos in zip(h.batch_losses, h.batch_epochs or range(len(h.batch_losses))):
        if not _finite(loss):
            where = (f"the training loss became {loss}", pos)
            break
    if where is None:
        best, best_err = math.inf, math.inf
        few = h.n_valid is not None and h.n_valid < VALID_MIN
        for r in h.rows:
            v, err = r["valid_loss"], r.get("error_rate")
            if not _finite(v):
                where = (f"the validation loss became {v}", r["epoch"] + 1)
                break
            if few:
                continue
            worse = (not _finite(err) or not math.isfinite(best_err) or err > best_err + VALID_ERROR_RISE
                     or v > VALID_BROKEN)
            if math.isfinite(best) and v > VALID_BLOWUP * best and v > VALID_FLOOR and worse:
                where = (f"the validation loss jumped to {v:.3g}, over {VALID_BLOWUP:.0f}x its best ({best:.3g})",
                         r["epoch"] + 1)
                break
            best = min(best, v)
            if _finite(err):
                best_err = min(best_err, err)
    if where is None:
        curve, xs = _train_curve(h)
        if curve:
            start = next((v for v in curve if _finite(v)), math.inf)  # the first loss: a fresh head's guess
            low = math.inf
            for v, pos in zip(curve, xs):
                if _finite(v) and math.isfinite(low) and v > TRAIN_BLOWUP * low and v > start:
                    where = (f"the training loss shot up to {v:.3g} (its minimum was {low:.3g}, it started at "
                             f"{start:.3g})", pos)
                    break
                if _finite(v):
                    low = min(low, v)
    if where is None and h.stopped_diverged:
        where = ("training was stopped because the loss diverged", h.batch_epochs[-1] if h.batch_epochs else 0)
    if where is None:
        return None
    what, pos = where
    stage = _stage_at(h, pos) or h.stage or (h.rows[-1]["stage"] if h.rows else None)
    epoch = max(0, math.ceil(pos) - 1)
    stage_txt = f" during the {stage} stage" if stage else ""
    return Advice(
        "diverged", "learning rate too high",
        f"Training diverged ({what} at epoch {epoch}{stage_txt}). Try 10x lower ({_lower_lr_hint(h, stage)}), "
        "or run `ursa lr-find` for a suggestion.",
        "error", epoch,
    )


def lr_too_low(h: History) -> Advice | None:
    """Learning rate too low: over the whole run the training loss barely moved."""
    raw = [v for v in (h.batch_losses or [r["train_loss"] for r in h.rows]) if _finite(v)]
    if len(raw) < (10 if h.batch_losses else 2):
        return None
    k = max(1, len(raw) // 10) if h.batch_losses else 1
    start, end = sum(raw[:k]) / k, sum(raw[-k:]) / k
    if start <= 0 or end < 0.2:  # already low: nothing to gain
        return None
    if (1 - LOW_LR_DROP) * start < end < (1 + LOW_LR_DROP) * start:
        peak = _peak_lr(h, h.rows[-1]["stage"] if h.rows else None)
        hint = f" with the learning rate peaking at {peak:.1e}" if peak else ""
        return Advice(
            "lr_too_low", "learning rate too low",
            f"The training loss barely moved, from {start:.3f} to {end:.3f}{hint}. Raise it (try 10x, or the "
            "`ursa lr-find` suggestion); training longer helps too, but slowly.",
            "warning", None,
        )
    return None


def too_few_epochs(h: History) -> Advice | None:
    """Too few epochs: valid loss still falling fast at the end, or train loss above valid loss."""
    rows = [r for r in h.rows if _finite(r["valid_loss"]) and _finite(r["train_loss"])]
    if not rows:
        return None
    last = rows[-1]
    best_valid = min(r["valid_loss"] for r in rows)
    reason = None
    if len(rows) >= 2:
        prev = rows[-2]["valid_loss"]
        if prev > 0 and last["valid_loss"] < (1 - STILL_FALLING) * prev:
            reason = (f"the validation loss was still falling fast in the last epoch ({prev:.3f} -> "
                      f"{last['valid_loss']:.3f}, -{100 * (1 - last['valid_loss'] / prev):.0f}%)")
    # Train above valid only means underfitting while valid is still improving: once it has stopped,
    # the gap is dropout and augmentation at work, not a model that needs more training.
    if reason is None and last["train_loss"] > TRAIN_ABOVE_VALID * last["valid_loss"] \
            and last["valid_loss"] <= best_valid:
        reason = (f"the training loss ({last['train_loss']:.3f}) is above the validation loss "
                  f"({last['valid_loss']:.3f}) at the last epoch")
    if reason is None:
        return None
    flag = "--unfreeze-epochs" if last["stage"] == "unfrozen" else "--epochs"
    return Advice(
        "too_few_epochs", "underfitting: train longer or raise the learning rate",
        f"{reason[0].upper()}{reason[1:]}. Try more {flag}.",
        "warning", last["epoch"],
    )


def too_many_epochs(h: History) -> Advice | None:
    """Too many epochs: the error rate has been above its best for the last 2+ epochs."""
    rows = [r for r in h.rows if _finite(r["error_rate"])]
    if len(rows) < RISING_EPOCHS + 1:
        return None
    errs = [r["error_rate"] for r in rows]
    best = min(errs)
    b = max(i for i, e in enumerate(errs) if e == best)  # the last epoch at its best
    after = errs[b + 1:]
    if len(after) < RISING_EPOCHS or min(after) <= best:
        return None
    r = rows[b]
    n_frozen = sum(1 for x in h.rows if x["stage"] == "frozen")
    if r["stage"] == "frozen":
        retrain = f"--epochs {r['epoch'] + 1} --unfreeze-epochs 0"
    else:
        retrain = f"--unfreeze-epochs {r['epoch'] + 1 - n_frozen}"
    return Advice(
        "too_many_epochs", "error is getting worse: fewer epochs, more data, or regularisation",
        f"The error rate was best at epoch {r['epoch']} ({best:.4f}) and has been higher for the {len(after)} "
        f"epochs since (now {errs[-1]:.4f}): too many epochs. Retrain with {retrain}.",
        "warning", r["epoch"],
    )


Rule = Callable[[History], "Advice | None"]

# The rules as data: (name, function), in the order they are reported.
RULES: list[tuple[str, Rule]] = [
    ("diverged", diverged),
    ("lr_too_low", lr_too_low),
    ("too_few_epochs", too_few_epochs),
    ("too_many_epochs", too_many_epochs),
]

# What each rule checks, in words, for the report's checklist.
RULE_DESCRIPTIONS = {
    "diverged": "learning rate too high: loss NaN/inf, valid loss 10x its best, or train loss blowing up",
    "lr_too_low": "learning rate too low: the training loss barely moved",
    "too_few_epochs": "too few epochs: loss still falling fast at the end, or train loss above valid loss",
    "too_many_epochs": "too many epochs: error rate above its best for 2+ epochs",
}

# Rules that make sense mid-run (the others describe how training ended).
DURING_TRAINING = ("diverged", "too_many_epochs")


def check(h: History, rules: Sequence[tuple[str, Rule]] = RULES) -> list[tuple[str, Advice | None]]:
    """Every rule's verdict, fired or not (None), in order."""
    return [(name, fn(h)) for name, fn in rules]


def advise(h: History, rules: Sequence[tuple[str, Rule]] = RULES) -> list[Advice]:
    """The advice to act on: a divergence alone (the other rules misread a diverged run), else all that fired."""
    found = [a for _, a in check(h, rules) if a is not None]
    bad = [a for a in found if a.rule == "diverged"]
    return bad or found


def summary_line(h: History) -> str:
    """How the run ended, one line (final and best error rate)."""
    rows = [r for r in h.rows if _finite(r["error_rate"])]
    if not rows:
        return "no epoch finished"
    last = rows[-1]
    best_err = min(r["error_rate"] for r in rows)
    best = [r for r in rows if r["error_rate"] == best_err][-1]  # the latest epoch at its best, as the rules read it
    return (f"final error rate {last['error_rate']:.4f} (accuracy {1 - last['error_rate']:.4f}), valid loss "
            f"{last['valid_loss']:.4f} after {len(h.rows)} epoch(s); best error rate {best['error_rate']:.4f} at "
            f"epoch {best['epoch']}")


def format_advice(advice: Sequence[Advice], h: History, notes: Sequence[str] = ()) -> str:
    """advice.txt: how the run ended, each finding in plain words, then the checklist."""
    lines = ["ursa advice", "", summary_line(h), ""]
    if advice:
        for a in advice:
            lines.append(f"[{a.severity}] {a.text()}")
    else:
        lines.append("[ok] no failure mode detected: the loss fell, and the error rate did not get worse at the end.")
    lines += [f"  {n}" for n in notes]
    lines += ["", "rules checked:"]
    fired = {a.rule for a in advice}
    for name, _ in RULES:
        lines.append(f"  [{'x' if name in fired else ' '}] {name}: {RULE_DESCRIPTIONS[name]}")
    return "\n".join(lines) + "\n"


def write_advice(path: str | Path, advice: Sequence[Advice], h: History, notes: Sequence[str] = ()) -> Path:
    """Write advice.txt atomically (the companion of history.csv)."""
    atomic_write_text(path, format_advice(advice, h, notes))
    return Path(path)
