"""`ursa train`, `ursa lr-find` and `ursa interpret`: options -> one TrainConfig -> one function call."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from ursa.cli.common import EXIT_FILE, CsvOpt, DataArg, DeviceOpt, Quiet, default, parse_slice
from ursa.errors import UrsaError
from ursa.training.config import DEFAULT_BUDGET, SMALL_IMAGE_BUDGET_FACTOR, TrainConfig, read_run_config
from ursa.util.files import check_outside
from ursa.util.names import printable
from ursa.vision.data import split_settings

ArchOpt = Annotated[Optional[str], typer.Option("--arch", help=f"efficientnet_lite0/1/2 (offline) or a timm name [default: {default('arch')}].")]
SizeOpt = Annotated[Optional[int], typer.Option("--size", help="Input size in pixels (32-1024) [default: the architecture's].")]
BsOpt = Annotated[Optional[int], typer.Option("--bs", help=f"Batch size [default: {default('bs')}].")]
ValidOpt = Annotated[Optional[float], typer.Option("--valid-pct", help=f"Share of images held out for validation [default: {default('valid_pct')}].")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="Start from the settings (and the validation split) of an earlier run: its folder or config.json; options given here win.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help=f"Seed of training (and of the split, unless --split-seed) [default: {default('seed')}].")]


def parse_budget(text: str | None, option: str = "--budget") -> float | None:
    """--budget (or --time-limit): seconds as 90, 90s, 1.5m or 2h; None when not given."""
    if text is None:
        return None
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise UrsaError(f"{option}: expected seconds such as 90, 90s, 3m or 1h, got {text!r}") from None
    return value


def make_config(data: Path, base_run: Path | None, **options: Any) -> TrainConfig:
    """The run's config: TrainConfig's defaults (or an earlier run's config.json), then the options given.

    From an earlier run, the validation split stays that run's (its split seed is pinned) unless
    --split-seed is given, so --seed N compares training seeds on the same validation images.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if base_run is None:
        return TrainConfig(data=data, **given)
    base = read_run_config(base_run)
    if base is None:
        raise UrsaError(f"--config {base_run}: no config.json there; give a run folder written by `ursa train`")
    base.pop("out", None)
    given.setdefault("split_seed", split_settings(base)[1])
    given.setdefault("replay", replay_of(base_run, base, given))
    return TrainConfig.from_json(base, data=data, **given)


# Options that change what the recipe would decide: given on top of --config RUN, that decision is made afresh.
_EPOCHS_DEPEND_ON = ("arch", "size", "epochs", "lr", "budget", "unfreeze_epochs", "unfreeze_size", "cache", "views", "bs",
                     "balance")
DECIDES = {"size": ("size", "arch"), "fine_tune_epochs": _EPOCHS_DEPEND_ON, "tune_size": _EPOCHS_DEPEND_ON}


def replay_of(base_run: Path, base: dict, given: dict) -> dict:
    """--config RUN: RUN's decisions to replay (its recipe.json), less those an option given here changes."""
    import json

    folder = base_run if base_run.is_dir() else base_run.parent
    replay: dict = {"from": str(folder)}
    try:
        recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return replay  # an earlier run without recipe.json: the recipe decides afresh
    if not isinstance(recipe, dict):
        return replay
    if "budget" not in given and isinstance(base.get("budget"), (int, float)):
        replay["budget"] = base["budget"]  # kept from RUN's config.json: the reason says so, not "--budget"
    for key, options in DECIDES.items():
        value = recipe.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and not any(o in given for o in options):
            replay[key] = value
    return replay


def train_cmd(
    data: DataArg,
    csv: CsvOpt = None,
    multi_label: Annotated[Optional[bool], typer.Option("--multi-label/--single-label", help="Each image has a set of labels (none, one or several): the --csv label column holds them separated by a space (fastai's planet format); sigmoid outputs, a threshold per label [default: single-label].")] = None,
    label_delim: Annotated[Optional[str], typer.Option("--label-delim", help="What separates the labels of one image in the --csv label column with --multi-label [default: a space].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help=f"Run folder for the model file, history and plots [default: {default('out')}].")] = None,
    config: ConfigOpt = None,
    arch: ArchOpt = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights [default: pretrained].")] = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Input size in pixels (32-1024) [default: from the images: the network's own for photos, smaller for small images such as 64 px tiles].")] = None,
    valid_pct: ValidOpt = None,
    seed: SeedOpt = None,
    split_seed: Annotated[Optional[int], typer.Option("--split-seed", help="Seed of the validation split [default: --seed].")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=f"Frozen epochs (head only) [default: {default('epochs')}].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Max learning rate of the frozen stage [default: {default('lr')}].")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help=f"Size of the run in seconds of the reference machine (2 CPU cores), e.g. 90, 3m: counted from images x epochs x the network's FLOPs, never timed, so any machine decides the same; after the frozen stage, fine-tune only when the frozen body is weak here and the rest fits enough epochs; 0: frozen stage only [default: {DEFAULT_BUDGET:.0f}s, {SMALL_IMAGE_BUDGET_FACTOR * DEFAULT_BUDGET:.0f}s for small images upsampled to at most 128 px]")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time-limit", help="Wall time after which fine-tuning is cut, e.g. 10m (a safety cap: the run then says it was cut and its model is not the one the data decides) [default: 4x --budget].")] = None,
    unfreeze_epochs: Annotated[Optional[int], typer.Option("--unfreeze-epochs", help="Fine-tune everything for exactly this many epochs afterwards, whatever the budget (the lesson's recipe: 2; 0: frozen stage only) [default: the budget decides].")] = None,
    flips: Annotated[Optional[str], typer.Option("--flips", help="Mirror images as augmentation: none (digits, text), horizontal (photos), all (also vertical flips and quarter turns: satellite, microscopy), auto [default: auto: none for grayscale images, else horizontal].")] = None,
    unfreeze_lr: Annotated[Optional[str], typer.Option("--unfreeze-lr", help="LO,HI learning rates for early layers and the head while fine-tuning [default: lr/300,lr/3].")] = None,
    unfreeze_size: Annotated[Optional[int], typer.Option("--unfreeze-size", help="Fine-tune at this smaller input size (progressive resizing; cheaper) [default: --size].")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--no-bf16", help="bfloat16 autocast while fine-tuning (less memory; slower on many CPUs) [default: off].")] = None,
    bn_stats_frozen: Annotated[Optional[bool], typer.Option("--bn-stats-frozen/--bn-stats-train", help="Keep BatchNorm statistics fixed while fine-tuning (--bn-stats-train made the loss jump when unfreezing) [default: frozen].")] = None,
    bs: BsOpt = None,
    wd: Annotated[Optional[float], typer.Option("--wd", help=f"AdamW weight decay [default: {default('wd')}].")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing of the loss, 0 to <1 [default: 0].")] = None,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Train the frozen stage on cached body features (fast) [default: cache].")] = None,
    views: Annotated[Optional[int], typer.Option("--views", help="Augmented views of each image in the feature cache, cycled over the epochs (2 is ~1.9x faster on the bears set, one more error in 189) [default: one per epoch].")] = None,
    bf16_features: Annotated[Optional[bool], typer.Option("--bf16-features/--no-bf16-features", help="bfloat16 autocast for the feature cache's body pass (torch engine only) [default: off].")] = None,
    dedupe_split: Annotated[Optional[bool], typer.Option("--dedupe-split/--no-dedupe-split", help="Keep each group of near-duplicate images on one side of the validation split [default: off].")] = None,
    curve: Annotated[Optional[bool], typer.Option("--curve/--no-curve", help="Add the learning curve (how many images are enough) to the report; ~25 s on the bears set [default: off].")] = None,
    target_precision: Annotated[Optional[float], typer.Option("--target-precision", help=f"Precision the 'unsure' threshold aims at on the validation set [default: {default('target_precision')}].")] = None,
    keep: Annotated[Optional[float], typer.Option("--keep", help=f"Share of validation images the 'none of these' (unknown) threshold keeps [default: {default('keep')}].")] = None,
    int8: Annotated[Optional[bool], typer.Option("--int8/--no-int8", help="Also write model.int8.onnx (smaller, faster), checked against fp32 on the validation images and not written when it loses over 1 point [default: off].")] = None,
    refit: Annotated[Optional[bool], typer.Option("--refit/--no-refit", help="Once the epochs are chosen on the validation images, train again on every image with the same decisions, for the model file (a quarter more to learn from; about twice the training time, up to three times; the figures stay the first model's, and the model has no 'none of these' threshold) [default: off].")] = None,
    epoch_kept: Annotated[Optional[str], typer.Option("--epoch-kept", help=f"The epoch whose weights the model file holds: best (the fewest wrong validation pictures, when it beats the last epoch: its reported error is chosen on those pictures, so recipe.json's honest figure corrects it) or last (the one-cycle schedule's end, as fastai's fine_tune; the default recipe only: --unfreeze-epochs keeps the last) [default: {default('epoch_kept')}].")] = None,
    device: DeviceOpt = "auto",
    balance: Annotated[Optional[str], typer.Option("--balance", help="Lopsided classes: auto (when the largest class has 2x the training images of the smallest, logit adjustment: the loss adds log(class share) to the logits), none (train as if equally common), weights (inverse-frequency loss weights), sampler (class-balanced batches), logit_adjust [default: auto].")] = None,
    pixels: Annotated[Optional[str], typer.Option("--pixels", help="Where decoded images live: auto (in memory when they fit, else decoded per batch by loader workers), memory or stream [default: auto].")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Go on with a stopped run (Ctrl-C, kill, a lost node) from its last completed epoch: its run folder; its options are used.")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Train with N processes on this machine: starts `torchrun --nproc-per-node N -m ursa train ...` (gloo on CPUs, NCCL on GPUs).")] = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a pretrained network on your images: frozen one-cycle, then fine-tuning when it pays and fits --budget."""
    options = dict(
        out=out, csv=csv, multi_label=multi_label, label_delim=label_delim, arch=arch, pretrained=pretrained, size=size, valid_pct=valid_pct, seed=seed,
        split_seed=split_seed, epochs=epochs, lr=lr, budget=parse_budget(budget),
        time_limit=parse_budget(time_limit, "--time-limit"), unfreeze_epochs=unfreeze_epochs,
        flips=flips, unfreeze_lr=parse_slice(unfreeze_lr), unfreeze_size=unfreeze_size, bf16=bf16,
        bn_stats_frozen=bn_stats_frozen, bs=bs, wd=wd, label_smoothing=label_smoothing, cache=cache, views=views,
        bf16_features=bf16_features, dedupe_split=dedupe_split, curve=curve, target_precision=target_precision,
        keep=keep, int8=int8, balance=balance, refit=refit, epoch_kept=epoch_kept,
    )
    if resume is not None:
        from ursa.training.resume import resume_config

        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
        if given or config is not None:
            raise UrsaError(f"--resume {resume}: the run goes on with its own options; leave out "
                            f"{', '.join(given + (['--config'] if config is not None else []))} "
                            "(only --device, --pixels, --nproc and --quiet may change)")
        world = int(os.environ.get("WORLD_SIZE", "0")) or nproc or 1
        check_outside(resume, data, "run folder")
        with _run_folder(resume, resume=True) as run:  # the lock first: a second --resume of this run is refused
            cfg, ckpt = resume_config(resume, data, world=world, device=device, pixels=pixels, quiet=quiet or None)
            _train_in(run, cfg, nproc, ckpt)
        return
    cfg = make_config(data, config, quiet=quiet or None, device=device, pixels=pixels, **options)
    check_outside(cfg.out, cfg.data, "run folder")
    with _run_folder(cfg.out) as run:
        _train_in(run, cfg, nproc, None)


def _train_in(run: Any, cfg: TrainConfig, nproc: int | None, ckpt: Any) -> None:
    """Train (here, or through torchrun with --nproc) inside the held run folder; record what the run wrote."""
    from ursa.errors import DivergedError
    from ursa.training.recipe import train

    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        if cfg.refit:  # before torchrun starts the ranks (prepare refuses it under torchrun too)
            raise UrsaError("--refit: not under torchrun yet (the second fit runs in one process); leave out --refit "
                            "or --nproc")
        rc = _launch(cfg, nproc)
        if run is not None:
            run.finish(model_written=rc == 0)
        raise typer.Exit(rc)
    try:
        res = train(cfg) if ckpt is None else train(cfg, resume=ckpt)
    except DivergedError:
        if run is not None:
            run.finish(model_written=False)
        raise
    if run is not None:
        run.finish(model_written=res.model_path is not None)
    _say_result(res)


RUN_LOCKED = "URSA_RUN_FOLDER_HELD"  # set by `ursa train --nproc` for its torchrun children: the parent holds it


@contextlib.contextmanager
def _run_folder(out: Path, resume: bool = False) -> Iterator[Any]:
    """The run folder held by the one process that writes it (rank 0, or the --nproc launcher); None elsewhere."""
    from ursa.training.runfolder import RunFolder

    held = os.environ.get(RUN_LOCKED)
    if os.environ.get("RANK", "0") != "0" or (held and Path(held).resolve() == Path(out).resolve()) or (
            resume and not out.is_dir()):
        yield None  # (no folder to resume: resume_config says so in one line)
        return
    with RunFolder(out, lambda line: typer.echo(line, err=True), resume=resume) as run:
        yield run


def _launch(cfg: TrainConfig, nproc: int) -> int:
    """`ursa train --nproc N`: check what can be checked here (one line, exit 2), then torchrun; rank 0's exit code."""
    import subprocess
    import tempfile

    from ursa.training.dist import rank_device
    from ursa.vision.labelsets import load_labelled

    rank_device(cfg.device, 0, nproc)
    load_labelled(cfg.data, cfg.csv, cfg.valid_pct, cfg.split_seed_used, label_delim=cfg.label_sets)  # fails once, here
    cmd = torchrun_command(nproc, sys.argv)
    typer.echo(f"starting: {' '.join(cmd)}", err=True)
    # torchrun's own default, set here so it does not print a banner about it: the cores shared out
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    with tempfile.TemporaryDirectory(prefix="ursa-nproc-") as tmp:
        code_file = Path(tmp) / "exit_code"
        env = {**os.environ, EXIT_FILE: str(code_file), "OMP_NUM_THREADS": threads, RUN_LOCKED: str(cfg.out.resolve())}
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        said = False
        for line in proc.stderr:
            # After rank 0's one-line error, what follows is torchrun reporting that a rank failed
            # (a ChildFailedError traceback): the user needs the line, not that.
            if not said:
                sys.stderr.write(line)
            said = said or line.startswith("error: ")
        rc = proc.wait()
        if rc != 0 and code_file.is_file():  # torchrun says 1 for any failure: give rank 0's (2 bad input, 3 diverged)
            return int(code_file.read_text().strip() or rc)
    return rc



