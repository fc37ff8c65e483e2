"""`ursa clean`: rank likely label errors and duplicates, decide in the browser."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli.common import CsvOpt, DataArg, DeviceOpt, Quiet
from ursa.errors import UrsaError
from ursa.util.files import check_outside
from ursa.util.lock import FolderLock



def clean_cmd(
    data: DataArg,
    model: Annotated[Path, typer.Option("--model", "-m", help="model.safetensors written by `ursa train`.")],
    csv: CsvOpt = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port of the local cleaner page.")] = 8765,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser; print the address.")] = False,
    export: Annotated[Optional[Path], typer.Option("--export", help="Write the rankings as CSV files into DIR and exit (no page).", metavar="DIR")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Cosine similarity above which two images are near-duplicates (measured on bears: docs/clean.md).")] = 0.88,
    quiet: Quiet = False,
    device: DeviceOpt = "auto",
) -> None:
    """Find top losses, likely label errors and duplicates; keep, exclude or relabel them in your browser.

    Decisions are saved to DATA/cleaned.csv and DATA/clean_log.csv as you make them; no image is ever
    moved or deleted. Retrain with `ursa train DATA --csv DATA/cleaned.csv`.
    """
    import time

    from ursa.apps import clean
    from ursa.inference.placement import place
    from ursa.util.net import check_port

    t0 = time.perf_counter()
    where = place(device)  # an unknown or absent device: one line, exit 2, before a port or the data is touched
    if _multi_label(model):
        _clean_label_sets(data, model, csv, export, device)
        return
    if export is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this computer can see your images", err=True)
    with contextlib.ExitStack() as held:
        if export is None:  # fail before the slow pass, not after it
            check_port(host, port)
            if data.is_dir():
                clean.check_writable(data, csv)
                # One cleaner per data folder: a second one is refused, naming the first, before its slow pass.
                held.enter_context(FolderLock(data, clean.CLEAN_LOCK, clean.LOCK_WHAT))
        took: dict[str, float] = {}
        ds, scores, ranks = clean.prepare(data, model, csv, threshold=threshold, quiet=quiet, timings=took,
                                          device=where, say=lambda line: typer.echo(line, err=True))
        typer.echo(f"model pass: {scores.backend}")
        typer.echo(clean.summary_line(scores, ranks))
        if export is not None:
            files = clean.export_rankings(export, scores, ranks)
            typer.echo(f"wrote {', '.join(str(p) for p in files.values())} in {time.perf_counter() - t0:.1f} s "
                       f"(model pass {took['model_pass']:.1f} s, rankings {took['rankings']:.1f} s)")
            return
        session = clean.start_session(ds, scores, ranks, model_name=str(model), csv_path=csv)
        clean.serve(session, host, port, open_browser=not no_browser, echo=typer.echo)


def _multi_label(model: Path) -> bool:
    """Whether the model file answers label sets (its metadata's task; a damaged file: one line from the reader)."""
    from ursa.inference.header import read_meta

    if not model.is_file():  # the single-label path says what is wrong with it, after the folder's lock
        return False
    return read_meta(model, buildable=False).task == "multi_label"


def _clean_label_sets(data: Path, model: Path, csv: Optional[Path], export: Optional[Path], device: str) -> None:
    """A multi-label model: cleanlab's multi-label ranking into DIR/label_issues.csv (the page shows one label each)."""
    from ursa.apps.clean.label_sets import clean_label_sets

    if export is None:
        raise UrsaError(f"{model}: a multi-label model; the cleaner page shows one label per picture, so give "
                        "--export DIR to write the label-set ranking (DIR/label_issues.csv)")
    check_outside(export, data)
    issues, interp = clean_label_sets(data, model, csv, device=device, say=lambda line: typer.echo(line, err=True))
    path = issues.write_csv(Path(export) / "label_issues.csv")
    typer.echo(f"model pass: {interp.backend}")
    typer.echo(f"{len(issues.issues)} likely label error(s) in {len(issues.names)} images ({issues.method}); "
               f"wrote {path}")
    for i in issues.issues[:10]:
        action, label, p = issues.suggestion(i)
        typer.echo(f"  {issues.names[i]}: {action} {label} (out-of-fold probability {p:.2f})")
