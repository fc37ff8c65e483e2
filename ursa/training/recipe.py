"""The lesson's recipe end to end: folder -> dataset -> learner -> run folder with one model file.

Frozen one-cycle (head on cached body features by default), then, when asked (--unfreeze-epochs),
unfreeze and fine-tune with discriminative learning rates. ``build_learner`` is the one place a
data folder becomes a learner (train, lr-find, curve and the benchmarks all use it); ``train``
runs the stages and hands the learner to the run writer. Around the stages it measures what
``training/insight.py`` knows: batch.png and the leakage audit first, the learning curve while the
frozen body's features are cached (calibration comes at the end, in the run writer). Never
writes into the data folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console

from ursa.errors import DivergedError, UrsaError
from ursa.training import insight
from ursa.training.balance import choose_balance, class_prior
from ursa.training.config import ConfigError, TrainConfig
from ursa.training.callbacks import METRIC_KEYS, BudgetStop, Callback
from ursa.training.checkpoint import Checkpoint, CheckpointWriter, remove_checkpoint
from ursa.training.dist import Dist, describe_dist, rank_device
from ursa.training.resume import resume_line, run_facts, split_digest, start_ranks
from ursa.training.learner import Learner
from ursa.training.compare import compare_line, compare_valid, earlier_wrong
from ursa.training.honest import ValidCorrect, honest_figures
from ursa.training.plan import (RESERVE, FineTune, Plan, Stop, Work, choose_budget, choose_flips, choose_size,
                                count_gflops, epoch_cap, fine_tune_epochs, smaller_tune_size, time_limit)
from ursa.training.refit import refit
from ursa.training.run import RunFiles, write_run
from ursa.util.files import atomic_write_text, check_outside
from ursa.util.progress import make_console, progress_bar
from ursa.vision.data import ImageDataset
from ursa.vision.labelsets import load_labelled
from ursa.util.device import describe
from ursa.vision.loaders import MEMORY_BUDGET, dataloaders
from ursa.vision.models import create_model, get_spec
from ursa.vision.probe import probe_images
from ursa.vision.show import write_batch
from ursa.util.names import printable


@dataclass
class TrainResult:
    """Where things went and how it ended."""

    out: Path
    model_path: Path | None
    metrics: dict
    seconds: float
    peak_rss_mb: float
    classes: list[str]
    n_train: int
    n_valid: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    learner: Learner | None = None
    files: RunFiles | None = None
    insight: dict = field(default_factory=dict)  # report.json's calibration, curve, leakage, data
    timings: dict = field(default_factory=dict)  # seconds each insight part added
    plan: Plan | None = None  # what the recipe decided (size, flips, fine-tuning) and why


def peak_rss_mb(workers: bool = False) -> float:
    """Peak resident memory of this process in MB, plus the largest finished child's when loader workers ran.

    Children count only with workers: a forked helper (`ldconfig -p`, run while importing torch)
    reports the parent's size at fork time and would inflate the figure by ~0.4 GB.
    """
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if workers else 0
    return (self_kb + child_kb) / 1024


def build_learner(cfg: TrainConfig, console: Console | None = None,
                  spill_dir: Path | None = None) -> tuple[Learner, ImageDataset]:
    """Dataset, decoded pixels, model and learner from a config: the one folder -> learner recipe."""
    learn, ds, _ = prepare(cfg, console, spill_dir)
    return learn, ds


def prepare(cfg: TrainConfig, console: Console | None = None, spill_dir: Path | None = None,
            dist: Dist | None = None, cbs: Sequence[Callback] = (),
            dataset: ImageDataset | None = None) -> tuple[Learner, ImageDataset, Plan]:
    """build_learner, also returning the plan: the input size and flips decided from the images, and why.

    ``dist``: this rank under torchrun (from ``start_ranks``); ``cbs``: callbacks the learner gets;
    ``dataset``: this one instead of reading ``cfg.data`` (--refit's second fit: the first's, every picture training).
    """
    dist = dist or Dist()
    device = rank_device(cfg.device, dist.local_rank, dist.world)
    if dist.active and not cfg.cache:
        raise ConfigError("--no-cache: under torchrun the frozen stage trains on the feature cache (computed in "
                          "shares by the ranks); leave out --no-cache")
    if dist.active and cfg.balance == "sampler":  # torch's DistributedSampler shares out a plain shuffle
        raise ConfigError("--balance sampler: under torchrun the fine-tuning batches are shared out by torch's "
                          "DistributedSampler, which does not draw class-balanced; use --balance logit_adjust or weights")
    if dist.active and cfg.refit:
        raise ConfigError("--refit: not under torchrun yet (the second fit runs in one process); leave out --refit "
                          "or --nproc")
    console = console or make_console(cfg.quiet or not dist.main)
    torch.manual_seed(cfg.seed)
    ds = dataset or load_labelled(cfg.data, cfg.csv, cfg.valid_pct, cfg.split_seed_used, label_delim=cfg.label_sets)
    check_outside(cfg.out, cfg.data, "run folder")
    if cfg.dedupe_split and dataset is None:
        insight.apply_dedupe_split(ds, cfg.valid_pct, cfg.split_seed_used, console)
    spec = get_spec(cfg.arch)
    probe = probe_images([ds.files[i] for i in ds.train_idx], cfg.seed)
    replayed = (cfg.replay or {}).get("size") if cfg.size is None else None
    size, size_why = ((replayed, f"as {cfg.replay['from']} decided (--config: its recipe.json)") if replayed
                      else choose_size(probe, spec.input_size, cfg.size))
    flips, flips_why = choose_flips(probe, cfg.flips)
    budget, budget_why = choose_budget(probe, size, cfg.budget)
    if cfg.budget is not None and (cfg.replay or {}).get("budget") == cfg.budget:  # not given: RUN's config.json had it
        budget_why = f"as {cfg.replay['from']} had it (--config: its config.json)"
    plan = Plan(size, size_why, flips, flips_why, budget, budget_why, probe=probe.to_json(),
                time_limit=time_limit(budget, cfg.time_limit))
    model = create_model(cfg.arch, n_classes=len(ds.classes), pretrained=cfg.pretrained)
    tune_size = cfg.unfreeze_size or size
    gflops = count_gflops(model, size)
    work = Work(count_gflops(model, tune_size) if tune_size != size else gflops, gflops, len(ds.train_idx),
                len(ds.valid_idx), cfg.epochs, min(cfg.views or cfg.epochs, cfg.epochs) if cfg.cache else 0,
                dist.world)
    plan.work = work.to_json()
    in_memory = {"auto": None, "memory": True, "stream": False}[cfg.pixels]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks on this machine each hold their pixels
    with progress_bar(console, cfg.quiet) as prog:
        task = prog.add_task("decoding images", total=len(ds))
        dls = dataloaders(ds, size, spec.mean, spec.std, bs=cfg.bs, seed=cfg.seed, flips=flips,
                          progress=lambda n: prog.update(task, advance=n), cache=in_memory,
                          pin_memory=device.type == "cuda", memory_budget=MEMORY_BUDGET // max(local_world, 1))
    counts = ds.class_counts(ds.train_idx)
    # The first line, once data and network are known to be usable (bad input stays a one-line error).
    console.print(describe(device) + (f"; {describe_dist(dist)}" if dist.active else ""), highlight=False)
    console.print(
        f"{len(ds)} images, {len(ds.classes)} classes ({', '.join(f'{printable(c)} {n}' for c, n in counts.items())} for training), "
        f"{len(ds.train_idx)} train / {len(ds.valid_idx)} valid; {cfg.arch} at {size}px",
        highlight=False,
    )
    console.print(dls.pixels_line() + ("" if cfg.pixels == "auto" else f" (--pixels {cfg.pixels})"), highlight=False)
    plan.pixels = "memory" if dls.in_memory else "stream"
    if cfg.multi_label and cfg.balance not in ("auto", "none"):
        raise ConfigError(f"--balance {cfg.balance}: the lopsided-classes remedies are for one class per picture; "
                          "with --multi-label each label's threshold is chosen on the validation images: drop --balance")
    plan.balance, plan.balance_why = (("none", "label sets: each label's threshold is chosen on the validation images")
                                      if cfg.multi_label else choose_balance(counts, cfg.balance))
    lcfg = dataclasses.replace(cfg.learner_config(spill_dir, str(device)), balance=plan.balance,
                               class_prior=class_prior([counts[c] for c in ds.classes]))
    for line in plan.lines():
        console.print(f"recipe: {line}", highlight=False)
    learn = Learner(dls, model, lcfg, cbs=cbs, console=console, dist=dist)
    return learn, ds, plan


def train(cfg: TrainConfig, console: Console | None = None, resume: Checkpoint | None = None) -> TrainResult:
    """Run the recipe and write the run folder; raises UrsaError for bad input, DivergedError (exit 3).

    Under torchrun every rank runs this; rank 0 alone prints and writes. ``resume``: the
    checkpoint of a stopped run of this config (``ursa train --resume RUN``) to go on from.
    """
    dist = start_ranks(cfg.device)
    try:
        result = _train(cfg, console, resume, dist)
        dist.finish()  # on the CPU the ranks leave together, once rank 0 has written the run folder
        return result
    except UrsaError:
        # The same error on every rank (bad input, a divergence): torchrun stops all ranks as soon as one
        # exits with an error, so the others wait here until rank 0 has written the run folder and said why.
        # On the CPU an error rank 0 alone finds while writing meets the others' barrier in dist.finish(); where they
        # are gone (a write past the timeout) gloo's barrier fails fast and this error is still the one said. (With
        # NCCL the others have left and rank 0 waits here for the watchdog: a known gap.)
        dist.barrier(tolerant=True)
        raise
    finally:
        dist.close()


def _train(cfg: TrainConfig, console: Console | None, resume: Checkpoint | None, dist: Dist) -> TrainResult:
    t0 = time.perf_counter() - (float(resume.index.get("elapsed", 0.0)) if resume else 0.0)
    console = console or make_console(cfg.quiet or not dist.main)
    plan_box: list[Plan] = []
    writer = CheckpointWriter(cfg.out, lambda: {"config": cfg.to_json(), "elapsed": time.perf_counter() - t0,
                                                "plan": plan_box[0].to_json(), "split": split_digest(ds)})
    learn, ds, plan = prepare(cfg, console, cfg.out / "features", dist, cbs=[writer])
    plan_box.append(plan)
    if resume is not None:
        resume_line(resume, ds, plan, console)
    # The flips chosen, not "auto": TTA and a retrain with --config read what the model was trained with.
    cfg = dataclasses.replace(cfg, flips=plan.flips)
    found, timings = _before(cfg, learn, ds, console) if dist.main else ({}, {})
    seen = ValidCorrect()  # which validation pictures each epoch gets right: the honest figures
    try:
        learn.freeze()
        frozen_resume = resume if resume is not None and resume.stage == "frozen" else None
        if resume is not None:
            resume.restore_learner(learn)
        if resume is None or (frozen_resume is not None and not frozen_resume.fit_done):
            learn.fit_one_cycle(cfg.epochs, cfg.lr, resume=frozen_resume, cbs=[seen])
        if cfg.curve and cfg.epochs > 0 and not learn.diverged and resume is None and dist.main:
            t = time.perf_counter()
            curve = insight.learner_curve(learn, cfg, quiet=cfg.quiet)
            if curve is not None:
                found["curve"] = curve.to_json()
                console.print(f"learning curve: {curve.words()}", highlight=False)
            else:
                console.print("[yellow]warning:[/] --curve needs the feature cache (--cache): no learning curve",
                              highlight=False)
            timings["curve"] = time.perf_counter() - t
        _fine_tune(cfg, learn, plan, t0, console, resume if resume is not None and resume.stage != "frozen" else None,
                   seen)
    except DivergedError as e:
        found["recipe"] = plan.to_json()
        if dist.main:
            write_run(cfg.out, learn, cfg, ds, console=console, insight=found)
        raise DivergedError(f"{e} See {cfg.out / 'advice.txt'}; no model file was written.") from None
    finally:
        learn.drop_features()  # free the cache's memory before the report pass
    plan.run = run_facts(learn, resume)
    again = refit(cfg, plan, learn.recorder.rows, ds, console, prepare, t0) if cfg.refit else None
    if again is not None:
        plan.refit = again.facts
    plan.seconds = round(time.perf_counter() - t0, 1)  # the one time figure: console, report and recipe.json
    if dist.main:
        _figures(cfg, learn, ds, plan, seen, console)
    found["recipe"] = plan.to_json()
    if not dist.main:  # rank 0 alone writes the run folder
        return TrainResult(cfg.out, None, {}, plan.seconds, peak_rss_mb(learn.dls.num_workers > 0),
                           ds.classes, len(ds.train_idx), len(ds.valid_idx), ds.skipped, learn, plan=plan)
    atomic_write_text(cfg.out / "recipe.json", json.dumps(plan.to_json(), indent=1) + "\n")
    files = write_run(cfg.out, learn, cfg, ds, {
        "data": str(cfg.data), "images": f"{len(ds.train_idx)} train / {len(ds.valid_idx)} valid",
        "time": f"{plan.seconds:.0f} s (start to the end of training)"},
        console, insight=found, notes=[n for n in [plan.advice(learn.recorder.rows, learn.kept_row,
                                                                  cfg.epoch_kept == "last")] if n],
        refit=again)
    timings.update(files.timings)
    if files.calibration is not None:
        found["calibration"] = files.calibration.to_json()
    if files.model is None and files.diverged:  # the rules saw what the guard did not: still no model file
        found = next(a for a in files.advice if a.rule == "diverged")
        raise DivergedError(f"{found.text()} See {cfg.out / 'advice.txt'}; no model file was written.")
    remove_checkpoint(cfg.out)  # the model file is written: nothing left to resume
    last = learn.kept_row or (learn.recorder.rows[-1] if learn.recorder.rows else {})
    metrics = {k: last.get(k) for k in METRIC_KEYS}
    if files.recall:
        metrics["recall"] = files.recall
    return TrainResult(cfg.out, files.model, metrics, plan.seconds, peak_rss_mb(learn.dls.num_workers > 0),
                       ds.classes, len(ds.train_idx), len(ds.valid_idx), ds.skipped, learn, files, found, timings,
                       plan)


def fit_stages(cfg: TrainConfig, learn: Learner, plan: Plan, console: Console, t0: float | None = None) -> None:
    """The recipe's stages on a built learner, without the run folder (the notebook's ``fine_tune``).

    The frozen epochs, then fine-tuning when it pays and fits ``plan.budget`` (counted from ``t0``,
    default now), the best epoch kept (or the last: ``cfg.epoch_kept``); the same decisions as ``ursa train``.
    """
    t0 = time.perf_counter() if t0 is None else t0
    learn.freeze()
    learn.fit_one_cycle(cfg.epochs, cfg.lr)
    _fine_tune(cfg, learn, plan, t0, console)


def _fine_tune(cfg: TrainConfig, learn: Learner, plan: Plan, t0: float, console: Console,
               resume: Checkpoint | None = None, seen: ValidCorrect | None = None) -> None:
    """The fine-tuning stage: the lesson's fixed epochs when given, else as many as the counted budget allows and pay.

    ``resume``: a stopped run's fine-tuning checkpoint: the same stage goes on with what it had decided.
    """
    lo, hi = cfg.unfreeze_lrs
    fixed = cfg.unfreeze_epochs is not None
    replayed = (cfg.replay or {}).get("fine_tune_epochs")
    if resume is not None:
        plan.restore(resume.index["plan"])
    elif fixed:
        plan.fine_tune_epochs, plan.fine_tune = cfg.unfreeze_epochs, FineTune.GIVEN
        plan.fine_tune_why = f"--unfreeze-epochs {cfg.unfreeze_epochs}"
    elif replayed is not None:
        plan.fine_tune_epochs, plan.fine_tune = replayed, FineTune.REPLAYED
        plan.tune_size = cfg.replay.get("tune_size")
        plan.fine_tune_why = f"{replayed} epoch(s), as {cfg.replay.get('from')} decided (--config: its recipe.json)"
        console.print(f"recipe: fine-tuning: {plan.fine_tune_why}", highlight=False)
    else:
        _decide(cfg, learn, plan)
        console.print(f"recipe: fine-tuning: {plan.fine_tune_why}", highlight=False)
    if plan.work:
        w = Work.from_json(plan.work)
        plan.planned_seconds = round(w.frozen_seconds + RESERVE + plan.fine_tune_epochs * w.epoch_seconds, 1)
    force = False
    if plan.fine_tune_epochs > 0:
        learn.unfreeze()
        if resume is None or not resume.fit_done:
            try:
                learn.fit_one_cycle(plan.fine_tune_epochs, slice(lo, hi), size=cfg.unfreeze_size or plan.tune_size,
                                    bf16=cfg.bf16,
                                    cbs=([] if fixed else [BudgetStop(t0 + plan.time_limit - RESERVE)])
                                    + ([seen] if seen is not None else []), resume=resume)
            except DivergedError as e:
                if fixed:
                    raise  # the lesson's recipe as asked: a divergence fails the run (exit 3)
                learn.recovered()  # the best epoch so far (frozen or not) is still good: keep it
                force = True
                plan.stopped = Stop.DIVERGED
                plan.fine_tune_why += f"; fine-tuning diverged and was stopped ({e})"
                console.print(f"[yellow]warning:[/] fine-tuning stopped: {e}", highlight=False)
        plan.epochs_done = sum(r["stage"] == "unfrozen" for r in learn.recorder.rows)
        if not fixed and plan.stopped is None and plan.epochs_done < plan.fine_tune_epochs:
            plan.stopped = Stop.TIME_LIMIT
            plan.fine_tune_why += (f"; CUT by the wall-clock limit ({plan.time_limit:.0f} s, --time-limit) after "
                                   f"{plan.epochs_done} of {plan.fine_tune_epochs} epochs: this model is not the one "
                                   "the data and options decide")
            console.print(f"[yellow]warning:[/] the run was cut by --time-limit after {plan.epochs_done} of "
                          f"{plan.fine_tune_epochs} fine-tuning epochs", highlight=False)
    if not fixed and (force or cfg.epoch_kept == "best"):  # the lesson's recipe and --epoch-kept last keep the last
        _keep_best(learn, plan, console, force)


def _decide(cfg: TrainConfig, learn: Learner, plan: Plan) -> None:
    """How many fine-tuning epochs pay and fit the budget, counted; rank 0's frozen error decides for every rank."""
    rows = learn.recorder.rows
    frozen_error = rows[-1]["error_rate"] if rows else float("nan")  # what the model is now
    frozen_error = learn.dist.agree([frozen_error])[0]
    n_valid = len(learn.dls.dataset.valid_idx)
    work = Work.from_json(plan.work) if plan.work else None
    counted = not cfg.multi_label  # multi-label's error is 1 - macro F1, not a share of wrong pictures
    plan.fine_tune_epochs, plan.fine_tune, plan.fine_tune_why = fine_tune_epochs(
        frozen_error, n_valid, work, plan.budget, epoch_cap(plan.budget), counted)
    if plan.fine_tune is FineTune.TOO_FEW_FIT and cfg.unfreeze_size is None:  # a smaller size may fit enough
        smaller = smaller_tune_size(frozen_error, n_valid, work, plan.budget, plan.size,
                                    lambda s: count_gflops(learn.model, s), epoch_cap(plan.budget), counted)
        if smaller is not None:  # the counted work is then the smaller size's
            plan.tune_size, plan.fine_tune_epochs, plan.fine_tune_why, tuned = smaller
            plan.fine_tune, plan.work = FineTune.PLANNED, tuned.to_json()


