from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from cl.errors import UserError, cannot_write

clock = time.monotonic


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


class JsonlLogger:
    """Appends one JSON object per event to `metrics.jsonl`, flushed at least every
    `flush_every` seconds while the run goes on (at an event, a training step or an
    evaluation batch) and at run_end, so a running run's file can be read. A resumed run
    first truncates the file to the offset its checkpoint recorded, so the events after
    the checkpoint are written once, not twice."""

    essential = True

    def __init__(self, path: str | Path, truncate_at: int | None = None, flush_every: float = 2.0):
        self.path = Path(path)
        self.flush_every = flush_every
        self.flushed = clock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_at and self.path.exists():
                os.truncate(self.path, truncate_at)
            self.file = open(self.path, "w" if truncate_at == 0 else "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"Cannot write {self.path} ({e.strerror}); choose a writable run folder with hydra.run.dir=<dir>.") from e

    def _failed(self, e: OSError) -> UserError:
        return cannot_write(self.path, e.strerror or e, self.path.parent)

    def log(self, event: dict) -> None:
        try:
            self.file.write(json.dumps({k: _clean(v) for k, v in event.items()}) + "\n")
        except OSError as e:
            raise self._failed(e) from e
        if event.get("event") == "run_end":
            self.flush()
        else:
            self.tick()

    def tick(self) -> None:
        """Flush if the last flush is `flush_every` seconds old."""
        if clock() - self.flushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        try:
            self.file.flush()
            self.flushed = clock()
        except OSError as e:
            raise self._failed(e) from e

    def offset(self) -> int:
        self.flush()
        return self.file.tell()

    def close(self) -> None:
        if not self.file.closed:
            try:
                self.file.close()
            except OSError as e:
                raise self._failed(e) from e
