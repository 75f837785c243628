"""`python -m cl [overrides]`: the Hydra entry point.

Bad input ends with one sentence on stderr that names the fix, and exit status 2.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cl import distributed
from cl.checks import check_group_choices, check_overrides
from cl.resolvers import register_resolvers, stamp
from cl.errors import Diverged, Interrupted, UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_BAD_INPUT = 2
log = logging.getLogger("cl")


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
    loss = "loss_matrix" in results  # a token stream: losses, lower is better
    R = results["loss_matrix" if loss else "accuracy_matrix"]
    p = results["protocol"]
    what = "loss (nats per token)" if loss else f"accuracy (%) {p['accuracy']}"
    table = Table(title=f"{what}: row i = after experience i, column j = experience j")
    table.add_column("")
    for j in range(len(R[0]) if R else 0):
        table.add_column(f"e{j}", justify="right")
    for i, row in enumerate(R):
        table.add_row(f"after e{i}", *["-" if a is None else f"{a:.3f}" if loss else f"{100 * a:.1f}" for a in row])
    console.print(table)
    metrics = Table(title=f"{p['strategy']} | {p['scenario']} {p['shape']} | {p['backbone']} | seed {p['seed']}")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in results["metrics"].items():
        metrics.add_row(k, "n/a" if v is None else f"{v:.4f}" if loss else f"{100 * v:.2f}")
    console.print(metrics)
    console.print(f"Run folder: [bold]{run_dir}[/bold]")


def say(sentence: str) -> None:
    """Print the one sentence on stderr (rank 0 only). Under torchrun every rank also leaves it in its
    error file, so torchrun's failure report shows it as the root cause instead of a traceback hint."""
    if distributed.is_main() and os.environ.get("RANK", "0") == "0":  # RANK: torchrun's, before the group is joined
        print(sentence, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": sentence, "timestamp": int(time.time())}))


def save_hydra_files(run_dir: Path) -> None:
    """Hydra's record of the command (`.hydra/hydra.yaml`, `overrides.yaml`), written once the run
    starts (Hydra's own writing is off: it would overwrite the files of a run it then refuses)."""
    hydra_cfg = HydraConfig.get()
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), run_dir / ".hydra" / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, run_dir / ".hydra" / "overrides.yaml")


def remove_new_folders(run_dir: Path) -> None:
    """A refused run leaves nothing behind: the folders Hydra created for it go (main() noted which existed)."""
    import shutil

    if NEW_FOLDERS and run_dir.resolve() == NEW_FOLDERS[-1]:
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in reversed(NEW_FOLDERS[:-1]):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def saved_list(path: Path, key: str | None = None) -> list[str]:
    """A list of overrides saved as YAML, as written: an override such as
    `scenario.tasks="${phase_datasets.${phase}}"` is text here, not an interpolation to resolve."""
    node = OmegaConf.load(path)
    return list(OmegaConf.to_container(node[key] if key else node, resolve=False))


