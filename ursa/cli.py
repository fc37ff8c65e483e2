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
    unfreeze_epochs: Annotated[int, typer.Option("--unfreeze-epochs", min=0, help="Epochs of fine-tuning everything afterwards (the lesson uses 2; off by default: on the bears set it cost 3x the time and did not lower the error).")] = 0,
    unfreeze_lr: Annotated[Optional[str], typer.Option("--unfreeze-lr", help="LO,HI learning rates for early and late layers (default lr/100,lr/10).")] = None,
    bs: Annotated[int, typer.Option("--bs", min=2, help="Batch size.")] = 32,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Train the frozen stage on cached body features (fast).")] = True,
    views: Annotated[Optional[int], typer.Option("--views", min=1, help="Augmented views of each image in the feature cache, cycled over the epochs (default: one per epoch; 2 is ~1.9x faster on the bears set, one more error in 189).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run folder for the model file, history and plots.")] = Path("runs/latest"),
    quiet: Quiet = False,
) -> None:
    """Fine-tune a pretrained network on your images: frozen one-cycle (then unfreeze, if asked)."""
    from ursa.training.recipe import TrainConfig, train

    if lr <= 0:
        raise UrsaError(f"--lr must be positive (got {lr})")
    cfg = TrainConfig(
        data=data, out=out, csv=csv, arch=arch, pretrained=pretrained, size=size, valid_pct=valid_pct, seed=seed,
        epochs=epochs, lr=lr, unfreeze_epochs=unfreeze_epochs, unfreeze_lr=_parse_slice(unfreeze_lr), bs=bs,
        cache=cache, views=views, quiet=quiet,
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
    best = res.out / "best.safetensors"
    if res.model_path is not None and best.is_file() and best.stat().st_mtime >= res.model_path.stat().st_mtime:
        typer.echo(f"best epoch's weights: {best}")
    typer.echo(f"history: {res.out / 'history.csv'}, plots: losses.png, lr.png, metrics.png")
    if res.learner is not None:
        from ursa.diagnose.advice import History, advise

        found = advise(History.from_recorder(res.learner.recorder))
        for a in found:
            typer.echo(f"advice: {a.text()}")
        if not found:
            typer.echo("advice: no failure mode detected (too high/too low learning rate, too few/too many epochs)")
    typer.echo(f"report: {res.out / 'report.html'} (advice.txt, report.json)")


@app.command("predict")
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or model.onnx).")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="auto (MODEL.onnx beside MODEL when it is up to date), torch or onnx.")] = "auto",
) -> None:
    """Predict the class of each image."""
    import json

    from ursa.errors import ImageError
    from ursa.inference.predictor import BACKENDS, load_learner

    if backend not in BACKENDS:
        raise UrsaError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    pred = load_learner(model, backend=backend)
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
    from ursa.acquire.download import download_images

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
    workers: Annotated[
        Optional[int], typer.Option(help="Processes; 1 = no pool [default: min(4, CPUs), 1 under 16 MB of images].")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Decode every image; move broken ones to _quarantine/ (or delete them) and record why in verify.csv."""
    from ursa.acquire.verify import verify_images

    summary = verify_images(folder, delete=delete, fix=fix, max_size=max_size, workers=workers, progress=not quiet)
    print(summary.to_json() if json_out else summary.format())


# --- lr-find/interpret commands ---


def _out_outside(out: Path, data: Path) -> None:
    """Refuse to write into the user's data folder (same rule as train)."""
    d, o = data.resolve(), out.resolve()
    if o == d or d in o.parents:
        raise UrsaError(f"{out}: the output folder must be outside the data folder {data} (ursa never writes into your data)")


@app.command("lr-find")
def lr_find_cmd(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (or train/ and valid/).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for lr_find.png and lr_find.json.")] = Path("runs/lr-find"),
    csv: Annotated[Optional[Path], typer.Option("--csv", help="CSV of name,label relative to DATA (fastai's cleaned.csv).")] = None,
    arch: Annotated[str, typer.Option("--arch", help="efficientnet_lite0/1/2 (offline) or a timm name.")] = "efficientnet_lite0",
    size: Annotated[Optional[int], typer.Option("--size", min=32, max=1024, help="Input size (default: the architecture's).")] = None,
    unfrozen: Annotated[bool, typer.Option("--unfrozen", help="Sweep the whole network, as for fine-tuning (after --head-epochs of training the head), instead of the head alone.")] = False,
    head_epochs: Annotated[int, typer.Option("--head-epochs", min=0, help="With --unfrozen: train the head this many epochs first, as the lesson does before unfreezing.")] = 1,
    bs: Annotated[int, typer.Option("--bs", min=2, help="Batch size.")] = 32,
    valid_pct: Annotated[float, typer.Option("--valid-pct", help="Share of images held out (not swept).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and of the sweep.")] = 42,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Find a learning rate: sweep it from 1e-7 to 10 over 100 batches and suggest one (lr_find.png)."""
    import json

    import torch
    from rich.console import Console

    from ursa.vision.data import load_dataset

    from ursa.vision.loaders import dataloaders
    from ursa.training.learner import Learner
    from ursa.vision.models import create_model, get_spec
    from ursa.util.progress import progress_bar
    from ursa.util.files import atomic_write_text

    console = Console(stderr=True, quiet=quiet)
    ds = load_dataset(data, csv, valid_pct, seed)
    _out_outside(out, data)
    spec = get_spec(arch)
    size = size or spec.input_size
    torch.manual_seed(seed)
    model = create_model(arch, n_classes=len(ds.classes))
    with progress_bar(console, quiet) as prog:
        task = prog.add_task("decoding images", total=len(ds))
        dls = dataloaders(ds, size, spec.mean, spec.std, bs=bs, seed=seed, progress=lambda n: prog.update(task, advance=n))
    learn = Learner(dls, model, quiet=quiet, console=console, seed=seed)
    learn.freeze()
    if unfrozen:
        if head_epochs:
            learn.fit_one_cycle(head_epochs, 3e-3)
        learn.feature_cache = None
        learn.unfreeze()
    out.mkdir(parents=True, exist_ok=True)
    res = learn.lr_find(plot=out / "lr_find.png")
    atomic_write_text(out / "lr_find.json", json.dumps(res.to_dict(), indent=1) + "\n")
    if json_out:
        typer.echo(json.dumps({k: v for k, v in res.to_dict().items() if k not in ("lrs", "losses", "smoothed")}))
        return
    how = "whole network" if unfrozen else "head only" + (", on cached body features" if res.cached else "")
    typer.echo(f"lr_find ({how}): {len(res.lrs)} batches, lr {res.lrs[0]:.0e} to {res.lrs[-1]:.1e}"
               + (" (stopped: the loss blew up)" if res.stopped_early else ""))
    typer.echo(f"suggested learning rate: {res.suggestion:.1e} (valley)")
    for line in res.explain():
        typer.echo(f"  {line}")
    s = res.suggestion
    use = f"--unfreeze-lr {s / 100:.0e},{s:.0e}" if unfrozen else f"--lr {s:.0e}"
    typer.echo(f"use it: ursa train {data} {use}")
    typer.echo(f"plot: {out / 'lr_find.png'}")


@app.command("interpret")
def interpret_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train`.")],
    data: Annotated[Path, typer.Argument(help="The data folder the model was trained on.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html, report.json and the plots.")],
    all_images: Annotated[bool, typer.Option("--all", help="Every image in DATA, not only the validation set (before cleaning, as the lesson does).")] = False,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="CSV of name,label relative to DATA (fastai's cleaned.csv) for the labels.")] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Top losses shown as pictures.")] = 12,
    min_val: Annotated[int, typer.Option("--min-val", min=1, help="Most-confused pairs with at least this many images.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print report.json instead of the summary.")] = False,
    quiet: Quiet = False,
) -> None:
    """Confusion matrix, most confused classes, precision/recall and top losses, as report.html/json."""
    from rich.console import Console

    from ursa.diagnose.advice import History
    from ursa.diagnose.interpret import interpret_model
    from ursa.util.progress import progress_bar
    from ursa.diagnose.report import run_plots, write_report

    _out_outside(out, data)
    console = Console(stderr=True, quiet=quiet)
    with progress_bar(console, quiet) as prog:
        task = prog.add_task("predicting", total=None)
        interp = interpret_model(model, data, all_images=all_images, csv_path=csv,
                                 progress=lambda k, n: prog.update(task, completed=k, total=n))
    run = model.parent
    hist = History.read_csv(run / "history.csv") if (run / "history.csv").is_file() else None
    info = {"title": "ursa interpretation", "model": str(model), "data": str(data),
            "set": "every image" if all_images else "validation set" + (" (split.csv)" if (run / "split.csv").is_file() and csv is None else "")}
    files = write_report(out, interp, hist, run_plots(run), info, k=top)
    if json_out:
        typer.echo(files["json"].read_text())
        return
    what = "images" if all_images else "validation images"
    typer.echo(f"error rate {interp.error_rate:.4f} on {len(interp)} {what}"
               + (f"; {len(interp.skipped)} skipped (unreadable or missing)" if interp.skipped else ""))
    typer.echo(interp.confusion_text())
    mc = interp.most_confused(min_val)
    typer.echo("most confused (actual -> predicted): " + (", ".join(f"{a} -> {p} ({n})" for a, p, n in mc) or "none"))
    for c, m in interp.per_class().items():
        typer.echo(f"  {c}: precision {m['precision']:.3f}, recall {m['recall']:.3f} ({m['support']} images)")
    for name, why in interp.skipped[:10]:
        typer.echo(f"skipped {name}: {why}", err=True)
    typer.echo(f"report: {files['html']} (and {files['json'].name})")


# --- serve command ---


@app.command("serve")
def serve_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or model.onnx).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes, each with its own copy of the model.")] = 1,
    max_bytes: Annotated[str, typer.Option("--max-bytes", help="Largest request body accepted (e.g. 10MB, 500KB).")] = "10MB",
    backend: Annotated[str, typer.Option("--backend", help="auto (MODEL.onnx beside MODEL when it is up to date), torch or onnx.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Inference threads per worker [default: cores / workers].")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most concurrent requests run as one batch (1 = no micro-batching).")] = 16,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0.0, help="How long an idle server waits to fill a batch.")] = 0.0,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast on the torch backend (see docs/serve.md).")] = False,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log one line per request.")] = True,
) -> None:
    """Serve the model: a web page at / and a JSON API at /predict, until Ctrl-C."""
    from ursa.inference.predictor import BACKENDS
    from ursa.apps.serve import ServeConfig, parse_bytes, serve

    if backend not in BACKENDS:
        raise UrsaError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this computer can use the model", err=True)
    cfg = ServeConfig(model=model, max_bytes=parse_bytes(max_bytes), backend=backend, threads=threads,
                      max_batch=max_batch, batch_wait_ms=batch_wait_ms, bf16=bf16)
    serve(cfg, host=host, port=port, workers=workers, access_log=access_log,
          ready=lambda url: typer.echo(f"serving {model} at {url} (Ctrl-C to stop)", err=True))


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train`.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Write an ONNX model for onnxruntime.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="ONNX file to write [default: MODEL with .onnx].")] = None,
) -> None:
    """Export the model for other runtimes: `--onnx` writes MODEL.onnx, which predict and serve then use."""
    from ursa.inference.export import export_onnx

    if not onnx:
        raise UrsaError("nothing to export: pass --onnx (the model file itself is already the portable export)")
    path = export_onnx(model, out)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); checked against torch to 1e-4")

# --- clean command ---


@app.command("clean")
def clean_cmd(
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class (or train/ and valid/).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="model.safetensors written by `ursa train`.")],
    csv: Annotated[Optional[Path], typer.Option("--csv", help="CSV of name,label relative to DATA (e.g. DATA/cleaned.csv).")] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port of the local cleaner page.")] = 8765,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser; print the address.")] = False,
    export: Annotated[Optional[Path], typer.Option("--export", help="Write the rankings as CSV files into DIR and exit (no page).", metavar="DIR")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Cosine similarity above which two images are near-duplicates (measured on bears: docs/clean.md).")] = 0.88,
    quiet: Quiet = False,
) -> None:
    """Find top losses, likely label errors and duplicates; keep, exclude or relabel them in your browser.

    Decisions are saved to DATA/cleaned.csv and DATA/clean_log.csv as you make them; no image is ever
    moved or deleted. Retrain with `ursa train DATA --csv DATA/cleaned.csv`.
    """
    import time

    from ursa.apps import clean

    t0 = time.perf_counter()
    if export is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this computer can see your images", err=True)
    if export is None:  # fail before the slow pass, not after it
        clean.free_port_or_error(host, port)
        if data.is_dir():
            clean.check_writable(data, csv)
    took: dict[str, float] = {}
    ds, scores, ranks = clean.prepare(data, model, csv, threshold=threshold, quiet=quiet, timings=took)
    typer.echo(clean.summary_line(scores, ranks))
    if export is not None:
        files = clean.export_rankings(export, scores, ranks)
        typer.echo(f"wrote {', '.join(str(p) for p in files.values())} in {time.perf_counter() - t0:.1f} s "
                   f"(model pass {took['model_pass']:.1f} s, rankings {took['rankings']:.1f} s)")
        return
    session = clean.start_session(ds, scores, ranks, model_name=str(model), csv_path=csv)
    clean.serve(session, host, port, open_browser=not no_browser, echo=typer.echo)


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
    import logging

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
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
