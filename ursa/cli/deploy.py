"""`ursa predict`, `ursa export` and `ursa serve`: the model file in production."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli.common import BACKEND_HELP
from ursa.errors import UrsaError


def predict_cmd(
    model: Annotated[Path, typer.Argument(help="model.safetensors written by `ursa train` (or model.onnx).")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    backend: Annotated[str, typer.Option("--backend", help=BACKEND_HELP)] = "auto",
) -> None:
    """Predict the class of each image; exit status 1 when some could not be read (the rest are still predicted)."""
    import json

    from ursa.errors import ImageError
    from ursa.inference.predictor import load_predictor

    pred = load_predictor(model, backend=backend)
    failed = 0
    for f in images:
        try:
            label, index, probs = pred.predict(f)
        except ImageError as e:
            if len(images) == 1:  # the one input given is bad: a usage error, exit 2
                raise UrsaError(f"{e}; give a JPEG, PNG, GIF, WEBP, BMP or TIFF image") from None
            failed += 1
            typer.echo(f"error: {e}", err=True)
            continue
        if json_out:
            typer.echo(json.dumps({"file": str(f), "label": label, "index": index, "probs": probs}))
        else:
            typer.echo(f"{f}: {label} ({probs[label]:.3f})")
    if failed:
        typer.echo(f"{failed} of {len(images)} images could not be read; the others were predicted", err=True)
        raise typer.Exit(1)  # the job ran but did not fully succeed


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
) -> None:
    """Serve the model: a web page at / and a JSON API at /predict, until Ctrl-C."""
    from ursa.apps.serve import ServeConfig, serve
    from ursa.inference.predictor import check_backend
    from ursa.util.numbers import parse_bytes

    check_backend(backend)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this computer can use the model", err=True)
    cfg = ServeConfig(model=model, max_bytes=parse_bytes(max_bytes), backend=backend, threads=threads,
                      max_batch=max_batch, batch_wait_ms=batch_wait_ms, bf16=bf16)
    serve(cfg, host=host, port=port, workers=workers, access_log=access_log,
          ready=lambda url: typer.echo(f"serving {model} at {url} (Ctrl-C to stop)", err=True))
