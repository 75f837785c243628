"""`hydra/sweeper=job_list`: launch the jobs listed in a file, each an override list, through the
configured launcher (basic, joblib, submitit_local, submitit_slurm).

A grid sweep is the product of its overrides; a benchmark suite is a union of differently shaped
grids (one per method, each with its own tuning budget and its own output folder), which `cl.bench`
writes out as such a list. Each job's overrides follow the command line's, so a job may set its own
`hydra.sweep.subdir`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction


class JobListSweeper(Sweeper):
    def __init__(self, jobs_file: str) -> None:
        super().__init__()
        self.jobs_file = jobs_file

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        jobs = OmegaConf.to_container(OmegaConf.load(Path(self.jobs_file)), resolve=False)  # `${...}` stays text
        batch = [list(arguments) + job for job in jobs]
        if not batch:
            return []
        self.validate_batch_is_legal(batch)
        results = self.launcher.launch(batch, initial_job_idx=0)
        for r in results:
            _ = r.return_value  # a job's exception surfaces here, as with the basic sweeper
        return results
