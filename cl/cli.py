"""`python -m cl [overrides]`: the Hydra entry point.

Bad input ends with one sentence on stderr that names the fix, and exit status 2.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cl import distributed
from cl.checks import check_group_choices, check_overrides
from cl.errors import Interrupted, UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT = 2
log = logging.getLogger("cl")


def _smoke(small, normal, *, _root_):
    """`${smoke:small,normal}`: `small` under debug=smoke, else `normal`."""
    return small if _root_.get("smoke") else normal


def _run_dir(resume, default):
    """`hydra.run.dir`: the folder being resumed, else a fresh one."""
    return resume if resume not in (None, "", "null", "None") else default


def _hydra_subdir(resume, default):
    """`hydra.output_subdir`: none when resuming, so the original .hydra/ stays as it was."""
    return default if resume in (None, "", "null", "None") else None


def _pool(phase):
    """`scenario.pool` from `phase`: the tuning or evaluation class pool, or everything."""
    return None if phase in (None, "all") else phase


def _stamp():
    """`${cl.stamp:}`: the run folder's time stamp. Under torchrun every rank uses rank 0's
    (CL_RUN_STAMP), so all ranks name the same folder."""
    return os.environ.get("CL_RUN_STAMP") or datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


def _direction(metric):
    """`${cl.direction:${objective}}`: Optuna's direction for a metric (minimize forgetting and WF)."""
    from cl.evaluation.metrics import direction

    return "minimize" if direction(str(metric)) == "min" else "maximize"


def register_resolvers() -> None:
    for name, fn in (("smoke", _smoke), ("cl.run_dir", _run_dir), ("cl.hydra_subdir", _hydra_subdir), ("cl.pool", _pool),
                     ("cl.direction", _direction)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("cl.stamp"):  # cached: one value per process, and copied into launched jobs
        OmegaConf.register_new_resolver("cl.stamp", _stamp, use_cache=True)


register_resolvers()  # at import, so jobs that a launcher runs in other processes have them too


def touched_keys() -> list[str | None]:
    """Config keys the command line set (None: a global override such as experiment=...)."""
    keys: list[str | None] = []
    for o in HydraConfig.get().overrides.task:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in ("resume",) or key.startswith("hydra"):
            continue
        keys.append(None if key in ("experiment", "debug") else key.replace("/", "."))
    return keys


def print_summary(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    R = results["accuracy_matrix"]
    p = results["protocol"]
    table = Table(title=f"accuracy (%) {p['accuracy']}: row i = after experience i, column j = experience j")
    table.add_column("")
    for j in range(len(R[0]) if R else 0):
        table.add_column(f"e{j}", justify="right")
    for i, row in enumerate(R):
        table.add_row(f"after e{i}", *[f"{100 * a:.1f}" for a in row])
    console.print(table)
    metrics = Table(title=f"{p['strategy']} | {p['scenario']} {p['shape']} | {p['backbone']} | seed {p['seed']}")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in results["metrics"].items():
        metrics.add_row(k, "n/a" if v is None else f"{100 * v:.2f}")
    console.print(metrics)
    console.print(f"Run folder: [bold]{run_dir}[/bold]")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from cl.protocol import evaluation_config
    from cl.run import load_resume, run

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        resume_state = None
        if cfg.get("phase") == "evaluation" and cfg.tuning.get("from") and not cfg.get("resume"):
            cfg = evaluation_config(cfg, touched_keys())
        if not cfg.get("resume") and (run_dir / "checkpoints" / "last.pt").is_file():
            # the folder already holds this run's checkpoint: a requeued (preempted) job continues it
            cfg.resume = str(run_dir)
            cfg, resume_state = load_resume(cfg, run_dir, [None], requeued=True)
            log.warning("%s holds a checkpoint of this run; continuing from it.", run_dir)
        elif cfg.get("resume"):
            run_dir = Path(cfg.resume)
            cfg, resume_state = load_resume(cfg, run_dir, touched_keys())
        results = run(cfg, run_dir, resume_state)
    except Interrupted as stop:
        if distributed.is_main():
            name = signal.Signals(stop.signum).name
            print(f"{name}: stopped at iteration {stop.iteration} with a checkpoint; resume with: "
                  f"python -m cl resume={run_dir}", file=sys.stderr, flush=True)
        stop.forward()  # under submitit: requeue the job (it continues from the checkpoint)
        sys.exit(128 + stop.signum)
    except UserError as e:
        where = f"[rank {distributed.rank()}] " if distributed.rank() else ""
        print(f"{where}error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # one failed job must not stop the sweep: record it, report NaN to the sweeper
            (Path(HydraConfig.get().runtime.output_dir) / "error.txt").write_text(f"{e}\n")
            return float("nan")
        sys.exit(EXIT_BAD_INPUT)
    if distributed.is_main():
        print_summary(results, run_dir)
    value = results["metrics"].get(cfg.get("objective", "average_incremental_accuracy"))
    return float(value) if value is not None else None


def check_tuning_folder(argv: list[str]) -> None:
    """phase=evaluation with tuning.from=<dir>: fail before launching any job if <dir> has no completed run."""
    from cl.protocol import completed_jobs

    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    if values.get("phase") == "evaluation" and values.get("tuning.from"):
        completed_jobs(values["tuning.from"])


def check_writable(argv: list[str]) -> None:
    """The run (or sweep) folder must be creatable: say so before Hydra tries and fails with a traceback."""
    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    multirun = "-m" in argv or "--multirun" in argv
    target = values.get("hydra.sweep.dir" if multirun else "hydra.run.dir") or values.get("resume") or (
        "multirun" if multirun else "outputs")
    if "${" in target:
        return
    existing = Path(target).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        raise UserError(f"Cannot write the run folder {target} (creating a file in {existing} failed: "
                        f"{e.strerror or e}); choose a writable place with {key}=<dir>.") from None


def join_torchrun(argv: list[str]) -> list[str]:
    """Under torchrun: join the process group, agree on rank 0's run folder, and keep
    the other ranks from writing Hydra's files (rank 0 alone writes)."""
    if not distributed.launched():
        return argv
    distributed.init()
    os.environ["CL_RUN_STAMP"] = distributed.broadcast_object(_stamp())
    if distributed.rank() > 0:
        argv = argv + ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return argv


def main() -> None:
    register_resolvers()
    try:
        check_group_choices(sys.argv[1:])
        check_overrides(sys.argv[1:])
        check_tuning_folder(sys.argv[1:])
        check_writable(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.argv = [sys.argv[0], *join_torchrun(sys.argv[1:])]
    try:
        hydra_main()
    finally:
        distributed.shutdown()
