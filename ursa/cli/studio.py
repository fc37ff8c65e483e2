"""`ursa studio`: the whole flow in one local page: classes, webcam, train, look, clean, try, ship."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.util.lock import FolderLock

STUDIO_LOCK = ".ursa-studio.lock"  # one studio per project folder


def studio_cmd(
    project: Annotated[Path, typer.Argument(help="Project folder: one sub-folder of images per class (created when missing).")] = Path("project"),
    runs: Annotated[Optional[Path], typer.Option("--runs", help="Folder for the run folders [default: PROJECT-runs beside the project].")] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port of the local page.")] = 8766,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser; print the address.")] = False,
) -> None:
    """Open the studio: make classes, add images (files, webcam), train, look at the errors, clean, try it live, download.

    The class folders are the project, so every other command works on the same folder; runs go to
    PROJECT-runs/run-N, as `ursa train PROJECT --out ...` writes them. Nothing is ever deleted:
    a removed class moves to PROJECT/_removed/, a broken image to PROJECT/_quarantine/.
    """
    from ursa.apps import studio
    from ursa.errors import DataError
    from ursa.util.files import check_outside
    from ursa.util.net import check_port

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this computer can see and change your images", err=True)
    why = studio.not_a_project(project)
    if why:
        raise DataError(f"{project}: not a project folder ({why}); give a folder holding one folder of images per "
                        "class, or a new empty one (a folder whose name starts with _ is skipped)")
    check_port(host, port)
    work = studio.Studio(project, runs)
    check_outside(work.runs, project, "runs folder")
    with FolderLock(project, STUDIO_LOCK, "project folder (one studio at a time)"):
        swept = work.project.sweep()
        if swept:
            typer.echo(f"removed {len(swept)} unfinished image write(s) left by a stopped studio", err=True)
        studio.serve(work, host, port, open_browser=not no_browser, echo=typer.echo)
