"""The lesson's recipe end to end: folder -> dataset -> learner -> run folder with one model file.

Frozen one-cycle (head on cached body features by default), then unfreeze and fine-tune with
discriminative learning rates; writes model.safetensors, history.csv, split.csv and plots into
the run folder and never into the data folder.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from ursa.data import dataloaders, load_dataset
from ursa.errors import DataError, DivergedError
from ursa.learner import Learner
from ursa.models import DEFAULT_ARCH, create_model, get_spec
from ursa.plots import plot_losses
from ursa.progress import progress_bar
from ursa.util import atomic_write_text

log = logging.getLogger("ursa")


@dataclass
class TrainConfig:
    """Every knob of `ursa train`, with the lesson's defaults."""

    data: Path
    out: Path = Path("runs/latest")
    csv: Path | None = None
    arch: str = DEFAULT_ARCH
    pretrained: bool = True
    size: int | None = None
    valid_pct: float = 0.2
    seed: int = 42
    epochs: int = 4
    lr: float = 3e-3
    unfreeze_epochs: int = 2
    unfreeze_lr: tuple[float, float] | None = None  # default slice(lr/100, lr/10)
    bs: int = 32
    cache: bool = True
    quiet: bool = False


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (self_kb + child_kb) / 1024


def _check_out(cfg: TrainConfig) -> None:
    data, out = cfg.data.resolve(), cfg.out.resolve()
    if out == data or data in out.parents:
        raise DataError(f"{cfg.out}: the run folder must be outside the data folder {cfg.data} (train never writes into your data)")


def train(cfg: TrainConfig, console: Console | None = None) -> TrainResult:
    """Run the recipe and write the run folder; raises UrsaError for bad input, DivergedError (exit 3)."""
    t0 = time.perf_counter()
    console = console or Console(stderr=True, quiet=cfg.quiet)
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data, cfg.csv, cfg.valid_pct, cfg.seed)
    _check_out(cfg)
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
    cfg.out.mkdir(parents=True, exist_ok=True)
    ds.write_split(cfg.out / "split.csv")
    learn = Learner(dls, model, use_cache=cfg.cache, quiet=cfg.quiet, console=console, seed=cfg.seed,
                    spill_dir=cfg.out / "features")
    model_path = None
    try:
        learn.freeze()
        learn.fit_one_cycle(cfg.epochs, cfg.lr)
        if cfg.unfreeze_epochs > 0:
            learn.unfreeze()
            lo, hi = cfg.unfreeze_lr or (cfg.lr / 100, cfg.lr / 10)
            learn.fit_one_cycle(cfg.unfreeze_epochs, slice(lo, hi))
    except DivergedError:
        _write_history(learn, cfg.out)
        raise
    finally:
        learn.feature_cache = None
    _write_history(learn, cfg.out)
    model_path = learn.export(cfg.out / "model.safetensors")
    last = learn.recorder.rows[-1] if learn.recorder.rows else {}
    metrics = {k: last.get(k) for k in ("valid_loss", "error_rate", "accuracy")}
    return TrainResult(cfg.out, model_path, metrics, time.perf_counter() - t0, peak_rss_mb(), ds.classes,
                       len(ds.train_idx), len(ds.valid_idx), ds.skipped, learn)


def _write_history(learn: Learner, out: Path) -> None:
    atomic_write_text(out / "history.csv", learn.recorder.history_csv())
    r = learn.recorder
    plot_losses(r.batch_losses, r.batch_epochs, r.rows, out / "losses.png")
