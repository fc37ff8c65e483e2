"""``ursa train --refit``: once the first fit has chosen its epochs on the validation images, train again on all of them.

The first fit keeps a fifth of the pictures back to decide how long to fine-tune, which epoch to
keep, the calibration and the thresholds. The refit replays its decisions (input size, flips,
balance, the fine-tuning epochs and their size, the seed) on every picture, validation ones
included, and stops after the epoch the first fit kept: the same schedule, counted, never timed, so
it is the same model on a busy machine. The wall-clock cap stays a safety limit, counted from the start
of the run as for the first fit; a refit it cuts (or one that diverges or fails) is not used and the
first model is written instead, saying why. It trains on the first fit's dataset, so pictures added to
the folder meanwhile are not in it.

No picture is left to measure the refit model on: the run's figures, report and calibration are the
first model's (its temperature is carried over), and the parts that need unseen pictures to set a
threshold (the "none of these" detector and the prediction sets) are left out of the model file.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from rich.console import Console

from ursa.errors import DivergedError
from ursa.training.callbacks import BudgetStop, Callback, CancelFitException
from ursa.training.config import TrainConfig
from ursa.training.plan import RESERVE, Plan
from ursa.training.runfolder import FEATURES
from ursa.util.progress import make_console
from ursa.vision.data import ImageDataset

# What the model file leaves out after a refit, and why (the report's open-world section says it).
LEFT_OUT = ("left out by --refit: its threshold is set on validation pictures, and the refit model trained on them")


@dataclass
class EveryPictureDataset(ImageDataset):
    """The same dataset, training on every picture, the validation ones included (``ursa train --refit``).

    The validation side is unchanged, so the loop still has pictures to watch for divergence on; its
    figures are then on pictures the model trains on and say nothing of unseen ones.
    """

    @classmethod
    def of(cls, ds: ImageDataset) -> "EveryPictureDataset":
        """A copy of ``ds`` (its lists copied: dropping a picture here leaves ``ds`` as it was)."""
        return cls(**{f.name: list(v) if isinstance(v := getattr(ds, f.name), list) else v for f in fields(ds)})

    @property
    def train_idx(self) -> list[int]:
        return list(range(len(self)))


# Why a refit was not used (recipe.json's ``refit.stopped``): the first model is written instead.
TIME_LIMIT, DIVERGED, FAILED = "time_limit", "diverged", "failed"


@dataclass
class Refit:
    """The refit model's weights (None when it was not used) and what happened, for recipe.json's ``refit``."""

    state: dict | None
    facts: dict

    @property
    def used(self) -> bool:
        return self.state is not None

    def meta(self) -> dict:
        """The model file's ``metrics.refit``: its weights are the refit's (predict and serve read it)."""
        return {k: self.facts[k] for k in ("pictures", "first_fit_pictures", "epochs")}

    def note(self) -> str:
        """One sentence for advice.txt and the report."""
        f = self.facts
        if not self.used:
            return f"--refit: the refit was not used ({f['why']}); model.safetensors is the first fit's model."
        return (f"--refit: model.safetensors was trained again on all {f['pictures']} pictures (the first fit had "
                f"{f['first_fit_pictures']}), with the first fit's decisions, for {f['epochs']} epochs; the figures "
                "here are the first model's, measured on pictures it did not train on, and its calibration is "
                "carried over. The refit model has no unknown-picture threshold or prediction sets (no unseen "
                "pictures were left to set them on).")


class StopAfter(Callback):
    """Ends a fit after the epoch (counted over every fit of the learner) the first fit kept."""

    order = 70

    def __init__(self, last_epoch: int) -> None:
        self.last_epoch = last_epoch

    def after_epoch(self, learn: Any) -> None:
        if learn.epoch >= self.last_epoch and learn.epoch_in_fit + 1 < learn.n_epoch:
            raise CancelFitException("")


class RefitProgress(Callback):
    """A line per refit epoch: the loop's validation figures are on pictures it trains on, so only the loss is shown."""

    order = 60  # before StopAfter ends the fit

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total, self.t0 = console, total, 0.0

    def before_epoch(self, learn: Any) -> None:
        self.t0 = time.perf_counter()

    def after_epoch(self, learn: Any) -> None:
        loss = learn.recorder.rows[-1]["train_loss"]
        self.console.print(f"refit: epoch {learn.epoch} of 0-{self.total - 1} ({learn.stage}), train loss {loss:.4f}, "
                           f"{time.perf_counter() - self.t0:.1f} s", highlight=False)


