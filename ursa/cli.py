"""Thin glue: parse arguments, call one function, map errors to exit codes.

Exit codes: 0 success; 1 the job ran but failed; 2 bad input or usage (one clear line on
stderr, no traceback); 3 training stopped because it diverged.
Heavy imports (torch, timm) happen inside commands so ``ursa --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.errors import UrsaError

app = typer.Typer(
    name="ursa",
    help="Build your own image classifier from your own pictures: download, verify, train, "
    "interpret, clean, export and serve. Works offline on a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Hide progress bars.")]


# --- train/predict/export commands (core) ---


def _parse_slice(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UrsaError(f"--unfreeze-lr must be two numbers LO,HI (got {text!r})") from None
    if not 0 < lo <= hi:
        raise UrsaError(f"--unfreeze-lr must satisfy 0 < LO <= HI (got {text!r})")
    return lo, hi


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (or train/ and valid/).")],
    csv: Annotated[Optional[Path], typer.Option("--csv", help="CSV of name,label relative to DATA (fastai's cleaned.csv).")] = None,
    arch: Annotated[str, typer.Option("--arch", help="efficientnet_lite0/1/2 (offline) or a timm name.")] = "efficientnet_lite0",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Start from ImageNet weights.")] = True,
    size: Annotated[Optional[int], typer.Option("--size", min=32, max=1024, help="Input size (default: the architecture's).")] = None,
    valid_pct: Annotated[float, typer.Option("--valid-pct", help="Share of images held out for validation.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and of training.")] = 42,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="Frozen epochs (head only).")] = 4,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Max learning rate of the frozen stage.")] = 3e-3,
    unfreeze_epochs: Annotated[int, typer.Option("--unfreeze-epochs", min=0, help="Epochs of fine-tuning everything.")] = 2,
    unfreeze_lr: Annotated[Optional[str], typer.Option("--unfreeze-lr", help="LO,HI learning rates for early and late layers (default lr/100,lr/10).")] = None,
    bs: Annotated[int, typer.Option("--bs", min=2, help="Batch size.")] = 32,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Train the frozen stage on cached body features (fast).")] = True,
    out: Annotated[Path, typer.Option("--out", help="Run folder for the model file, history and plots.")] = Path("runs/latest"),
    quiet: Quiet = False,
) -> None:
    """Fine-tune a pretrained network on your images: frozen one-cycle, then unfreeze."""
    from ursa.train import TrainConfig, train

    if lr <= 0:
        raise UrsaError(f"--lr must be positive (got {lr})")
    cfg = TrainConfig(
        data=data, out=out, csv=csv, arch=arch, pretrained=pretrained, size=size, valid_pct=valid_pct, seed=seed,
        epochs=epochs, lr=lr, unfreeze_epochs=unfreeze_epochs, unfreeze_lr=_parse_slice(unfreeze_lr), bs=bs,
        cache=cache, quiet=quiet,
    )
    if epochs + unfreeze_epochs == 0:
        raise UrsaError("nothing to do: --epochs and --unfreeze-epochs are both 0")
    res = train(cfg)
    m = res.metrics
    typer.echo(
        f"error_rate {m['error_rate']:.4f} (accuracy {m['accuracy']:.4f}) on {res.n_valid} validation images; "
        f"{res.seconds:.0f} s, peak memory {res.peak_rss_mb:.0f} MB"
    )
    typer.echo(f"model: {res.model_path}")
    typer.echo(f"history: {res.out / 'history.csv'}, plot: {res.out / 'losses.png'}")


@app.command("predict")
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or model.onnx).")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Predict the class of each image."""
    import json

    from ursa.errors import ImageError
    from ursa.predict import load_learner

    pred = load_learner(model)
    failed = 0
    for f in images:
        try:
            label, index, probs = pred.predict(f)
        except ImageError as e:
            failed += 1
            if len(images) == 1:
                raise UrsaError(f"{e}; give a JPEG, PNG, GIF, WEBP, BMP or TIFF image") from None
            typer.echo(f"error: {e}", err=True)
            continue
        if json_out:
            typer.echo(json.dumps({"file": str(f), "label": label, "index": index, "probs": probs}))
        else:
            typer.echo(f"{f}: {label} ({probs[label]:.3f})")
    if failed:
        raise typer.Exit(2)

# --- download/verify commands ---


