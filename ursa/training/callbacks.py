"""Callbacks: everything the training loop does besides forward, backward and step.

The loop (``Learner.run``) fires named events, fastai's: ``before_fit``, ``before_epoch``,
``before_batch``, ``after_loss``, ``after_step``, ``after_batch``, ``after_epoch``, ``after_fit``
(and ``after_cancel_batch/epoch/fit`` when a callback raises the matching cancel exception).
Callbacks run in ``order``; each method receives the learner. ``after_fit`` always runs, also
when an error stops the fit, so a callback can clean up there.

The learner always has: ``ProgressCallback`` (bar with rate and ETA), ``Recorder`` (per-batch
loss and LR, one row per epoch), ``EpochTable`` (fastai's table), ``DivergenceGuard`` (the one
owner of "diverged"), ``BestWeights`` (the one owner of "best epoch") and ``AdvicePrinter``
(says a failure mode as soon as it shows).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from ursa.diagnose.advice import DURING_TRAINING, RULES, History, advise, diverged
from ursa.errors import DivergedError
from ursa.util.files import csv_text
from ursa.util.numbers import smooth_last
from ursa.util.progress import progress_bar

if TYPE_CHECKING:  # a callback only ever receives the learner
    from rich.progress import Progress

METRIC_KEYS = ("valid_loss", "error_rate", "accuracy", "balanced_error")  # an epoch's figures in the model file


def metric_values(row: dict) -> dict[str, float]:
    """An epoch row's figures for a model file's ``metrics``: those it has, finite (multi-label has no balanced error)."""
    return {k: row[k] for k in METRIC_KEYS if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}


HISTORY_COLUMNS = ["epoch", "stage", "train_loss", "valid_loss", "error_rate", "accuracy", "balanced_error", "seconds"]


class CancelBatchException(Exception):
    """Skip the rest of this batch (no step); after_cancel_batch, then after_batch, fire."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch; after_cancel_epoch, then after_epoch, fire."""


class CancelFitException(Exception):
    """End the fit now (the message, if any, is shown as the reason); after_cancel_fit, then after_fit, fire."""


# Every event the loop fires (fastai's ``_events``): a callback method named like an event but not
# one of these (``after_epcoh``) would silently never run, so defining one is an error.
EVENTS = ("before_fit", "before_epoch", "before_batch", "after_loss", "after_step", "after_batch",
          "after_cancel_batch", "after_cancel_epoch", "after_epoch", "after_cancel_fit", "after_fit")
EVENT_PREFIXES = ("before_", "after_")


def unknown_events(cls: type) -> list[str]:
    """Public methods of a callback class named like an event (before_*/after_*) that no event calls."""
    return sorted(name for name in dir(cls) if name.startswith(EVENT_PREFIXES) and name not in EVENTS
                  and callable(getattr(cls, name, None)))


class Callback:
    """Base class: override the events you need (``EVENTS``); lower ``order`` runs first.

    A method named like an event that is not one (a typo: ``after_epcoh``) is refused when the
    class is defined (TypeError), and again when a learner gets the callback.
    """

    order = 50

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = unknown_events(cls)
        if bad:
            raise TypeError(f"{cls.__name__}: {', '.join(bad)} is not an event the training loop fires; "
                            f"expected one of {', '.join(EVENTS)}")

    def __call__(self, event: str, learn: Any) -> None:
        method = getattr(self, event, None)
        if method is not None:
            method(learn)


def check_callbacks(cbs: Any) -> None:
    """Refuse callbacks that are not Callbacks or carry a method named like an unknown event (TypeError)."""
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"expected a Callback, got {type(cb).__name__}")
        bad = [n for n in vars(cb) if n.startswith(EVENT_PREFIXES) and n not in EVENTS and callable(vars(cb)[n])]
        bad += unknown_events(type(cb))
        if bad:
            raise TypeError(f"{type(cb).__name__}: {', '.join(sorted(set(bad)))} is not an event the training loop "
                            f"fires; expected one of {', '.join(EVENTS)}")