def _figures(cfg: TrainConfig, learn: Learner, ds: ImageDataset, plan: Plan, seen: ValidCorrect,
             console: Console) -> None:
    """The honest figures (recipe.json's ``honest``) and, after --config RUN, the error on unchanged pictures."""
    rows = learn.recorder.rows
    if not rows or len(seen.correct) != len(rows):  # a resumed run did not see every epoch's predictions
        return
    at = next((i for i, r in enumerate(rows) if learn.kept_row and r["epoch"] == learn.kept_row["epoch"]), -1)
    kept_error = rows[at]["error_rate"]
    # The default recipe chose its epoch on the validation pictures. (Multi-label: the loop's error is 1 - macro F1, not
    # a share of pictures, so a per-picture correction would measure another figure: none is given.)
    if cfg.unfreeze_epochs is None and not cfg.multi_label:
        chosen = learn.kept_row is not None or cfg.epoch_kept == "best"
        plan.honest = honest_figures(seen.correct, kept_error, seen.known, chosen=chosen)
        corrected = plan.honest["selection_corrected"]
        if corrected is not None:
            bound = plan.honest["upper_bound"]
            console.print((f"honest figure: error {kept_error:.4f} on the epoch kept, {corrected:.4f} corrected for "
                           "choosing it on these pictures (cross-fitted over two halves)" if chosen else
                           f"honest figure: error {kept_error:.4f} on the last epoch, not chosen on these pictures")
                          + (f"; on {plan.honest['pictures']} pictures, at {plan.honest['confidence']:.0%} confidence "
                             f"at most {bound:.4f}" if bound is not None else ""), highlight=False)
    names = [ds.rel(i) for i in ds.valid_idx]
    plan.wrong = [n for n, ok in zip(names, seen.correct[at].tolist()) if not ok]
    earlier = (cfg.replay or {}).get("from")
    if earlier:
        labels = [ds.label_text(i) for i in ds.valid_idx]
        c = compare_valid(Path(earlier) / "split.csv", names, labels, seen.correct[at].tolist(),
                          earlier_wrong(Path(earlier)))
        if c is not None:
            plan.compare = c
            console.print(f"recipe: {compare_line(c)}", highlight=False)


