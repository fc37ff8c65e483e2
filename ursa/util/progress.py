"""The console and its progress bars with rate and ETA, one look for every long job (rich).

``make_console`` is the one way ursa makes a console: on a terminal it wraps to the terminal's
width; into a pipe, a file or a log (``make``, CI, ``!ursa`` in a notebook) it never wraps a
sentence (rich would otherwise break lines at 80 columns). In Jupyter rich renders its own
output, and the progress bars become rich's Jupyter live display (an ipywidgets output), never
escape codes.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second (with a unit when given), blank until known."""

    def __init__(self, unit: str = "") -> None:
        super().__init__()
        self.unit = f" {unit}" if unit else ""

    def render(self, task) -> Text:  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f}{self.unit}/s" if speed else "", style="progress.data.speed")


def make_console(quiet: bool = False, stderr: bool = True) -> Console:
    """A rich console on stderr (stdout stays clean for --json) that soft-wraps when not writing to a terminal."""
    console = Console(stderr=stderr, quiet=quiet)
    if not console.is_terminal:
        console.soft_wrap = True  # a pipe, a file or a notebook: one sentence, one line, whatever its length
    return console


def progress_bar(console: Console | None = None, quiet: bool = False, transient: bool = True,
                 unit: str = "") -> Progress:
    """description, bar, n/total, rate, elapsed, ETA on stderr (stdout stays clean for --json); off when quiet."""
    console = console or make_console()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=transient, disable=quiet or not (console.is_terminal or console.is_jupyter),
    )