def retry_advice(cfg: DictConfig, run_dir: Path) -> str:
    """After a diverged run: the command that starts it again in a new folder with a tenth of its lr."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    overrides = saved_list(saved) if saved.is_file() else list(HydraConfig.get().overrides.task)
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("optimizer.lr", "resume")]
    lr = cfg.optimizer.get("lr")
    if lr is None:
        return "start a new run with a lower learning rate or with trainer.clip_grad_norm=1.0"
    return (f"start a new run with a lower learning rate: python -m cl {' '.join([*keep, f'optimizer.lr={lr / 10:g}'])} "
            "(or add trainer.clip_grad_norm=1.0)")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from cl.protocol import evaluation_config, load_job
    from cl.run import existing_run, load_resume, run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    state = None  # what run_dir holds: fresh | checkpoint | finished | resume (None: not known yet)
    try:
        resume_state = None
        if cfg.get("phase") == "evaluation" and cfg.tuning.get("from") and not cfg.get("resume"):
            cfg = evaluation_config(cfg, touched_keys())
        if cfg.get("resume"):
            run_dir, state = Path(cfg.resume), "resume"
            cfg, resume_state = load_resume(cfg, run_dir, touched_keys())
        else:
            state = existing_run(cfg, run_dir)  # another run's folder is refused here, untouched
        if state == "finished":
            results = load_job(run_dir).results  # a resumed sweep's finished job: its results, not a second run
        else:
            if state == "checkpoint":  # a requeued (preempted) job, or a resumed sweep: continue it
                cfg.resume = str(run_dir)
                cfg, resume_state = load_resume(cfg, run_dir, [None])
                log.warning("%s holds a checkpoint of this run; continuing from it.", run_dir)
            elif state == "fresh" and distributed.is_main():
                (run_dir / "error.txt").unlink(missing_ok=True)  # a failed earlier attempt of this job
                save_hydra_files(run_dir)
            results = run(cfg, run_dir, resume_state)
    except Interrupted as stop:
        if distributed.is_main():
            name = signal.Signals(stop.signum).name
            again = (f"python -m cl -m resume={HydraConfig.get().sweep.dir}" if multirun
                     else f"python -m cl resume={run_dir}")
            print(f"{name}: stopped at iteration {stop.iteration} with a checkpoint; resume with: {again}",
                  file=sys.stderr, flush=True)
        stop.forward()  # under submitit: requeue the job (it continues from the checkpoint)
        sys.exit(128 + stop.signum)
    except UserError as e:
        if isinstance(e, Diverged):
            e = UserError(f"{e}; {retry_advice(cfg, run_dir)}")
        job = f"[job {HydraConfig.get().job.num}] " if multirun else ""
        say(f"{job}error: {e}")
        own = state in ("fresh", "checkpoint") or (state is None and not (run_dir / "config.yaml").exists())
        if multirun:
            # one failed job must not stop the sweep: record it in its own folder (never in another
            # run's), report NaN to the sweeper
            if own:
                (run_dir / "error.txt").write_text(f"{e}\n")
            return float("nan")
        started = (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0
        if own and not started:  # refused before training: leave nothing behind (a diverged run keeps its folder)
            remove_new_folders(run_dir)
        sys.exit(EXIT_BAD_INPUT)
    objective = cfg.get("objective", "average_incremental_accuracy")
    value = results["metrics"].get(objective)
    if distributed.is_main():
        if multirun:
            shown = "n/a" if value is None else f"{100 * value:.2f}"
            print(f"[job {HydraConfig.get().job.num}] {' '.join(HydraConfig.get().overrides.task)}: {objective} "
                  f"{shown} ({run_dir}{', finished earlier' if state == 'finished' else ''})", flush=True)
        else:
            print_summary(results, run_dir)
            if state == "finished":
                print("This run had finished before; nothing was run again.")
    return float(value) if value is not None else None


def check_tuning_folder(argv: list[str]) -> None:
    """phase=evaluation with tuning.from=<dir>: fail before launching any job if <dir> has no completed run."""
    from cl.protocol import completed_jobs

    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    if values.get("phase") == "evaluation" and values.get("tuning.from"):
        completed_jobs(values["tuning.from"])


def check_writable(target: Path, key: str) -> None:
    """The run (or sweep) folder must be creatable: say so before Hydra tries and fails with a traceback."""
    existing = target.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        why = f"creating a file in {existing} failed: {e.strerror or e}"
        if key == "resume":
            raise UserError(f"Cannot write the run folder {target} ({why}); copy it to a writable place "
                            f"(cp -r {target} <dir>) and resume the copy with resume=<dir>.") from None
        raise UserError(f"Cannot write the run folder {target} ({why}); choose a writable place with "
                        f"{key}=<dir>.") from None


SWEEP_FILE = "sweep.yaml"  # in a sweep folder: the command that defines the sweep, and how it ended
LAUNCH_KEYS = ("hydra/launcher", "hydra.launcher.")  # how a sweep runs, not what it runs


def _defines_sweep(arg: str) -> bool:
    return arg not in ("-m", "--multirun") and not arg.startswith(("hydra.sweep.dir=", "resume=", *LAUNCH_KEYS))


def prepare_sweep(argv: list[str], cfg: DictConfig) -> tuple[list[str], Path]:
    """A sweep runs in a new folder, or continues its own: `-m resume=<sweep dir>` (or the same
    command with hydra.sweep.dir=<that folder>) re-launches the recorded command, where finished jobs
    return their results and stopped ones continue from their checkpoints. Another sweep's folder is refused."""
    resume = cfg.get("resume")
    if resume:
        folder = Path(resume)
        if not (folder / SWEEP_FILE).is_file():
            if (folder / "config.yaml").is_file():
                raise UserError(f"resume={folder} is a single run, not a sweep; resume it without -m: "
                                f"python -m cl resume={folder}")
            raise UserError(f"resume={folder} holds no sweep ({SWEEP_FILE}); pass the folder a sweep printed "
                            "(multirun/<name>/<stamp>).")
        extra = [a for a in argv if _defines_sweep(a)]
        if extra:
            raise UserError(f"A sweep resumes with its own settings; drop {' '.join(extra)} (only resume=<dir> and "
                            "hydra/launcher=... may be given).")
        recorded = saved_list(folder / SWEEP_FILE, "overrides")
        return ["-m", *recorded, *[a for a in argv if a.startswith(LAUNCH_KEYS)], f"hydra.sweep.dir={folder}"], folder
    folder = Path(cfg.hydra.sweep.dir)
    overrides = [a for a in argv if _defines_sweep(a)]
    if (folder / SWEEP_FILE).is_file():
        recorded = saved_list(folder / SWEEP_FILE, "overrides")
        if sorted(recorded) != sorted(overrides):
            raise UserError(f"hydra.sweep.dir={folder} holds another sweep (python -m cl -m {' '.join(recorded)}); "
                            f"choose a new folder, or continue that sweep with: python -m cl -m resume={folder}")
    elif folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"hydra.sweep.dir={folder} is not empty and holds no sweep; choose a new or empty folder.")
    return argv, folder