class ProgressCallback(Callback):
    """A progress bar per epoch, with the loss, rate and ETA; nothing when quiet."""

    order = 0

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: Any = None
        self.desc = ""

    def before_epoch(self, learn: Any) -> None:
        self.close()
        self.bar = progress_bar(learn.console, learn.config.quiet)
        self.bar.start()
        self.desc = f"{learn.stage} epoch {learn.epoch_in_fit + 1}/{learn.n_epoch}"
        self.task = self.bar.add_task(self.desc, total=learn.n_iter)

    def after_batch(self, learn: Any) -> None:
        if self.bar is not None and not learn.batch_cancelled:
            self.bar.update(self.task, advance=1, description=f"{self.desc} loss {learn.loss_value:.3f}")

    def after_epoch(self, learn: Any) -> None:
        self.close()

    def after_fit(self, learn: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Recorder(Callback):
    """Everything a plot or a failure-mode rule needs: per-batch loss and LR, per-epoch rows."""

    order = 10

    def __init__(self, rows: list[dict] | None = None) -> None:
        self.batch_losses: list[float] = []
        self.batch_lrs: list[float] = []
        self.batch_epochs: list[float] = []  # fractional epoch of each batch
        self.rows: list[dict] = list(rows or [])
        self.epoch_losses: list[float] = []
        self.t0 = 0.0
        self.n_valid: int | None = None  # validation pictures behind each row (set when a fit starts)

    def restore(self, rows: list[dict], batch_losses: list, batch_lrs: list, batch_epochs: list) -> None:
        """The history as a checkpoint saved it (``--resume``): the recorder owns its lists, so it sets them."""
        self.rows[:] = [dict(r) for r in rows]
        self.batch_losses[:], self.batch_lrs[:], self.batch_epochs[:] = batch_losses, batch_lrs, batch_epochs

    def before_fit(self, learn: Any) -> None:
        ds = getattr(learn.dls, "dataset", None)  # a bare batch source (tests, the SGD demo) has none: not known
        self.n_valid = len(ds.valid_idx) if ds is not None else None

    def before_epoch(self, learn: Any) -> None:
        self.epoch_losses, self.t0 = [], time.perf_counter()

    def after_batch(self, learn: Any) -> None:
        if learn.batch_cancelled:
            return
        self.batch_losses.append(learn.loss_value)
        self.batch_lrs.append(learn.lr)
        self.batch_epochs.append(learn.epoch + (learn.iter + 1) / learn.n_iter)
        self.epoch_losses.append(learn.loss_value)

    def after_epoch(self, learn: Any) -> None:
        valid_loss, err, acc, *rest = learn.metrics  # a batch source of before: no balanced error
        bal, more = (rest[0], rest[1:]) if rest else (math.nan, [])
        self.rows.append({
            "epoch": learn.epoch, "stage": learn.stage, "train_loss": smooth_last(self.epoch_losses),
            "valid_loss": valid_loss, "error_rate": err, "accuracy": acc, "balanced_error": bal,
            "seconds": time.perf_counter() - self.t0,
            **dict(zip(task_columns(learn), more)),  # a task's own columns (training.task: multi-label's F1s, mAP)
        })

    def history(self, diverged: bool = False, stage: str | None = None) -> History:
        """A snapshot for the failure-mode rules (copies: later batches do not change it); stage: the one running."""
        return History([dict(r) for r in self.rows], list(self.batch_losses), list(self.batch_epochs),
                       list(self.batch_lrs), diverged, stage, self.n_valid)

    def history_csv(self) -> str:
        """history.csv text: epoch,stage,train_loss,valid_loss,error_rate,accuracy,balanced_error,seconds (then a task's own)."""
        cols = HISTORY_COLUMNS + [c for c in extra_columns(self.rows) if c not in HISTORY_COLUMNS]
        return csv_text(cols, [[_fmt_cell(r.get(c, math.nan)) for c in cols] for r in self.rows])


def task_columns(learn: Any) -> tuple[str, ...]:
    """The columns a learner's task adds to the epoch table (``training.task``; none for one class per picture)."""
    return tuple(getattr(getattr(learn, "task", None), "columns", ()))


def shows_balanced(learn: Any) -> bool:
    """Whether the epoch table has a balanced-error column (one class per picture; not for label sets)."""
    return bool(getattr(getattr(learn, "task", None), "balanced", True))


def extra_columns(rows: list[dict]) -> list[str]:
    """The task's own columns the rows hold (multi-label: macro_f1, samples_f1, map), in order."""
    return [c for c in (rows[0] if rows else {}) if c not in HISTORY_COLUMNS]


def _fmt_cell(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


class EpochTable(Callback):
    """fastai's epoch table: a header once, then one line per epoch."""

    order = 20

    def __init__(self) -> None:
        self.printed = False

    def before_fit(self, learn: Any) -> None:
        if not self.printed:
            more = "".join(f"  {c:>10}" for c in task_columns(learn))
            bal = f"  {'balanced':>8}" if shows_balanced(learn) else ""
            learn.console.print(f"{'epoch':>5}  {'stage':<8}  {'train_loss':>10}  {'valid_loss':>10}  "
                                f"{'error_rate':>10}  {'accuracy':>8}{bal}{more}  {'time':>6}", highlight=False)
            self.printed = True

    def after_epoch(self, learn: Any) -> None:
        r = learn.recorder.rows[-1]
        m, s = divmod(int(round(r["seconds"])), 60)
        more = "".join(f"  {r.get(c, math.nan):>10.4f}" for c in task_columns(learn))
        bal = f"  {r.get('balanced_error', math.nan):>8.4f}" if shows_balanced(learn) else ""
        learn.console.print(f"{r['epoch']:>5}  {r['stage']:<8}  {r['train_loss']:>10.4f}  {r['valid_loss']:>10.4f}  "
                            f"{r['error_rate']:>10.4f}  {r['accuracy']:>8.4f}{bal}{more}  {m:02d}:{s:02d}", highlight=False)


def _state(learn: Any) -> dict:
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


class DivergenceGuard(Callback):
    """The one owner of divergence: stops the run (DivergedError, exit 3) and puts back the last good weights.

    A non-finite batch loss stops at once; after each epoch the pure rule
    ``ursa.diagnose.advice.diverged`` reads the history (valid loss NaN or 10x its best, the
    training loss shooting up) and its words become the error message.
    """

    order = 30

    def __init__(self) -> None:
        self.last_good: dict | None = None

    def before_fit(self, learn: Any) -> None:
        self.last_good = _state(learn)  # diverging in the first epoch puts back the weights it started from

    def after_batch(self, learn: Any) -> None:
        if not learn.batch_cancelled and not math.isfinite(learn.loss_value):
            self.stop(learn)

    def after_epoch(self, learn: Any) -> None:
        if diverged(learn.recorder.history(stage=learn.stage)) is not None:
            self.stop(learn)
        self.last_good = _state(learn)

    def stop(self, learn: Any) -> None:
        found = diverged(learn.recorder.history(diverged=True, stage=learn.stage))
        if self.last_good is not None:
            learn.model.load_state_dict(self.last_good)  # keep the last good weights
        raise DivergedError(found.text() if found else "training diverged: try a 10x lower learning rate")


class BestWeights(Callback):
    """The one owner of "best epoch": keeps the weights with the lowest error rate (ties: valid loss)."""

    order = 40

    def __init__(self) -> None:
        self.state: dict | None = None
        self.epoch: int | None = None
        self.row: dict | None = None

    def restore(self, state: dict, epoch: int, row: dict) -> None:
        """The best epoch as a checkpoint saved it (``--resume``)."""
        self.state, self.epoch, self.row = state, epoch, dict(row)

    def beats(self, rows: list[dict]) -> bool:
        """Whether the best epoch has weights and fewer wrong pictures than the last of ``rows`` (the rule to keep it)."""
        return (self.state is not None and self.row is not None and bool(rows)
                and self.row["epoch"] != rows[-1]["epoch"] and self.row["error_rate"] < rows[-1]["error_rate"])

    def after_epoch(self, learn: Any) -> None:
        row = learn.recorder.rows[-1]
        key = (row["error_rate"], row["valid_loss"])
        if all(isinstance(v, float) and math.isfinite(v) for v in key) and (
                self.row is None or key < (self.row["error_rate"], self.row["valid_loss"])):
            self.state, self.epoch, self.row = _state(learn), row["epoch"], dict(row)


class AdvicePrinter(Callback):
    """Says a failure mode (too many epochs) once, at the end of the fit where the history shows it.

    Not before: a one-cycle schedule anneals in its last epochs, so an error that rose mid-cycle often falls again
    (bears, 3 fine-tuning epochs: 0.037 frozen, 0.053 and 0.048, then 0.032, the best)."""

    order = 60

    def __init__(self) -> None:
        self.rules = [r for r in RULES if r[0] in DURING_TRAINING and r[0] != "diverged"]
        self.said: set[str] = set()

    def after_epoch(self, learn: Any) -> None:
        if learn.epoch_in_fit + 1 < learn.n_epoch:  # epochs of this fit's schedule still to come
            return
        for a in advise(learn.recorder.history(), self.rules):
            if a.rule not in self.said:
                self.said.add(a.rule)
                learn.console.print(f"[yellow]advice:[/] {a.text()}", highlight=False)


class BudgetStop(Callback):
    """Ends a fit after the epoch that leaves too little time for another one before ``deadline`` (perf_counter).

    The default recipe's wall-clock safety cap (--time-limit): the plan itself is counted, not timed.
    """

    order = 70

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.t0 = 0.0
        self.longest = 0.0

    def before_epoch(self, learn: Any) -> None:
        self.t0 = time.perf_counter()

    def after_epoch(self, learn: Any) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.t0)
        over = learn.epoch_in_fit + 1 < learn.n_epoch and now + self.longest > self.deadline
        if learn.dist.agree([float(over)])[0]:  # rank 0's clock decides for all ranks
            raise CancelFitException(f"--time-limit (wall clock): no time for epoch {learn.epoch_in_fit + 2} of {learn.n_epoch}")


def default_callbacks() -> list[Callback]:
    """The callbacks every learner has, in order."""
    return [ProgressCallback(), Recorder(), EpochTable(), DivergenceGuard(), BestWeights(), AdvicePrinter()]
