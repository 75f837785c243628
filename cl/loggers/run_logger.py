from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("cl")


class RunLogger:
    """Fans every event out to the sinks. Each event gets the run's wall time `t` (seconds)."""

    def __init__(self, sinks):
        self.sinks = [s for s in sinks if s is not None]
        self.start = time.perf_counter()
        self.time_offset = 0.0  # wall time of earlier segments of a resumed run
        self.silent = False

    def __call__(self, event: dict) -> None:
        if self.silent:
            return
        event.setdefault("t", round(self.elapsed, 4))
        for sink in list(self.sinks):
            self._call(sink, sink.log, event)

    def _call(self, sink, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a logger must never kill a run
            if getattr(sink, "essential", False):
                raise
            log.warning("%s failed (%s: %s); it is switched off for the rest of the run.",
                        type(sink).__name__, type(e).__name__, e)
            self.sinks.remove(sink)

    @property
    def elapsed(self) -> float:
        return self.time_offset + time.perf_counter() - self.start

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            fn = getattr(sink, method, None)
            if fn is not None:
                self._call(sink, fn, *args)

    def step(self, n: int = 1) -> None:
        """A training iteration: the console's bar advances, metrics.jsonl flushes if it is due."""
        self._each("step", n)
        self._each("tick")

    @contextmanager
    def muted(self, mute: bool = True):
        """Drop events inside the block (a resumed run replaying what it logged before)."""
        before, self.silent = self.silent, mute
        try:
            yield
        finally:
            self.silent = before

    @contextmanager
    def progress(self, description: str, total: int):
        """An evaluation pass of `total` batches; yields `advance(n=1)`, called after each batch.
        The console shows a bar for a slow pass; metrics.jsonl flushes if it is due."""
        def advance(n: int = 1) -> None:
            self._each("advance_pass", n)
            self._each("tick")

        self._each("start_pass", description, total)
        try:
            yield advance
        finally:
            self._each("end_pass")

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        failed = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                if getattr(sink, "essential", False):
                    failed = e  # metrics.jsonl could not be completed: the run must not look finished
                else:
                    log.warning("%s failed to close: %s", type(sink).__name__, e)
        if failed is not None:
            raise failed
