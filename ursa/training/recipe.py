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

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from ursa.errors import DivergedError
from ursa.training import insight
from ursa.training.config import TrainConfig
from ursa.training.learner import Learner
from ursa.training.run import RunFiles, write_run
from ursa.util.files import check_outside
from ursa.util.progress import progress_bar
from ursa.vision.data import ImageDataset, load_dataset
from ursa.vision.loaders import dataloaders
from ursa.vision.models import create_model, get_spec
from ursa.vision.show import write_batch


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
    console = console or Console(stderr=True, quiet=cfg.quiet)
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data, cfg.csv, cfg.valid_pct, cfg.split_seed_used)
    check_outside(cfg.out, cfg.data, "run folder")
    if cfg.dedupe_split:
        insight.apply_dedupe_split(ds, cfg.valid_pct, cfg.split_seed_used, console)
    spec = get_spec(cfg.arch)
    size = cfg.size or spec.input_size
    model = create_model(cfg.arch, n_classes=len(ds.classes), pretrained=cfg.pretrained)
    with progress_bar(console, cfg.quiet) as prog:
        task = prog.add_task("decoding images", total=len(ds))
        dls = dataloaders(ds, size, spec.mean, spec.std, bs=cfg.bs, seed=cfg.seed,
                          progress=lambda n: prog.update(task, advance=n))
    counts = ds.class_counts(ds.train_idx)
    console.print(
        f"{len(ds)} images, {len(ds.classes)} classes ({', '.join(f'{c} {n}' for c, n in counts.items())} for training), "
        f"{len(ds.train_idx)} train / {len(ds.valid_idx)} valid; {cfg.arch} at {size}px",
        highlight=False,
    )
    return Learner(dls, model, cfg.learner_config(spill_dir), console=console), ds


def train(cfg: TrainConfig, console: Console | None = None) -> TrainResult:
    """Run the recipe and write the run folder; raises UrsaError for bad input, DivergedError (exit 3)."""
    t0 = time.perf_counter()
    console = console or Console(stderr=True, quiet=cfg.quiet)
    learn, ds = build_learner(cfg, console, spill_dir=cfg.out / "features")
    found, timings = _before(cfg, learn, ds, console)
    try:
        learn.freeze()
        learn.fit_one_cycle(cfg.epochs, cfg.lr)
        if cfg.curve and cfg.epochs > 0 and not learn.diverged:
            t = time.perf_counter()
            curve = insight.learner_curve(learn, cfg, quiet=cfg.quiet)
            if curve is not None:
                found["curve"] = curve.to_json()
                console.print(f"learning curve: {curve.words()}", highlight=False)
            else:
                console.print("[yellow]warning:[/] --curve needs the feature cache (--cache): no learning curve",
                              highlight=False)
            timings["curve"] = time.perf_counter() - t
        if cfg.unfreeze_epochs > 0:
            learn.unfreeze()
            lo, hi = cfg.unfreeze_lrs
            learn.fit_one_cycle(cfg.unfreeze_epochs, slice(lo, hi), size=cfg.unfreeze_size, bf16=cfg.bf16)
    except DivergedError as e:
        write_run(cfg.out, learn, cfg, ds, console=console, insight=found)
        raise DivergedError(f"{e} See {cfg.out / 'advice.txt'}; no model file was written.") from None
    finally:
        learn.drop_features()  # free the cache's memory before the report pass
    files = write_run(cfg.out, learn, cfg, ds, {
        "data": str(cfg.data), "images": f"{len(ds.train_idx)} train / {len(ds.valid_idx)} valid",
        "time": f"{time.perf_counter() - t0:.0f} s"}, console, insight=found)
    timings.update(files.timings)
    if files.calibration is not None:
        found["calibration"] = files.calibration.to_json()
    if files.diverged:  # the rules saw what the guard did not (a fit cancelled mid-epoch): still no model file
        found = next(a for a in files.advice if a.rule == "diverged")
        raise DivergedError(f"{found.text()} See {cfg.out / 'advice.txt'}; no model file was written.")
    last = learn.recorder.rows[-1] if learn.recorder.rows else {}
    metrics = {k: last.get(k) for k in ("valid_loss", "error_rate", "accuracy")}
    return TrainResult(cfg.out, files.model, metrics, time.perf_counter() - t0, peak_rss_mb(learn.dls.num_workers > 0),
                       ds.classes, len(ds.train_idx), len(ds.valid_idx), ds.skipped, learn, files, found, timings)


def _before(cfg: TrainConfig, learn: Learner, ds: ImageDataset, console: Console) -> tuple[dict, dict]:
    """batch.png, the class counts and the leakage audit, at the start of a run (about a second on bears)."""
    found: dict = {"data": insight.data_summary(ds)}
    timings: dict = {}
    t = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_batch(ds, learn.dls.size, learn.dls.mean, learn.dls.std, cfg.out / "batch.png", seed=cfg.seed)
    timings["batch"] = time.perf_counter() - t
    if found["data"]["warning"]:
        console.print(f"[yellow]warning:[/] imbalanced classes: {found['data']['warning']}", highlight=False)
    t = time.perf_counter()
    found["leakage"] = insight.leakage_audit(ds, cfg.dedupe_split)
    timings["leakage"] = time.perf_counter() - t
    console.print(insight.leakage_line(found["leakage"]), highlight=False)
    return found, timings