def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`ursa train ... --nproc N` as torchrun's command line (the same options, without --nproc)."""
    args = list(argv[1:])
    start = args.index("train") if "train" in args else 0
    rest, skip = [], False
    for a in args[start:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    # --standalone: a free port and a local rendezvous, so two runs on one machine do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "ursa", *rest]


def _say_result(res: Any) -> None:
    """The run's summary on stdout (rank 0 only: the other ranks say nothing)."""
    if res.model_path is None and res.files is None:
        return
    m, plan = res.metrics, res.plan
    honest = (plan.honest.get("selection_corrected") if plan is not None else None)
    typer.echo(
        f"error_rate {m['error_rate']:.4f} (accuracy {m['accuracy']:.4f}) on {res.n_valid} validation images"
        + ("" if honest is None else f" ({honest:.4f} corrected for choosing the epoch on them)"
           if plan.honest.get("chosen", True) else " (the last epoch's: not chosen on them, so not corrected)")
        + f"; {res.seconds:.0f} s start to the end of training, peak memory {res.peak_rss_mb:.0f} MB"
    )
    if m.get("balanced_error") is not None:
        recall = m.get("recall") or {}
        low = sorted((v, c) for c, v in recall.items() if v is not None)[:3]
        typer.echo(f"balanced error {m['balanced_error']:.4f} (one minus the mean recall per class)"
                   + ("; lowest recall: " + ", ".join(f"{printable(c)} {v:.2f}" for v, c in low) if low else ""))
    if plan is not None:
        typer.echo(f"recipe: {plan.size} px, flips {plan.flips}, balance {plan.balance}, fine-tuning: "
                   f"{plan.fine_tune_why} (recipe.json)")
        if plan.compare:
            from ursa.training.compare import compare_line

            typer.echo(f"cleaning: {compare_line(plan.compare)}")
    refit = plan.refit if plan is not None else {}
    typer.echo(f"model: {res.model_path}" + (
        f" (refit on all {refit['pictures']} pictures; the figures above are the first fit's)" if refit.get("used")
        else " (the first fit's: the refit was not used, see advice.txt)" if refit else ""))
    if res.files is not None and res.files.best is not None:
        typer.echo(f"best epoch's weights: {res.files.best}")
    typer.echo(f"history: {res.out / 'history.csv'}, plots: batch.png, losses.png, lr.png, metrics.png, reliability.png"
               + (", curve.png" if "curve" in res.insight else "") + "; settings: config.json")
    found = res.files.advice if res.files is not None else []
    for a in found:
        typer.echo(f"advice: {a.text()}")
    if not found:
        typer.echo("advice: no failure mode detected (too high/too low learning rate, too few/too many epochs)")
    typer.echo(f"report: {res.out / 'report.html'} (advice.txt, report.json)")


def lr_find_cmd(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for lr_find.png and lr_find.json.")] = Path("runs/lr-find"),
    config: ConfigOpt = None,
    csv: CsvOpt = None,
    arch: ArchOpt = None,
    size: SizeOpt = None,
    unfrozen: Annotated[bool, typer.Option("--unfrozen", help="Sweep the whole network, as for fine-tuning (after --head-epochs of training the head), instead of the head alone.")] = False,
    head_epochs: Annotated[int, typer.Option("--head-epochs", min=0, help="With --unfrozen: train the head this many epochs first, as the lesson does before unfreezing.")] = 1,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"With --unfrozen: learning rate of those head epochs [default: {default('lr')}].")] = None,
    bs: BsOpt = None,
    valid_pct: ValidOpt = None,
    seed: SeedOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceOpt = "auto",
    quiet: Quiet = False,
) -> None:
    """Find a learning rate: sweep it from 1e-7 to 10 over 100 batches and suggest one (lr_find.png)."""
    import json

    from ursa.training.recipe import build_learner
    from ursa.util.files import atomic_write_text

    # The sweep itself is the lesson's, fixed: 1e-7 to 10 over at most 100 batches (lr_find's defaults).
    cfg = make_config(data, config, out=out, csv=csv, arch=arch, size=size, bs=bs, valid_pct=valid_pct, seed=seed,
                      lr=lr, quiet=quiet or None, device=device)
    learn, _ = build_learner(cfg)
    learn.freeze()
    if unfrozen:
        if head_epochs:
            learn.fit_one_cycle(head_epochs, cfg.lr)
        learn.unfreeze()
    out.mkdir(parents=True, exist_ok=True)
    default_lr = cfg.unfreeze_lrs[1] if unfrozen else cfg.lr
    res = learn.lr_find(plot=out / "lr_find.png", default=default_lr)
    atomic_write_text(out / "lr_find.json", json.dumps(res.to_dict(), indent=1) + "\n")
    if json_out:
        typer.echo(json.dumps({k: v for k, v in res.to_dict().items() if k not in ("lrs", "losses", "smoothed")}))
        return
    how = "whole network" if unfrozen else "head only" + (", on cached body features" if res.cached else "")
    typer.echo(f"lr_find ({how}): {len(res.lrs)} batches, lr {res.lrs[0]:.0e} to {res.lrs[-1]:.1e}"
               + (" (stopped: the loss blew up)" if res.stopped_early else ""))
    s = float(f"{res.suggestion:.1e}")  # the one number, printed and used alike
    typer.echo(f"suggested learning rate: {s:.1e} ({res.suggestion_why})")  # valley and steep: lr_find.json, the plot
    if s == float(f"{default_lr:.1e}"):
        typer.echo(f"use it: ursa train {data} (the default{' fine-tuning rate' if unfrozen else ''} is {s:.1e})")
    else:
        use = f"--unfreeze-lr {s / 100:.1e},{s:.1e}" if unfrozen else f"--lr {s:.1e}"
        typer.echo(f"use it: ursa train {data} {use}")
    typer.echo(f"plot: {out / 'lr_find.png'}")


