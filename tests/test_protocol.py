"""The two-phase workflow end to end under debug=smoke: a tuning sweep (grid and
Optuna), the evaluation phase with several seeds on the disjoint pool, and the report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.slow  # an Optuna sweep and an evaluation phase (15 s)
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


# ---- selection and ranking in the metric's direction, on hand-made run folders --------------------
def fake_run(folder: Path, phase: str, strategy: str, lr: float, seed: int, metrics: dict, selected=None) -> Path:
    """A finished run folder as `python -m cl` writes it (only what the protocol and report read)."""
    cfg = {"strategy": {"_target_": f"strategies.{strategy}"}, "optimizer": {"lr": lr}, "seed": seed, "phase": phase,
           "tuning": {"from": None, "metric": "forgetting", "mode": "auto",
                      "selected_runs": [str(p) for p in selected] if selected else None}}
    (folder / ".hydra").mkdir(parents=True)
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        path.write_text(yaml.safe_dump(cfg))
    (folder / "metrics.jsonl").write_text("")
    (folder / "results.json").write_text(json.dumps({"protocol": {"phase": phase, "strategy": strategy, "seed": seed},
                                                     "accuracy": "task-agnostic", "metrics": metrics}))
    return folder


# per strategy and learning rate, over seeds 0 and 1: (forgetting, average incremental accuracy)
TUNING = {("ER", 0.01): [(0.30, 0.70), (0.32, 0.72)], ("ER", 0.1): [(0.10, 0.60), (0.12, 0.62)],
          ("Finetune", 0.01): [(0.50, 0.50), (0.52, 0.50)], ("Finetune", 0.1): [(0.80, 0.40), (0.82, 0.40)]}


@pytest.fixture
def hand_made_phases(tmp_path):
    """Tuning sweeps of ER and Finetune; evaluation runs of the configurations chosen by
    tuning.metric=forgetting (lowest mean: ER lr=0.1, Finetune lr=0.01), as cl.protocol records them."""
    runs = {}
    for (strategy, lr), values in TUNING.items():
        for seed, (f, a) in enumerate(values):
            runs.setdefault((strategy, lr), []).append(fake_run(
                tmp_path / f"tune_{strategy}" / f"{lr}_{seed}", "tuning", strategy, lr, seed,
                {"forgetting": f, "average_incremental_accuracy": a}))
    for strategy, lr, f in (("ER", 0.1, 0.15), ("Finetune", 0.01, 0.55)):
        for seed in range(3):
            fake_run(tmp_path / f"eval_{strategy}" / str(seed), "evaluation", strategy, lr, seed,
                     {"forgetting": f, "average_incremental_accuracy": 0.5}, selected=runs[(strategy, lr)])
    return tmp_path


def test_tuning_selection_follows_the_metric_direction(hand_made_phases):
    from cl.errors import UserError
    from cl.evaluation import metrics
    from cl.protocol import best_configuration

    assert metrics.direction("forgetting") == "min" and metrics.direction("wf_100") == "min"
    assert metrics.direction("average_incremental_accuracy") == "max" and metrics.direction("lca_10") == "max"
    er = hand_made_phases / "tune_ER"
    job, score, members = best_configuration(er, "forgetting")
    assert job.config.optimizer.lr == 0.1 and score == pytest.approx(0.11) and len(members) == 2
    job, score, _ = best_configuration(er, "average_incremental_accuracy")
    assert job.config.optimizer.lr == 0.01 and score == pytest.approx(0.71)
    assert best_configuration(er, "forgetting", "min")[0].config.optimizer.lr == 0.1
    with pytest.raises(UserError, match="lower forgetting is better; set tuning.mode=min"):
        best_configuration(er, "forgetting", "max")


def test_report_shows_the_recorded_selection_ranked_in_the_metric_direction(hand_made_phases):
    text = report([hand_made_phases], "forgetting")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ER")
            or line.startswith("| Finetune")}
    # the configurations phase 2 ran (not the highest forgetting), with ranks where lower is better
    assert rows["ER"][1] == "optimizer.lr=0.1" and rows["ER"][2].startswith("11.00 ± 1.00 (n=2)")
    assert rows["ER"][3].startswith("15.00 ± 0.00 (n=3)") and rows["ER"][4:] == ["1", "1 |"]
    assert rows["Finetune"][1] == "optimizer.lr=0.01" and rows["Finetune"][2].startswith("51.00 ± 1.00")
    assert rows["Finetune"][4:] == ["2", "2 |"]
    assert "Kendall τ = 1.000" in text and "lower is better" in text
    # another metric shows the same configurations, saying what chose them
    text = report([hand_made_phases], "average_incremental_accuracy")
    assert "| ER | optimizer.lr=0.1 (chosen by forgetting) | 61.00 ± 1.00 (n=2)" in text
    # tuning runs alone: the best configuration in the metric's direction
    text = report([hand_made_phases / "tune_ER", hand_made_phases / "tune_Finetune"], "forgetting")
    assert "| ER | optimizer.lr=0.1 (no evaluation runs: best by forgetting) | 11.00" in text


def test_report_finds_the_recorded_runs_from_anywhere(hand_made_phases, monkeypatch):
    """A relative tuning.from (as in the README), read from another folder or after the sweeps were moved."""
    for run in (hand_made_phases / "eval_ER").iterdir():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["tuning"]["from"] = "multirun/tune_ER"
        cfg["tuning"]["selected_runs"] = ["multirun/tune_ER/0.1_0", "multirun/tune_ER/0.1_1"]
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = hand_made_phases / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = report([hand_made_phases], "forgetting")
    assert "| ER | optimizer.lr=0.1 | 11.00 ± 1.00 (n=2)" in text, text


def test_optuna_direction_follows_the_objective():
    """The Optuna sweeper minimises a lower-is-better objective (forgetting, WF) and maximises the rest."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cl.cli import register_resolvers
    from tests.conftest import CONF

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for objective, expected in (("forgetting", "minimize"), ("wf_10", "minimize"),
                                    ("average_incremental_accuracy", "maximize")):
            cfg = hydra_compose("config", overrides=["hydra/sweeper=tuning", f"objective={objective}"],
                                return_hydra_config=True)
            assert cfg.hydra.sweeper.direction == expected


def test_report_of_an_ordinary_sweep_has_one_row_per_configuration(tmp_path):
    """Runs without a phase (any sweep): one row per configuration, mean ± std over its seeds, best first."""
    for (strategy, lr), values in TUNING.items():
        for seed, (f, a) in enumerate(values):
            fake_run(tmp_path / f"{strategy}_{lr}_{seed}", "all", strategy, lr, seed,
                     {"forgetting": f, "average_incremental_accuracy": a})
    lines = report([tmp_path]).splitlines()
    rows = [line for line in lines if line.startswith("| ER") or line.startswith("| Finetune")]
    assert "Sweep report (8 runs" in lines[0] and len(rows) == 4
    assert rows[0].startswith("| ER | optimizer.lr=0.01, strategy._target_=strategies.ER | 71.00 ± 1.00 (n=2) | 31.00 ± 1.00")
    assert rows[-1].startswith("| Finetune | optimizer.lr=0.1, strategy._target_=strategies.Finetune | 40.00 ± 0.00 (n=2)")
    assert "n/a" not in "\n".join(rows)
    lowest = report([tmp_path], "forgetting").splitlines()
    assert [line for line in lowest if line.startswith("| ")][1].startswith("| ER | optimizer.lr=0.1,")