def write_sweep_record(folder: Path, argv: list[str], status: str, jobs: list[dict] | None = None) -> None:
    from cl.run import write

    folder.mkdir(parents=True, exist_ok=True)
    overrides = [a for a in argv if _defines_sweep(a)]
    record = {"command": "python -m cl -m " + " ".join(overrides), "overrides": overrides, "status": status,
              "resume": f"python -m cl -m resume={folder}", "jobs": jobs or []}
    write(folder / SWEEP_FILE, OmegaConf.to_yaml(OmegaConf.create(record)))


def sweep_jobs(folder: Path, objective: str) -> list[dict]:
    """Every job folder of a sweep: its overrides, objective and status."""
    jobs = []
    for job in sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides = job / ".hydra" / "overrides.yaml"
        row = {"job": int(job.name), "overrides": " ".join(saved_list(overrides)) if overrides.is_file() else "",
               "objective": None}
        if (job / "results.json").is_file():
            value = json.loads((job / "results.json").read_text())["metrics"].get(objective)
            row.update(status="finished", objective=value)
        elif (job / "error.txt").is_file():
            row.update(status="failed: " + (job / "error.txt").read_text().strip())
        elif (job / "checkpoints" / "last.pt").is_file():
            row.update(status="stopped (has a checkpoint)")
        else:
            row.update(status="not finished")
        jobs.append(row)
    return jobs


def print_sweep_summary(folder: Path, jobs: list[dict], objective: str, status: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {folder} ({status})")
    for name in ("job", "overrides", objective, "status"):
        table.add_column(name, justify="right" if name in ("job", objective) else "left")
    for j in jobs:
        value = "n/a" if j["objective"] is None else f"{100 * j['objective']:.2f}"
        table.add_row(str(j["job"]), j["overrides"], value, j["status"])
    Console(stderr=status != "finished").print(table)


NEW_FOLDERS: list[Path] = []  # the run folder and its parents that did not exist before this command


def main() -> None:
    register_resolvers()
    argv = sys.argv[1:]
    multirun = "-m" in argv or "--multirun" in argv
    informational = any(a.startswith(("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion",
                                      "-sc", "--resolve", "-p", "--package")) for a in argv)
    own_stamp = "CL_RUN_STAMP" not in os.environ
    if own_stamp:
        os.environ["CL_RUN_STAMP"] = stamp()  # the checks below and Hydra name the same folder
    sweep = None
    try:
        if not informational:
            check_group_choices(argv)
            cfg = check_overrides(argv)  # composed with the first value of each sweep, and Hydra's node
            check_tuning_folder(argv)
            if multirun:
                argv, sweep = prepare_sweep(argv, cfg)
                check_writable(sweep, "resume" if cfg.get("resume") else "hydra.sweep.dir")
                objective = cfg.get("objective", "average_incremental_accuracy")
            else:
                resume = cfg.get("resume")
                if resume and not (Path(resume) / "config.yaml").is_file():
                    what = "a sweep; resume it with -m" if (Path(resume) / SWEEP_FILE).is_file() else "no run"
                    raise UserError(f"resume={resume} holds {what} (no config.yaml); pass the folder of an earlier run "
                                    "(the one its interruption message or summary printed).")
                target = Path(cfg.hydra.run.dir)
                check_writable(target, "resume" if resume else "hydra.run.dir")
                NEW_FOLDERS[:] = [p for p in [*reversed(target.absolute().parents), target.absolute()]
                                  if not p.exists()]
    except UserError as e:
        say(f"error: {e}")
        sys.exit(EXIT_BAD_INPUT)
    sys.argv = [sys.argv[0], *join_torchrun(argv)]
    if sweep is not None:
        write_sweep_record(sweep, argv, "running")
    status = "interrupted"
    try:
        hydra_main()
        status = "finished"
    finally:
        distributed.shutdown(status == "finished")
        if own_stamp:
            os.environ.pop("CL_RUN_STAMP", None)
        if sweep is not None:
            jobs = sweep_jobs(sweep, objective)
            if status == "finished" and any(j["status"] != "finished" for j in jobs):
                status = "finished with failed jobs"
            write_sweep_record(sweep, argv, status, jobs)
            print_sweep_summary(sweep, jobs, objective, status)
            if status != "finished":
                print(f"Continue the sweep with: python -m cl -m resume={sweep}", file=sys.stderr)
def join_torchrun(argv: list[str]) -> list[str]:
    """Under torchrun: join the process group, agree on rank 0's run folder, and keep
    the other ranks from writing Hydra's files (rank 0 alone writes)."""
    if not distributed.launched():
        return argv
    distributed.init()
    os.environ["CL_RUN_STAMP"] = distributed.broadcast_object(stamp())
    if distributed.rank() > 0:
        argv = argv + ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return argv


