"""`python -m cl.bench`: a whole suite at smoke size, its report, and a killed suite continued."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cl.evaluation.metrics import direction

ROOT = Path(__file__).resolve().parents[1]
SUITE = "online_cil"
TIMING = ("wall_time_s", "eval_time_s", "matrix_eval_time_s", "evaluation_share", "peak_memory_mb")


def bench(out: Path, data_root: Path, *extra: str, wait: bool = True):
    env = {**os.environ, "CL_FMNIST_DIR": str(data_root / "fashion-mnist"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cl.bench", SUITE, "--size", "smoke", "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("bench")
    bench(out, data_root)
    return out / f"{SUITE}-smoke"


def resolved(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def composed(folder: Path) -> dict:
    """The run's config as composed (interpolations kept: the pool follows `phase`, the class order `seed`)."""
    return yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())


def test_a_suite_runs_end_to_end_and_reports_every_method(suite_run):
    suite = yaml.safe_load((ROOT / "conf" / "suite" / f"{SUITE}.yaml").read_text())
    report = (suite_run / "report.md").read_text()
    for method in suite["methods"]:
        assert f"| {method} | " in report.split("## Selection")[0], method  # a results row per method
    assert "- **measured**: task-agnostic accuracy on the test split (over every class seen)" in report
    runs = pd.read_csv(suite_run / "runs.csv")
    assert set(runs["status"]) == {"finished"}
    metric, better = suite["metric"], direction(suite["metric"])
    for method in suite["methods"]:
        tune = runs[(runs["method"] == method) & (runs["phase"] == "tuning")]
        evaluate = runs[(runs["method"] == method) & (runs["phase"] == "evaluation")]
        assert tune["trial"].nunique() == suite["sizes"]["smoke"]["trials"]
        assert sorted(evaluate["seed"]) == suite["sizes"]["smoke"]["seeds"]["evaluation"]
        means = tune.groupby("trial")[metric].mean()
        best = means.idxmax() if better == "max" else means.idxmin()
        chosen = tune[tune["trial"] == best].iloc[0]
        # the selected configuration is the best tuning run's, run unchanged except for phase and seed
        want = composed(suite_run / chosen["folder"])
        for row in evaluate.itertuples():
            got = composed(suite_run / row.folder)
            assert got["phase"] == "evaluation" and want["phase"] == "tuning" and got["seed"] == row.seed
            assert got["tuning"]["selected_runs"] == [str((suite_run / chosen["folder"]).resolve())]
            differing = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            assert set(differing) <= {"phase", "seed", "tuning"}, differing
            other = resolved(suite_run / row.folder)["scenario"]["dataset"]["_target_"]
            assert other == "scenarios.datasets.fashion_mnist" != resolved(suite_run / chosen["folder"])["scenario"]["dataset"]["_target_"]
        assert f"| {method} | {best} |" in report  # the report names the selected configuration
    origin = json.loads(next((suite_run / "runs").rglob("results.json")).read_text())["provenance"]
    assert set(runs["commit"]) == {(origin["git_commit"] or "unknown")[:12] + ("+dirty" if origin["git_dirty"] else "")}
    assert f"**runs made at**: {runs['commit'].iloc[0]} ({len(runs)} runs)" in report  # which code made the numbers
    page = (suite_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    end = json.loads((next((suite_run / "runs").rglob("metrics.jsonl"))).read_text().splitlines()[-1])
    assert end["event"] == "run_end" and end["trainable_parameters"] > 0 and end["peak_memory_mb"] > 0


def comparable(out: Path) -> tuple[pd.DataFrame, str]:
    """runs.csv without measured times, and report.md without its timing lines and cost columns."""
    runs = pd.read_csv(out / "runs.csv").drop(columns=list(TIMING)).sort_values(["method", "phase", "run"])
    tables = [line.rsplit("|", 5)[0] if line.startswith("| ") and "Ā" not in line else line
              for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]
    return runs.reset_index(drop=True), "\n".join(tables)


@pytest.mark.slow  # two more passes over the suite (make test-slow)
def test_a_killed_suite_continues_without_repeating_finished_runs(suite_run, tmp_path, data_root):
    proc = bench(tmp_path, data_root, wait=False)
    runs_dir = tmp_path / f"{SUITE}-smoke" / "runs"
    deadline = time.time() + 600
    while len(list(runs_dir.rglob("results.json"))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in runs_dir.rglob("results.json")}
    assert 4 <= len(before) < 12, "the suite was not killed mid-way"
    again = bench(tmp_path, data_root)
    assert f"[tuning] {min(len(before), 6)} of 6 runs finished earlier" in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # no finished run ran again
    runs, tables = comparable(tmp_path / f"{SUITE}-smoke")
    want_runs, want_tables = comparable(suite_run)
    pd.testing.assert_frame_equal(runs, want_runs)
    assert tables == want_tables


def test_every_suite_composes_every_run():
    """Each suite's tuning runs compose (its overrides are valid keys and options) at both sizes."""
    from cl.bench import load_suite, suite_names, tuning_runs

    assert {"cil_vision", "online_cil", "til_vision", "pretrained_vit", "cit_smollm2"} <= set(suite_names())
    for name in suite_names():
        for size in ("smoke", "default"):
            suite = load_suite(name, size, [])
            runs = tuning_runs(suite)
            assert {r.method for r in runs} == set(suite.methods)
            assert len({r.identity for r in runs}) == len(runs)  # distinct configurations, distinct folders


def test_saved_overrides_are_read_as_written(tmp_path):
    """A sweep whose overrides hold an interpolation (the two phases' task lists) must be summarised
    and resumed from its saved overrides without resolving them (that raised at the sweep's end)."""
    from omegaconf import OmegaConf

    from cl.cli import saved_list

    saved = ["phase=tuning", "scenario.tasks='${phase_datasets.${phase}}'"]
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"overrides": saved, "status": "running"}), tmp_path / "sweep.yaml")
    assert saved_list(tmp_path / "overrides.yaml") == saved
    assert saved_list(tmp_path / "sweep.yaml", "overrides") == saved
