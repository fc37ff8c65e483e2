"""`ursa predict`, `ursa export` and `ursa serve`: the model file in production."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ursa.cli.common import BACKEND_HELP, DeviceOpt
from ursa.errors import UrsaError


def image_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, sub-folders included)."""
    from ursa.vision.images import is_image_file

    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise UrsaError(f"{p}: no image files in this folder (looked for .jpg, .png, .webp, ...)")
            out += found
        else:
            out.append(p)
    return out


def predict_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or model.onnx).")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    bs: Annotated[int, typer.Option("--bs", min=1, help="Images per batch (ONNX Runtime, or torch on a GPU; torch on the CPU takes one at a time).")] = 32,
    unsure: Annotated[Optional[float], typer.Option("--unsure", min=0.0, max=1.0, help="Answer 'unsure' below this top (calibrated) probability [default: the model's stored threshold; 0 turns it off].")] = None,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Test-time augmentation: also predict the mirror image(s) the model was trained with and average the calibrated probabilities (2-3x the compute).")] = False,
    keep: Annotated[Optional[float], typer.Option("--keep", help="Answer 'none of these' to pictures less like the training images than all but this share of the validation images [default: the share chosen when training, `ursa train --keep`, 0.95 unless set].")] = None,
    level: Annotated[Optional[float], typer.Option("--set", help="Also answer the smallest set of labels holding the true one this share of the time, e.g. 0.9 (split conformal on the validation images).")] = None,
    device: DeviceOpt = "auto",
    explain: Annotated[Optional[Path], typer.Option("--explain", help="Also write a heat-map overlay PNG per image into this folder (the evidence for the predicted class; see docs/explain.md).")] = None,
) -> None:
    """Predict the class of each image, streaming results in order; exit status 1 when some could not be read."""
    import json

    from ursa.errors import ImageError
    from ursa.inference.openset import keep_share, level_share
    from ursa.inference.placement import place
    from ursa.inference.runtime import current_onnx
    from ursa.inference.tta import NO_VIEWS, views_text
    from ursa.util.names import printable

    keep = None if keep is None else keep_share(keep, "--keep")
    level = None if level is None else level_share(level)
    where = place(device)  # an unknown or absent device: one line, exit 2, before anything is read
    files = image_inputs(images)
    threshold: Any = "model" if unsure is None else (unsure or None)
    fast, why = current_onnx(model, backend, tta=tta, device=where)
    if fast is not None:
        said, views = f"backend: onnxruntime ({fast.source}, {'int8' if fast.describe()['int8'] else 'fp32'}; {why})", fast.views
        answers = fast.stream(files, bs, threshold)
    else:
        from ursa.inference.predictor import load_predictor

        pred = load_predictor(model, backend="torch" if backend == "auto" else backend, tta=tta, device=where)
        said, views = f"backend: torch ({why})", pred.views
        answers = pred.stream(files, 1 if where.is_cpu else bs, threshold)  # the CPU: one at a time, as always
    runner = fast if fast is not None else pred
    said += f"; {runner.device_line()}"
    if level is not None:
        runner.world.check_sets()  # one line, exit 2, before any image is read
    if explain is not None:
        from ursa.inference.explain import explain_stream, explainable, write_overlay

        explainable(runner, explain, [d for d in images if d.is_dir()])
        answers = explain_stream(runner, files, bs if fast is not None or not where.is_cpu else 1, threshold)
        written = 0
    if len(views) > 1:
        said += f"; tta: {views_text(views)}"
    elif tta:
        typer.echo(f"warning: {NO_VIEWS}", err=True)
    if runner.world.why:
        said += f"\nnote: {runner.world.why}"
    failed = 0
    for f, ans in answers:
        if isinstance(ans, ImageError) and len(files) == 1:  # the one input given is bad: a usage error, exit 2, one line
            raise UrsaError(f"{ans}; give a JPEG, PNG, GIF, WEBP, BMP or TIFF image") from None
        if said:  # once, before any answer or error: which backend, on which device
            typer.echo(said, err=True)
            said = ""
        if isinstance(ans, ImageError):
            failed += 1
            typer.echo(f"error: {ans}", err=True)
            continue
        extra = {}
        if explain is not None:  # an Explanation: write its overlay, then answer as always
            extra = {"overlay": str(write_overlay(explain, f, ans))}
            ans, written = ans.prediction, written + 1
        if keep is not None or level is not None:
            ans = runner.world.judge(ans, keep, level)
        if json_out:
            typer.echo(json.dumps({"file": str(f), **ans.to_json(), **extra}, allow_nan=False))  # Prediction: finite only
            continue
        in_set = f"; set {{{', '.join(printable(c) for c in ans.labels)}}} at {ans.level:g}" if ans.labels is not None else ""
        name = printable(str(f))  # printable: a newline or raw byte in a name never splits the line
        if ans.unknown:
            typer.echo(f"{name}: {printable(ans.shown)} (unknown score {ans.unknown_score:.3f} "
                       f"above {ans.unknown_threshold:.3f}){in_set}")
        elif ans.unsure:
            typer.echo(f"{name}: unsure (best guess {printable(ans.label)} {ans.confidence:.3f}, "
                       f"below {ans.threshold:.2f}){in_set}")
        else:
            typer.echo(f"{name}: {printable(ans.answer_text)}{in_set}")  # a multi-label model: its set of labels
    if explain is not None:
        typer.echo(f"wrote {written} overlays to {printable(str(explain))}", err=True)
    if failed:
        typer.echo(f"{failed} of {len(files)} images could not be read; the others were predicted", err=True)
        raise typer.Exit(1)  # the job ran but did not fully succeed


