"""`ursa curve` and `ursa show`: how many images are enough, and the data as the model sees it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli.common import CsvOpt, DataArg, Quiet, default
from ursa.cli.train import ArchOpt, BsOpt, ConfigOpt, SeedOpt, SizeOpt, ValidOpt, make_config
from ursa.util.files import check_outside

DedupeOpt = Annotated[Optional[bool], typer.Option("--dedupe-split/--no-dedupe-split", help="Keep each group of near-duplicate images on one side of the validation split [default: off].")]


def curve_cmd(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for curve.png and curve.json.")] = Path("runs/curve"),
    config: ConfigOpt = None,
    csv: CsvOpt = None,
    arch: ArchOpt = None,
    size: SizeOpt = None,
    valid_pct: ValidOpt = None,
    seed: SeedOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=f"Epochs of each head, as train's frozen stage [default: {default('epochs')}].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Learning rate of each head [default: {default('lr')}].")] = None,
    bs: BsOpt = None,
    draws: Annotated[int, typer.Option("--draws", min=1, max=20, help="Seeded draws of each subset size.")] = 3,
    views: Annotated[int, typer.Option("--views", min=1, max=8, help="Augmented views of each training image in the feature cache (1 is fastest).")] = 1,
    dedupe_split: DedupeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print curve.json instead of the summary.")] = False,
    quiet: Quiet = False,
) -> None:
    """Learning curve: retrain the head on 10-100% of the images and say whether more would help, and of which class."""
    from ursa.training.insight import run_curve
    from ursa.training.recipe import build_learner

    cfg = make_config(data, config, out=out, csv=csv, arch=arch, size=size, valid_pct=valid_pct, seed=seed,
                      epochs=epochs, lr=lr, bs=bs, dedupe_split=dedupe_split, quiet=quiet or None)
    learn, _ = build_learner(cfg, spill_dir=out / "features")
    res = run_curve(learn, cfg, out, draws=draws, views=views)
    if json_out:
        typer.echo(res.json.read_text())
        return
    c = res.curve
    mean = c.errors.mean(1)
    typer.echo("images per class  error (mean ± sd over draws)")
    for f, n, m, s in zip(c.fractions, c.n_per_class.mean(1), mean, c.errors.std(1)):
        typer.echo(f"  {100 * f:>3.0f}%  {n:>6.0f}      {100 * m:5.1f}% ± {100 * s:.1f}")
    typer.echo(c.words())
    typer.echo(f"plot: {res.png}, numbers: {res.json}; body features {res.seconds_features:.0f} s, "
               f"curve {res.seconds_curve:.1f} s")


def show_cmd(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="PNG file for the grid of training images.")] = Path("batch.png"),
    config: ConfigOpt = None,
    csv: CsvOpt = None,
    arch: ArchOpt = None,
    size: SizeOpt = None,
    valid_pct: ValidOpt = None,
    seed: SeedOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, max=64, help="Images in the grid.")] = 16,
    dedupe_split: DedupeOpt = None,
) -> None:
    """Look at the data first: classes with their counts and the split, and a grid of training images as the model sees them."""
    from ursa.training.insight import apply_dedupe_split
    from ursa.training.plan import choose_budget, choose_flips, choose_size
    from ursa.vision.data import load_dataset
    from ursa.vision.probe import probe_images
    from ursa.vision.models import get_spec
    from ursa.vision.show import imbalance_warning, summary_lines, write_batch

    cfg = make_config(data, config, csv=csv, arch=arch, size=size, valid_pct=valid_pct, seed=seed,
                      dedupe_split=dedupe_split)
    if out.is_dir():  # --out FOLDER: the grid goes inside it, as batch.png
        out = out / "batch.png"
    check_outside(out.parent, data)
    ds = load_dataset(cfg.data, cfg.csv, cfg.valid_pct, cfg.split_seed_used)
    if cfg.dedupe_split:
        apply_dedupe_split(ds, cfg.valid_pct, cfg.split_seed_used)
    for line in summary_lines(ds):
        typer.echo(line)
    warning = imbalance_warning(ds.class_counts())
    if warning:
        typer.echo(f"warning: imbalanced classes: {warning}", err=True)
    spec = get_spec(cfg.arch)
    probe = probe_images([ds.files[i] for i in ds.train_idx], cfg.seed)
    size, size_why = choose_size(probe, spec.input_size, cfg.size)  # what `ursa train` would choose
    flips, flips_why = choose_flips(probe, cfg.flips)
    budget, budget_why = choose_budget(probe, size, cfg.budget)
    path = write_batch(ds, size, spec.mean, spec.std, out, n=n, seed=cfg.seed, flips=flips)
    typer.echo(f"recipe: input size {size} px: {size_why}")
    typer.echo(f"recipe: flips {flips}: {flips_why}")
    typer.echo(f"recipe: budget {budget:g} s: {budget_why}")
    typer.echo(f"batch: {path} ({min(n, len(ds.train_idx))} training images at {size} px, augmented as in training)")
