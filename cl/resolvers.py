"""The config's own resolvers (`${smoke:a,b}`, `${cl.stamp:}`, ...), registered by `register_resolvers()`
(at `cl.cli`'s import, so jobs that a launcher runs in other processes have them too)."""
from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf


def _smoke(small, normal, *, _root_):
    """`${smoke:small,normal}`: `small` under debug=smoke, else `normal`."""
    return small if _root_.get("smoke") else normal


def _run_dir(resume, default):
    """`hydra.run.dir`: the folder being resumed, else a fresh one."""
    return resume if resume not in (None, "", "null", "None") else default


def _pool(phase):
    """`scenario.pool` from `phase`: the tuning or evaluation class pool, or everything."""
    return None if phase in (None, "all") else phase


def stamp():
    """`${cl.stamp:}`: the run folder's time stamp. Under torchrun every rank uses rank 0's
    (CL_RUN_STAMP), so all ranks name the same folder."""
    return os.environ.get("CL_RUN_STAMP") or datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


def _direction(metric):
    """`${cl.direction:${objective}}`: Optuna's direction for a metric (minimize forgetting and WF)."""
    from cl.evaluation.metrics import direction

    return "minimize" if direction(str(metric)) == "min" else "maximize"


def register_resolvers() -> None:
    for name, fn in (("smoke", _smoke), ("cl.run_dir", _run_dir), ("cl.pool", _pool),
                     ("cl.direction", _direction)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("cl.stamp"):  # cached: one value per process, and copied into launched jobs
        OmegaConf.register_new_resolver("cl.stamp", stamp, use_cache=True)
