"""The two-phase workflow end to end under debug=smoke: a tuning sweep (grid and
Optuna), the evaluation phase with several seeds on the disjoint pool, and the report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cl import analysis
from cl.report import report
from tests.conftest import cli, read_results

TUNE = ["debug=smoke", "scenario.increment=1", "logger.console=false"]


def results_under(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).rglob("results.json"))]


@pytest.fixture(scope="module")
def grid_phases(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    for strategy, grid in (("er", ["optimizer.lr=0.005,0.1"]), ("finetune", [])):
        r = cli(["-m", "phase=tuning", f"strategy={strategy}", *grid, "seed=0,1", *TUNE,
                 f"hydra.sweep.dir={root / ('tune_' + strategy)}"])
        assert r.returncode == 0, r.stderr[-2000:]
        r = cli(["-m", "phase=evaluation", f"tuning.from={root / ('tune_' + strategy)}", "seed=0,1,2",
                 f"hydra.sweep.dir={root / ('eval_' + strategy)}"])
        assert r.returncode == 0, r.stderr[-2000:]
    return root


def test_tuning_and_evaluation_use_disjoint_pools_with_the_same_shape(grid_phases):
    tune = results_under(grid_phases / "tune_er")
    evaluate = results_under(grid_phases / "eval_er")
    assert len(tune) == 4 and len(evaluate) == 3
    tune_classes = {c for r in tune for c in r["protocol"]["class_order"]}
    eval_classes = {c for r in evaluate for c in r["protocol"]["class_order"]}
    assert tune_classes == {0, 1, 2, 3, 4} and eval_classes == {5, 6, 7, 8, 9}
    assert {r["protocol"]["shape"] for r in tune + evaluate} == {"B0Inc1"}
    assert {r["protocol"]["phase"] for r in tune} == {"tuning"}
    assert {r["protocol"]["phase"] for r in evaluate} == {"evaluation"}
    assert sorted(r["protocol"]["seed"] for r in evaluate) == [0, 1, 2]


def test_evaluation_runs_the_configuration_with_the_best_mean_over_seeds(grid_phases):
    tune = analysis.load_results(grid_phases / "tune_er")
    means = tune.groupby("optimizer.lr")["average_incremental_accuracy"].mean()
    best_lr = means.idxmax()
    evaluate = analysis.load_results(grid_phases / "eval_er")
    assert set(evaluate["optimizer.lr"]) == {best_lr}
    assert evaluate["tuning.selected_score"].iloc[0] == pytest.approx(means.max())
    assert len(evaluate["tuning.selected_runs"].iloc[0]) == 2  # the chosen configuration's two seeds


def test_report_tables_both_phases_and_kendall_tau(grid_phases, tmp_path):
    text = report([grid_phases])
    assert "| ER | optimizer.lr=" in text and "| Finetune | (single configuration)" in text
    assert "(n=3)" in text and "(n=2)" in text
    assert "Kendall τ =" in text
    out = tmp_path / "report.md"
    done = subprocess.run([sys.executable, "-m", "cl.report", str(grid_phases), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and out.read_text() in done.stdout and "Two-phase report" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "cl.report", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "No finished run" in bad.stderr


def test_optuna_sweeper_tunes_and_the_evaluation_phase_reads_it(tmp_path):
    r = cli(["-m", "phase=tuning", "hydra/sweeper=tuning", "hydra.sweeper.n_trials=3",
             "optimizer.lr=tag(log,interval(0.001,0.3))", *TUNE, f"hydra.sweep.dir={tmp_path / 'optuna'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "optuna" / "optimization_results.yaml").is_file()
    assert len(results_under(tmp_path / "optuna")) == 3
    r = cli(["phase=evaluation", f"tuning.from={tmp_path / 'optuna'}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_results(tmp_path / "eval")["protocol"]["phase"] == "evaluation"


def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    r = cli(["-m", "phase=tuning", "strategy._target_=tests.helpers.NaNLoss,strategies.replay.ER", *TUNE,
             f"hydra.sweep.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "0" / "error.txt").is_file() and (tmp_path / "1" / "results.json").is_file()


def test_evaluation_phase_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(["-m", "phase=evaluation", f"tuning.from={empty}", "seed=0,1"])
    assert r.returncode == 2 and "holds no completed job" in r.stderr and "Traceback" not in r.stderr
    r = cli(["phase=tuning", "scenario=permuted_mnist", "debug=smoke"])
    assert r.returncode == 2 and "needs two disjoint pools" in r.stderr
