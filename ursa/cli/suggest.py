"""`ursa suggest`: which unlabelled pictures to label next, and a page to label them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli.common import DeviceOpt, Quiet
from ursa.errors import DataError, UrsaError

MIX_HELP = ("Which signals rank the pictures (docs/suggest.md): coverage, coverage+margin/4, coverage+margin/2, margin, "
            "margin+coverage, margin+need, typical+coverage, margin+typical+coverage, all [default: coverage, measured best "
            "by benchmarks/suggest.py].")


def suggest_cmd(
    pool: Annotated[Path, typer.Argument(help="Folder of pictures you have not labelled yet (sub-folders too).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="model.safetensors written by `ursa train`.")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="How many pictures to suggest.")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per picture, best first: file, guess, prob, reason, why.")] = False,
    label: Annotated[bool, typer.Option("--label", help="Open the labelling page: confirm or correct the guesses; each picture moves into DATA/<class>/.")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="Where the class folders are [default: the folder the model was trained on].")] = None,
    mix: Annotated[Optional[str], typer.Option("--mix", help=MIX_HELP)] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port of the local labelling page.")] = 8766,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser; print the address.")] = False,
    quiet: Quiet = False,
    device: DeviceOpt = "auto",
) -> None:
    """Rank unlabelled pictures by how much labelling each would help (the model unsure, unlike its training pictures,
    of a class the learning curve says needs more, and spread over the pool), best first.

    With --label, a local page shows them with the model's guess: Enter confirms, a number key picks
    another class, and the picture moves into its class folder (never overwriting, never deleting;
    POOL/label_log.csv records every move, and a restart finishes one a crash interrupted).
    """
    from ursa.diagnose import pool as pooling
    from ursa.diagnose.suggest import DEFAULT_MIX, MIXES
    from ursa.inference.placement import place
    from ursa.util.lock import FolderLock
    from ursa.util.net import check_port
    from ursa.util.progress import make_console, progress_bar

    where = place(device)
    mix = mix or DEFAULT_MIX
    if mix not in MIXES:
        raise UrsaError(f"--mix: expected one of {', '.join(MIXES)}, got {mix!r}")
    if not pool.is_dir():
        raise DataError(f"{pool}: not a folder; give the folder of pictures you have not labelled yet")
    with contextlib.ExitStack() as held:
        filing = None
        if label:
            from ursa.apps import label as labelling
            from ursa.apps.clean import sweep_temp_files

            check_port(host, port)
            if host not in ("127.0.0.1", "localhost", "::1"):
                typer.echo(f"warning: listening on {host}: anyone who can reach this computer can see and file your "
                           "pictures", err=True)
            writable(pool, "the labelling log (label_log.csv) goes there and the pictures move out of it")
            held.enter_context(FolderLock(pool, labelling.LABEL_LOCK, labelling.LOCK_WHAT))  # one page per pool
        pred = load(model, where)
        if label:
            data = labelling_data(data, pred.meta, model)
            writable(data, "the pictures move into its class folders")
            apart(pool, data)
            sweep_temp_files(data)  # a copy a kill left half written (ursa's own temp names only)
            filing = labelling.Filing(pool, data, pred.classes)
            done = filing.replay()  # first: a move a kill interrupted is finished before the pool is listed
            if done:
                typer.echo(f"finished {done} move(s) an interrupted session had started ({filing.log_path})", err=True)
        files = pooling.pool_files(pool)
        if not files:
            raise DataError(f"{pool}: no pictures left to label (looked for .jpg, .png, .webp, ...)")
        console = make_console(quiet)
        with progress_bar(console, quiet) as prog:
            task = prog.add_task("pool pictures", total=len(files))
            scores = pooling.score_pool(pred, pool, files, progress=lambda k: prog.update(task, advance=k))
        curve = pooling.run_curve(model)
        picks, _ = pooling.suggest(scores, pred.world, n, mix, curve)
        report_unreadable(scores.unreadable)
        if json_out:
            for s in picks:
                typer.echo(json.dumps(s.to_json(), ensure_ascii=False))
        elif not label:
            print_table(picks, len(scores.files), mix, curve is not None, getattr(pred.world, "detector", None) is not None)
        if label and filing is not None:
            session = labelling.LabelSession(pool, filing.data, picks, filing, scores.unreadable)
            labelling.serve(session, host, port, open_browser=not no_browser, echo=typer.echo)


def load(model: Path, where):
    """The model on the backend load_predictor picks (ONNX Runtime from a current model.onnx, else torch)."""
    from ursa.inference import load_predictor

    return load_predictor(model, device=where)


def labelling_data(data: Path | None, meta, model: Path) -> Path:
    """The data folder the pictures are filed into: --data, else the one the model was trained on."""
    if data is None:
        given = (getattr(meta, "config", None) or {}).get("data")
        if not given:
            raise UrsaError(f"{model}: does not say which folder it was trained on; give --data DATA")
        data = Path(given)
    if not data.is_dir():
        raise DataError(f"{data}: not a folder; give --data with the folder of class folders to file the pictures into")
    return data


def apart(pool: Path, data: Path) -> None:
    """Refuse a pool that is the data folder, inside it (it would become a class) or holds it (its pictures would be offered)."""
    p, d = pool.resolve(), data.resolve()
    if p == d or d in p.parents or p in d.parents:
        raise DataError(f"{pool}: the pool must be a folder apart from the data folder {data} (neither inside the other); "
                        "move the unlabelled pictures to a folder of their own")


def writable(folder: Path, why: str) -> None:
    """Refuse, before the slow pass, a folder the page could not write to."""
    import os

    if not os.access(folder, os.W_OK | os.X_OK):
        raise UrsaError(f"{folder}: folder is read-only; {why} (copy it somewhere you can write, or leave out --label)")


def report_unreadable(bad: dict[str, str]) -> None:
    """Unreadable pictures: counted, the first few named, on stderr; the rest of the pool was ranked."""
    if not bad:
        return
    shown = "; ".join(f"{name} ({why})" for name, why in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    typer.echo(f"skipped {len(bad)} unreadable picture(s): {shown}{more}", err=True)


def print_table(picks, n_pool: int, mix: str, has_curve: bool, has_detector: bool) -> None:
    """The ranked pictures as a plain table (one line each), and what the ranking used."""
    from ursa.util.names import printable

    width = max([4] + [len(printable(s.file)) for s in picks])
    typer.echo(f"{'rank':>4}  {'file':<{width}}  {'guess':<12} {'prob':>5}  why")
    for k, s in enumerate(picks, 1):
        typer.echo(f"{k:>4}  {printable(s.file):<{width}}  {s.guess:<12} {s.prob:>5.2f}  {s.why}")
    used = [f"mix {mix}", "unknown detector" if has_detector else "no unknown detector in the model file",
            "learning curve" if has_curve else "no learning curve in the run folder"]
    typer.echo(f"{len(picks)} of {n_pool} pictures ({', '.join(used)}); label them with --label")
