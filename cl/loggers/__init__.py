"""Where events go. `metrics.jsonl` is the source of truth (append-only); the
console and wandb mirror it. A sink that fails is switched off with one warning:
a logger never kills a run."""
from cl.loggers.console import ConsoleLogger
from cl.loggers.jsonl import JsonlLogger
from cl.loggers.run_logger import RunLogger
from cl.loggers.wandb_logger import WandbLogger

__all__ = ["ConsoleLogger", "JsonlLogger", "RunLogger", "WandbLogger"]
