"""Hydra launchers: a small sweep end to end through submitit's local executor (each job a
separate process, as on a cluster); every job writes its own folder and no file is written
by two jobs."""
from __future__ import annotations

import json

from tests.conftest import CONF, cli


def test_launcher_presets_exist():
    assert {p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")} >= {"joblib", "submitit_local", "submitit_slurm"}


def test_submitit_local_sweep_runs_each_job_in_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli(["-m", "hydra/launcher=submitit_local", "debug=smoke", "scenario.max_per_class=10", "seed=0,1",
             f"hydra.sweep.dir={sweep}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    results = [json.loads((job / "results.json").read_text()) for job in jobs]
    assert [res["protocol"]["seed"] for res in results] == [0, 1]
    assert results[0]["protocol"]["class_order"] != results[1]["protocol"]["class_order"]
    # provenance: the code's commit, the library versions, the device and the world size
    import subprocess

    import torch

    from tests.conftest import ROOT

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for res in results:
        prov = res["provenance"]
        assert prov["git_commit"] == head and isinstance(prov["git_dirty"], bool)
        assert prov["versions"]["torch"] == torch.__version__.split("+")[0]
        assert {"timm", "transformers", "hydra-core"} <= set(prov["versions"]) and all(prov["versions"].values())
        assert prov["device"] == "cpu" and prov["world_size"] == 1
    for job in jobs:
        assert {"config.yaml", "metrics.jsonl", "results.json", "accuracy_matrix.png"} <= {p.name for p in job.iterdir()}
        assert (job / "checkpoints" / "last.pt").is_file()

    # every file belongs to one job: its own folder, or its own submitit log folder (named by its
    # job id, files prefixed with it); multirun.yaml and sweep.yaml are written by the launching process
    logs = {}
    for f in (p for p in sweep.rglob("*") if p.is_file()):
        rel = f.relative_to(sweep)
        if rel.parts[0] == ".submitit":
            assert rel.name.startswith(rel.parts[1] + "_"), rel
            logs.setdefault(rel.parts[1], []).append(rel.name)
        else:
            assert rel.parts[0] in ("0", "1") or rel.parts in (("multirun.yaml",), ("sweep.yaml",)), rel
    assert len(logs) == 2 and all(any(n.endswith("_result.pkl") for n in names) for names in logs.values())