def interpret_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train`.")],
    data: Annotated[Path, typer.Argument(help="The data folder the model was trained on.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html, report.json and the plots.")],
    all_images: Annotated[bool, typer.Option("--all", help="Every image in DATA, not only the validation set (before cleaning, as the lesson does).")] = False,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="CSV of name,label relative to DATA (fastai's cleaned.csv) for the labels.")] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Top losses shown as pictures.")] = 12,
    min_val: Annotated[int, typer.Option("--min-val", min=1, help="Most-confused pairs with at least this many images.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json instead of the summary.")] = False,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Test-time augmentation: also predict the mirror image(s) the model was trained with and average the calibrated probabilities (2-3x the compute).")] = False,
    device: DeviceOpt = "auto",
    quiet: Quiet = False,
) -> None:
    """Confusion matrix, most confused classes, precision/recall and top losses, as report.html/json."""

    from ursa.diagnose.advice import History
    from ursa.diagnose.interpret import interpret_model
    from ursa.diagnose.report import run_plots, write_report
    from ursa.util.progress import make_console, progress_bar

    check_outside(out, data)
    console = make_console(quiet)
    with progress_bar(console, quiet) as prog:
        task = prog.add_task("predicting", total=None)
        interp = interpret_model(model, data, all_images=all_images, csv_path=csv, tta=tta, device=device,
                                 say=lambda line: prog.console.print(line, highlight=False),
                                 progress=lambda k, n: prog.update(task, completed=k, total=n))
    run = model.parent
    hist = History.read_csv(run / "history.csv") if (run / "history.csv").is_file() else None
    info = {"title": "ursa interpretation", "model": str(model), "data": str(data),
            "set": "every image" if all_images else "validation set" + (" (split.csv)" if (run / "split.csv").is_file() and csv is None else ""),
            "backend": interp.backend, "tta": interp.tta or "off"}
    if interp.thresholds is not None:  # a multi-label model: per-label figures, errors and confused pairs
        from ursa.diagnose.label_report import label_lines, write_interpretation

        files, figures = write_interpretation(out, interp, hist, run_plots(run), info, data)
        typer.echo(files["json"].read_text() if json_out else "\n".join(label_lines(figures)))
        return
    files = write_report(out, interp, hist, run_plots(run), info, k=top, model=model)
    if json_out:
        typer.echo(files["json"].read_text())
        return
    what = "images" if all_images else "validation images"
    typer.echo(f"backend: {interp.backend}" + (f"; tta: {interp.tta}" if interp.tta else ""))
    typer.echo(f"error rate {interp.error_rate:.4f} on {len(interp)} {what}"
               + (f"; {len(interp.skipped)} skipped (unreadable or missing)" if interp.skipped else ""))
    typer.echo(interp.confusion_text())
    mc = interp.most_confused(min_val)
    typer.echo("most confused (actual -> predicted): " + (", ".join(f"{a} -> {p} ({n})" for a, p, n in mc) or "none"))
    for c, m in interp.per_class().items():
        typer.echo(f"  {c}: precision {m['precision']:.3f}, recall {m['recall']:.3f} ({m['support']} images)")
    unknown = (interp.open_world or {}).get("unknown") or {}
    if unknown.get("fitted") and unknown.get("turned_away") is not None:
        typer.echo(f"{unknown['line']}; {100 * unknown['turned_away']:.1f}% of these images would be answered 'none of these'")
    else:
        typer.echo(f"unknown detection: {unknown.get('note') or 'not available'}")
    for name, why in interp.skipped[:10]:
        typer.echo(f"skipped {name}: {why}", err=True)
    typer.echo(f"report: {files['html']} (and {files['json'].name})")