@app.command("download")
def download_cmd(
    urls: Annotated[
        list[str],
        typer.Argument(metavar="URLS", help="URL lists: CLASS=FILE or files named urls_<class>.txt / urls_<class>.csv."),
    ],
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Folder for DEST/<class>/ images and downloads.csv.")],
    max_pics: Annotated[int, typer.Option(help="Most images saved per class (0 = no cap).")] = 200,
    workers: Annotated[int, typer.Option(help="Downloads in flight at once.")] = 16,
    per_host: Annotated[int, typer.Option(help="Most requests in flight to one host.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection or the next bytes.")] = 10.0,
    deadline: Annotated[
        Optional[float], typer.Option(help="Most seconds spent on one URL, retries included [default: 6 x timeout].")
    ] = None,
    retries: Annotated[int, typer.Option(help="Retries after a timeout, a 429 or a 5xx.")] = 3,
    max_size: Annotated[int, typer.Option(help="Shrink the long side to this many pixels (0 = keep as is).")] = 1024,
    max_bytes: Annotated[str, typer.Option(help="Skip downloads bigger than this (e.g. 20MB, 500KB).")] = "20MB",
    retry_failed: Annotated[bool, typer.Option(help="Retry URLs that failed in an earlier run.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Download the images behind per-class URL lists; every URL is accounted for in DEST/downloads.csv."""
    from ursa.download import download_images

    summary = download_images(
        urls, dest, max_pics=max_pics, workers=workers, per_host=per_host, timeout=timeout, deadline=deadline,
        retries=retries, max_size=max_size, max_bytes=max_bytes, retry_failed=retry_failed, progress=not quiet,
    )
    print(summary.to_json() if json_out else summary.format())


@app.command("verify")
def verify_cmd(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of class folders to check.")],
    delete: Annotated[bool, typer.Option("--delete", help="Delete broken files instead of quarantining them.")] = False,
    fix: Annotated[
        bool, typer.Option("--fix", help="Replace CMYK/palette/RGBA/16-bit (and oversized) images by RGB copies.")
    ] = False,
    max_size: Annotated[Optional[int], typer.Option(help="With --fix: shrink the long side to this.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes [default: min(4, CPUs)]; 1 = no pool.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Decode every image; move broken ones to _quarantine/ (or delete them) and record why in verify.csv."""
    from ursa.verify import verify_images

    summary = verify_images(folder, delete=delete, fix=fix, max_size=max_size, workers=workers, progress=not quiet)
    print(summary.to_json() if json_out else summary.format())


# --- lr-find/interpret commands ---

# --- serve command ---

# --- clean command ---

# --- sgd command ---


@app.command("sgd")
def sgd_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Animation to write: .gif, .html (a self-contained page) or .mp4 (needs ffmpeg).",
        ),
    ],
    lr: Annotated[
        Optional[float], typer.Option(help="Learning rate: how far each step walks downhill. [default: 0.1]")
    ] = None,
    steps: Annotated[int, typer.Option(help="How many updates to make.")] = 100,
    batch_size: Annotated[
        Optional[int],
        typer.Option("--batch-size", help="Points per step (mini-batch SGD). Default: all 100 (gradient descent)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the points and the mini-batches.")] = 0,
    compare: Annotated[
        Optional[str],
        typer.Option(
            help="Learning rates to fit side by side, e.g. 0.01,0.1,1.1 (too low, good, too high); "
            "also writes OUT's name + _losses.png."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Watch gradient descent fit a line to 100 points: the lesson's SGD from scratch, animated."""
    from ursa import sgd

    if compare is not None and lr is not None:
        raise UrsaError("use either --lr (one run) or --compare (several learning rates), not both")
    lrs = sgd.parse_lrs(compare) if compare is not None else [0.1 if lr is None else lr]
    x, y = sgd.make_data(seed=seed)
    for rate in lrs:  # refuse bad settings before any run starts or any file is touched
        sgd.check_settings(rate, steps, batch_size, len(x))
    sgd.check_out(out)
    losses_png = out.with_name(out.stem + "_losses.png")
    how = "gradient descent" if batch_size is None else f"SGD, mini-batches of {batch_size}"
    runs = []
    for rate in lrs:
        if not quiet:
            print(f"lr {rate:g}, {steps} steps, {how}:")
        runs.append(
            sgd.fit(x, y, lr=rate, steps=steps, batch_size=batch_size, seed=seed, log=None if quiet else print)
        )
    for run in runs:
        if run.diverged:
            print(
                f"diverged: with lr {run.lr:g} the loss grew from {run.losses[0]:.4g} to "
                f"{run.final_loss:.4g} by step {run.diverged_at}, so updating stopped there"
                + ("" if compare is not None else "; try a smaller --lr (0.1 works)")
            )
    anim = sgd.animate(x, y, runs)
    n_frames = len(sgd.frame_steps(max(len(r.snapshots) for r in runs)))
    if not quiet:
        print(f"drawing {n_frames} frames...")
    sgd.save_animation(anim, out)
    print(f"wrote {out} ({n_frames} frames, {out.stat().st_size / 1024:.0f} KiB)")
    if compare is not None:
        sgd.save_loss_plot(runs, losses_png)
        print(f"wrote {losses_png} (loss curves, log scale)")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a UrsaError becomes one line on stderr and its exit code, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UrsaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Usage errors from click (typer may vendor its own copy, so test by shape, not class).
        if hasattr(e, "show") and hasattr(e, "exit_code") and type(e).__module__.split(".")[0] in ("click", "typer"):
            e.show()
            return 2 if e.exit_code not in (0, 1) else e.exit_code or 2
        raise
    return 0


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
