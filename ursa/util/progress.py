"""Progress bars with rate and ETA, one look for every long job (rich)."""

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


def progress_bar(console: Console | None = None, quiet: bool = False, transient: bool = True,
                 unit: str = "") -> Progress:
    """description, bar, n/total, rate, elapsed, ETA on stderr (stdout stays clean for --json); off when quiet."""
    console = console or Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=transient, disable=quiet or not console.is_terminal,
    )
