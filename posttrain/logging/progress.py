"""One progress-bar layout shared by every training and evaluation loop."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(console: Console | None = None) -> Progress:
    """Build the bar; add tasks with `info=""` and update `info` with e.g. the current loss.

    Pass the same console as the `MetricsLogger` so metric lines print above the live bar.
    The bar stays on screen when done (`transient=False`) so logs keep the final state.
    """
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