def _keep_best(learn: Learner, plan: Plan, console: Console, force: bool) -> None:
    """Keep the best epoch (over both stages) when it beats the last by an image or more."""
    rows = learn.recorder.rows
    last = rows[-1]["error_rate"] if rows else float("nan")
    kept = learn.use_best(force=force)
    if kept is not None:
        plan.kept_epoch = kept["epoch"]
        plan.fine_tune_why += f"; kept the weights of epoch {kept['epoch']} (error {kept['error_rate']:.4f})"
        console.print(f"recipe: kept the best epoch's weights: epoch {kept['epoch']}, error rate "
                      f"{kept['error_rate']:.4f} (the last epoch had {last:.4f})", highlight=False)


def _before(cfg: TrainConfig, learn: Learner, ds: ImageDataset, console: Console) -> tuple[dict, dict]:
    """batch.png, the class counts and the leakage audit, at the start of a run (about a second on bears)."""
    found: dict = {"data": insight.data_summary(ds)}
    timings: dict = {}
    t = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_batch(ds, learn.dls.size, learn.dls.mean, learn.dls.std, cfg.out / "batch.png", seed=cfg.seed,
                flips=learn.dls.flips)
    timings["batch"] = time.perf_counter() - t
    if found["data"]["warning"]:
        console.print(f"[yellow]warning:[/] imbalanced classes: {found['data']['warning']}", highlight=False)
    t = time.perf_counter()
    found["leakage"] = insight.leakage_audit(ds, cfg.dedupe_split)
    timings["leakage"] = time.perf_counter() - t
    console.print(insight.leakage_line(found["leakage"]), highlight=False)
    return found, timings
