from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ConsoleLogger:
    """A progress bar per experience (rich), with the running loss."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task = None

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        kind = event.get("event")
        if kind in ("experience_start", "resume") and "iterations" in event:
            self._close_bar()
            self.progress = Progress(
                TextColumn("[bold]experience {task.fields[exp]}/{task.fields[of]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=event["iterations"], exp=event["experience"] + 1, of=event["of"], loss="-",
                completed=event.get("done", 0),
            )
        elif kind == "train" and self.progress is not None:
            self.progress.update(self.task, loss=f"{event['loss']:.4f}")
        elif kind == "experience_end":
            self._close_bar()

    def step(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def _close_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self._close_bar()
