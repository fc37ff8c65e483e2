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
    """Items per second, blank until known."""

    def render(self, task) -> Text:  # type: ignore[override]
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


def progress_bar(console: Console | None = None, quiet: bool = False, transient: bool = True) -> Progress:
    """description, bar, n/total, rate, elapsed, ETA; disabled when quiet."""
    console = console or Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=transient, disable=quiet or not console.is_terminal,
    )
