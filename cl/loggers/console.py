from __future__ import annotations

import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

clock = time.monotonic


@dataclass
class _Pass:
    description: str
    total: int
    start: float
    done: int = 0
    task: object = None
    own: Progress | None = None  # the bar's own display, when no training bar is live


class ConsoleLogger:
    """A progress bar per experience (rich), with the running loss. On a terminal, an
    evaluation pass gets a bar of its own once it has run `eval_delay` seconds (quick
    ones never show one), below the training bar while one is live."""

    def __init__(self, console: Console | None = None, enabled: bool = True, eval_delay: float = 2.0):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.eval_delay = eval_delay
        self.progress: Progress | None = None
        self.task = None
        self.evaluating: _Pass | None = None

    def _progress(self, transient: bool) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=self.console, transient=transient)

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        kind = event.get("event")
        if kind in ("experience_start", "resume") and "iterations" in event:
            self._close_bar()
            self.progress = self._progress(transient=False)
            self.progress.start()
            self.task = self.progress.add_task(
                f"experience {event['experience'] + 1}/{event['of']}", total=event["iterations"], info="loss -",
                completed=event.get("done", 0),
            )
        elif kind == "train" and self.progress is not None:
            self.progress.update(self.task, info=f"loss {event['loss']:.4f}")
        elif kind == "experience_end":
            self._close_bar()

    def step(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    # ---- evaluation passes (RunLogger.progress) ----------------------------------------
    def start_pass(self, description: str, total: int) -> None:
        if self.enabled and (self.console.is_terminal or self.console.is_jupyter):  # not in a log file
            self.evaluating = _Pass(description, total, clock())

    def advance_pass(self, n: int = 1) -> None:
        p = self.evaluating
        if p is None:
            return
        p.done += n
        if p.task is None and clock() - p.start >= self.eval_delay:
            if self.progress is None:
                p.own = self._progress(transient=True)
                p.own.start()
            p.task = (p.own or self.progress).add_task(p.description, total=p.total, completed=p.done,
                                                       info="batches")
        elif p.task is not None:
            (p.own or self.progress).update(p.task, completed=p.done)

    def end_pass(self) -> None:
        p, self.evaluating = self.evaluating, None
        if p is None or p.task is None:
            return
        if p.own is not None:
            p.own.stop()
        elif self.progress is not None:
            self.progress.remove_task(p.task)

    def _close_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self.end_pass()
        self._close_bar()
