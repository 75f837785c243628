"""The two-phase protocol of Cha & Cho ("Hyperparameters in continual learning: a
reality check"): tune on one pool of classes, evaluate on a disjoint one.

    python -m cl -m phase=tuning optimizer.lr=0.01,0.03,0.1 seed=0,1       # phase 1: a sweep
    python -m cl -m phase=evaluation tuning.from=multirun/<...> seed=0,1,2  # phase 2: the best config

`phase=tuning|evaluation` selects the pool (`scenario.pool`, by default the two
halves of the dataset's classes; or two named datasets through `phase_datasets`).
Phase 2 takes the configuration whose mean `tuning.metric` over its seeds was
best in the phase-1 folder (highest, or lowest for a metric where lower is better:
`cl.evaluation.metrics.direction`; `tuning.mode=max|min` says it explicitly) and runs
it unchanged except for `phase` and `seed`, recording the chosen tuning runs in
`tuning.selected_runs` (what `cl.report` reads); only phase-2 numbers are the result.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl.errors import UserError
from cl.evaluation.metrics import direction

# What phase 2 may set besides the chosen configuration: where and how it runs, not what.
ALLOWED_IN_EVALUATION = ("phase", "seed", "tuning", "data_dir", "trainer.device", "logger", "resume")


@dataclass
class Job:
    folder: Path
    config: DictConfig  # as composed (interpolations kept), from the .hydra/config.yaml the run wrote
    results: dict

    @property
    def metrics(self) -> dict:
        return self.results["metrics"]

    @property
    def identity(self) -> str:
        """The configuration without its seed: jobs that differ only by seed are one configuration."""
        cfg = OmegaConf.to_container(self.config, resolve=False)
        cfg.pop("seed", None)
        return json.dumps(cfg, sort_keys=True, default=str)


def load_job(folder: Path) -> Job | None:
    """A finished run (None if it has no results.json), with the configuration it ran with: its
    config files are checked against the fingerprint its results.json recorded when it started."""
    folder = Path(folder)
    if not (folder / "results.json").is_file():
        return None
    results = json.loads((folder / "results.json").read_text())
    for name, sha in (results.get("config_sha256") or {}).items():
        path = folder / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            raise UserError(f"{path} is not the config {folder} ran with (it changed after the run started); restore "
                            "it, or move that run out of the folders given.")
    composed = folder / ".hydra" / "config.yaml"
    return Job(folder, OmegaConf.load(composed if composed.is_file() else folder / "config.yaml"), results)


def completed_jobs(source) -> list[Job]:
    """The jobs that finished (they have results.json) under a multirun folder, or under each of a
    list of run or sweep folders (`tuning.from=[<run>,<run>]`: exactly these runs, as `cl.bench` passes)."""
    folders = [Path(source)] if isinstance(source, (str, Path)) else [Path(f) for f in source]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"tuning.from={folder} does not exist; pass the multirun folder of the tuning phase.")
    jobs = [load_job(res.parent) for folder in folders for res in sorted(folder.rglob("results.json"))]
    jobs = [j for j in jobs if j is not None]
    if not jobs:
        failed = sorted(f for folder in folders for f in folder.rglob("error.txt"))
        why = f"{len(failed)} failed (see {failed[0]})" if failed else "none finished"
        where = folders[0] if len(folders) == 1 else f"the {len(folders)} folders of tuning.from"
        raise UserError(f"{where} holds no completed job ({why}); run the tuning sweep (phase=tuning) to completion first.")
    return jobs


def selection_mode(metric: str, mode: str | None = "auto") -> str:
    """"max" or "min": the metric's direction (`mode=auto`), or `mode` if it agrees with it."""
    if mode not in ("auto", "max", "min", None):
        raise UserError(f"tuning.mode must be auto, max or min, not {mode!r}.")
    try:
        better = direction(metric)
    except UserError:
        if mode in ("max", "min"):
            return mode  # a metric we know no direction for: the user's word
        raise UserError(f"tuning.metric={metric} has no known direction; set tuning.mode=max or min.") from None
    if mode in ("max", "min") and mode != better:
        raise UserError(f"tuning.mode={mode} would choose the worst configuration: {'lower' if better == 'min' else 'higher'} "
                        f"{metric} is better; set tuning.mode={better} (or auto).")
    return better


def best_configuration(folder, metric: str, mode: str | None = "auto") -> tuple[Job, float, list[Job]]:
    """The best configuration of a tuning sweep by the mean of `metric` over its seeds, in the
    metric's direction: (a representative job, its mean score, all its jobs)."""
    mode = selection_mode(metric, mode)
    jobs = completed_jobs(folder)
    phases = {str(j.config.get("phase")) for j in jobs}
    if phases != {"tuning"}:
        raise UserError(f"{folder} holds runs of phase {sorted(phases)}; tuning.from must point at a phase=tuning sweep.")
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.identity, []).append(j)
    scored = []
    for members in groups.values():
        values = [m.metrics.get(metric) for m in members]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if values:
            scored.append((sum(values) / len(values), members))
    if not scored:
        raise UserError(f"No completed job in {folder} reports '{metric}'; choose tuning.metric among {sorted(jobs[0].metrics)}.")
    score, members = (max if mode == "max" else min)(scored, key=lambda s: s[0])
    return members[0], score, members


def evaluation_config(cfg: DictConfig, touched: list[str | None]) -> DictConfig:
    """Phase 2: the configuration chosen in `cfg.tuning.from`, with this run's phase and seed."""
    extra = [k for k in touched if k is None or not k.startswith(ALLOWED_IN_EVALUATION)]
    if extra:
        names = ", ".join("experiment/debug" if k is None else k for k in extra)
        raise UserError(
            f"The evaluation phase runs the configuration chosen by the tuning phase; drop {names} from the "
            f"command line (only {', '.join(ALLOWED_IN_EVALUATION)} may be set)."
        )
    job, score, members = best_configuration(cfg.tuning["from"], cfg.tuning.metric, cfg.tuning.mode)
    chosen = job.config.copy()
    chosen.phase = "evaluation"
    chosen.seed = cfg.seed
    for key in ("data_dir", "trainer.device", "logger"):
        if key in [k for k in touched if k]:
            OmegaConf.update(chosen, key, OmegaConf.select(cfg, key), merge=False)
    chosen.tuning = OmegaConf.merge(cfg.tuning, {"selected_runs": [str(m.folder.resolve()) for m in members],
                                                 "selected_score": score})
    return chosen
