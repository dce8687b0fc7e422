"""Rich progress bars with a throughput column: the one bar of the data commands and `generate`
(the trainer's live display is `training.metrics.ProgressDisplay`)."""

from __future__ import annotations

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
    """Items per second, e.g. `830 samples/s`."""

    def __init__(self, unit: str, decimals: int = 0):
        super().__init__()
        self.unit, self.decimals = unit, decimals

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.{self.decimals}f} {self.unit}/s")


def rate_progress(label: str, unit: str, enabled: bool = True, decimals: int = 0,
                  remaining: bool = False, stderr: bool = False) -> Progress:
    """A bar: label, bar, done/total, rate in `unit`/s, elapsed (and time remaining); disabled when
    asked; on stderr with `stderr=True` (commands whose stdout is data)."""
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), RateColumn(unit, decimals),
               TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    if stderr:
        from rich.console import Console

        return Progress(*columns, disable=not enabled, transient=False, console=Console(stderr=True))
    return Progress(*columns, disable=not enabled, transient=False)