def export_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or its model.onnx, for --int8).")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Write an ONNX model for onnxruntime.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write MODEL.int8.onnx, checked against fp32 on the run's validation images.")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="The training data folder, for --int8 [default: the one in the model's config].")] = None,
    method: Annotated[str, typer.Option("--int8-method", help="auto (try both, keep the fastest that passes), static or dynamic.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="ONNX file to write [default: MODEL with .onnx].")] = None,
) -> None:
    """Export the model for other runtimes: `--onnx` writes MODEL.onnx (predict and serve then use it), `--int8` an INT8 copy."""
    if not onnx and not int8:
        raise UrsaError("nothing to export: pass --onnx or --int8 (the model file itself is already the portable export)")
    if onnx and int8 and out is not None:
        raise UrsaError("--out names one file, and --onnx --int8 writes two (MODEL.onnx and MODEL.int8.onnx): "
                        "drop --out, or export them one at a time")
    if model.suffix.lower() == ".onnx":
        if onnx or not int8:
            raise UrsaError(f"{model}: --onnx exports a model.safetensors file; give that one")
        fp32, source = model, model.with_suffix(".safetensors")
    else:
        from ursa.inference.export import export_onnx

        fp32, source = (out if out is not None and not int8 else model.with_suffix(".onnx")), model
        if onnx or not fp32.is_file() or fp32.stat().st_mtime < model.stat().st_mtime:
            fp32 = export_onnx(model, fp32)
            record_in_run(fp32)
            typer.echo(f"wrote {fp32} ({fp32.stat().st_size / 1e6:.1f} MB); checked against torch to 1e-4")
    if int8:
        from ursa.inference.quantize import export_int8

        path, report = export_int8(fp32, source, data, out if model.suffix.lower() == ".onnx" or onnx is False else None,
                                   method=method, say=lambda line: typer.echo(line, err=True))
        record_in_run(path)
        typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {report['method']}): top-1 agreement with fp32 "
                   f"{100 * report['agreement']:.1f}%, error rate {100 * report['error_fp32']:.2f}% -> "
                   f"{100 * report['error_int8']:.2f}% ({report['error_change_points']:+.2f} points)")


def record_in_run(path: Path) -> None:
    """A file export wrote into a run folder (one with ursa's manifest) is ursa's: recorded there, so the next
    training run into that folder replaces or removes it instead of leaving an older model beside the new one."""
    from ursa.training.runfolder import is_run_file
    from ursa.util.manifest import Manifest

    manifest = Manifest(path.parent)
    if manifest.exists and is_run_file(path.name):
        manifest.add([path.name])


def serve_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or model.onnx).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes, each with its own copy of the model.")] = 1,
    max_bytes: Annotated[str, typer.Option("--max-bytes", help="Largest request body accepted (e.g. 10MB, 500KB).")] = "10MB",
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Inference threads per worker [default: cores / workers].")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most concurrent requests run as one batch (1 = no micro-batching).")] = 16,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0.0, help="How long an idle server waits to fill a batch.")] = 0.0,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast on the torch backend (see docs/serve.md).")] = False,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log one line per request.")] = True,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Most decoded pixels of one image (JPEGs decode at reduced size); 413 above.")] = 40_000_000,
    max_request_pixels: Annotated[int, typer.Option("--max-request-pixels", min=1, help="Most decoded pixels of all images of one request; 413 above.")] = 120_000_000,
    request_timeout: Annotated[float, typer.Option("--request-timeout", min=0.001, help="Seconds to decode and predict once the body is in; 503 after.")] = 30.0,
    read_timeout: Annotated[float, typer.Option("--read-timeout", min=0.001, help="Seconds a request body may pause; 408 after.")] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.001, help="Seconds for a whole request body; 408 after.")] = 60.0,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.001, help="Seconds for the request line and headers; 408 after.")] = 10.0,
    limit_concurrency: Annotated[int, typer.Option("--limit-concurrency", min=1, help="Open connections before new ones get 503 (idle ones are closed first).")] = 256,
    drift_window: Annotated[int, typer.Option("--drift-window", min=1, help="/health's drift line compares the last N answers with the validation set's.")] = 500,
    device: DeviceOpt = "auto",
) -> None:
    """Serve the model: a web page at / and a JSON API at /predict, until Ctrl-C."""
    from ursa.apps.serve import ServeConfig, serve
    from ursa.inference.placement import place
    from ursa.inference.results import check_backend
    from ursa.util.numbers import parse_bytes

    check_backend(backend)
    where = place(device)  # an unknown or absent device: one line, exit 2, before a port is opened
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this computer can use the model", err=True)
    cfg = ServeConfig(model=model, max_bytes=parse_bytes(max_bytes), backend=backend, threads=threads,
                      max_batch=max_batch, batch_wait_ms=batch_wait_ms, bf16=bf16, max_pixels=max_pixels,
                      max_request_pixels=max_request_pixels, request_timeout=request_timeout, read_timeout=read_timeout,
                      body_timeout=body_timeout, header_timeout=header_timeout, limit_concurrency=limit_concurrency,
                      device=where.name, drift_window=drift_window)
    serve(cfg, host=host, port=port, workers=workers, access_log=access_log,
          ready=lambda url, how: typer.echo(f"serving {model} at {url} on {how} (Ctrl-C to stop)", err=True))