def refit(cfg: TrainConfig, plan: Plan, rows: list[dict], ds: ImageDataset, console: Console,
          prepare: Callable[..., tuple], t0: float) -> Refit:
    """Train again on every picture of ``ds`` with ``plan``'s decisions, up to the epoch the first fit kept.

    ``rows``: the first fit's history; ``ds``: its dataset (the same pictures and classes, not the folder read
    again); ``prepare``: the recipe's dataset -> learner builder (``recipe.prepare``, which calls this module);
    ``t0``: when the run started, for the wall-clock cap the first fit had (fine-tuning only, default recipe only).
    Never fails the run: a refit that is cut, diverges or fails is not used, and ``facts`` says why.
    """
    start = time.perf_counter()
    last = plan.kept_epoch if plan.kept_epoch is not None else rows[-1]["epoch"]
    tune = plan.fine_tune_epochs if last >= cfg.epochs else 0
    facts: dict = {"first_fit_pictures": len(ds.train_idx), "pictures": len(ds), "epochs": last + 1,
                   "frozen_epochs": min(cfg.epochs, last + 1), "fine_tune_epochs_scheduled": tune, "used": False,
                   "stopped": None}
    # The first fit's decisions, given: nothing is decided again from the (now larger) training side.
    again = dataclasses.replace(cfg, size=plan.size, flips=plan.flips, balance=plan.balance, curve=False,
                                unfreeze_size=cfg.unfreeze_size or plan.tune_size, quiet=True)
    show = [StopAfter(last), RefitProgress(console, last + 1)]
    # As in the first fit: the cap cuts the default recipe's fine-tuning only, never the lesson's fixed epochs.
    capped = cfg.unfreeze_epochs is None and tune > 0
    deadline = t0 + (plan.time_limit or float("inf")) - RESERVE
    cap = [BudgetStop(deadline)] if capped else []
    if capped and (plan.cut or time.perf_counter() >= deadline):  # it cannot reach the epoch kept: do not start
        facts.update(stopped=TIME_LIMIT, seconds=0.0, trained_epochs=0, why=(
            f"the wall-clock limit ({plan.time_limit:.0f} s, --time-limit) "
            + ("cut the first fit" if plan.cut else "had passed") + " before it could start"))
        console.print(f"[yellow]warning:[/] refit not started: {facts['why']}; the first fit's model is written",
                      highlight=False)
        return Refit(None, facts)
    console.print(f"refit: training again on all {len(ds)} pictures with the first fit's decisions ({plan.size} px, "
                  f"flips {plan.flips}; the schedule of {cfg.epochs} frozen + {tune} fine-tuning epochs), "
                  f"stopping after epoch {last}, the one it kept", highlight=False)
    learn = None
    try:
        learn, every, _ = prepare(again, make_console(True), cfg.out / FEATURES / "refit",
                                  dataset=EveryPictureDataset.of(ds))
        facts["pictures"] = len(every.train_idx)  # after any picture unreadable since the first fit was dropped
        learn.freeze()
        learn.fit_one_cycle(cfg.epochs, cfg.lr, cbs=show)
        if tune > 0 and learn.epochs_done == cfg.epochs:
            lo, hi = cfg.unfreeze_lrs
            learn.unfreeze()
            learn.fit_one_cycle(tune, slice(lo, hi), size=again.unfreeze_size, bf16=cfg.bf16, cbs=show + cap)
    except DivergedError as e:
        facts["stopped"], facts["why"] = DIVERGED, f"it diverged: {e}"
    except Exception as e:  # noqa: BLE001 - the first fit's model is good: a failed refit must not lose it
        facts["stopped"], facts["why"] = FAILED, f"it failed: {type(e).__name__}: {e}"
    finally:
        if learn is not None:
            learn.drop_features()
    facts["seconds"] = round(time.perf_counter() - start, 1)
    done = learn.epochs_done - 1 if learn is not None else -1  # the last epoch it trained
    facts["trained_epochs"] = done + 1
    if facts["stopped"] is None and done != last:  # only the cap ends a fit before StopAfter does
        facts["stopped"], facts["why"] = TIME_LIMIT, (
            f"the wall-clock limit ({plan.time_limit:.0f} s, --time-limit) cut it after epoch {done} of 0-{last}")
    if facts["stopped"] is not None:
        console.print(f"[yellow]warning:[/] refit not used: {facts['why']}; the first fit's model is written",
                      highlight=False)
        return Refit(None, facts)
    facts["used"] = True
    console.print(f"refit: {last + 1} epochs on {facts['pictures']} pictures in {facts['seconds']:.0f} s",
                  highlight=False)
    return Refit({k: v.detach().to("cpu").clone() for k, v in learn.model.state_dict().items()}, facts)
