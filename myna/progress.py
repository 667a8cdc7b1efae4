"""Progress bars (rate and ETA) and log lines for long work, on stderr so stdout stays machine-readable."""

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as _RichProgress

console = Console(stderr=True)


def log(msg: str) -> None:
    console.print(msg, highlight=False)


class RateColumn(TextColumn):
    """Items per second for counts that are not bytes."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:,.0f} {self.unit}/s" if speed else f"? {self.unit}/s"


class Progress:
    """One bar: `with Progress("clean", total=n, unit="posts") as bar: bar.advance(k)`."""

    def __init__(self, name: str, total: int | None, unit: str = "items"):
        rate = TransferSpeedColumn() if unit == "B" else RateColumn(unit)
        count = [] if unit == "B" else [MofNCompleteColumn()]
        self._p = _RichProgress(
            TextColumn(f"[bold]{name:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            *count,
            rate,
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
        )
        self._task = self._p.add_task(name, total=total, note="")

    def __enter__(self) -> "Progress":
        self._p.start()
        return self

    def __exit__(self, *exc) -> None:
        self._p.stop()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        if note is None:
            self._p.advance(self._task, n)
        else:
            self._p.update(self._task, advance=n, note=note[-40:])
