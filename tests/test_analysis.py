"""cl.analysis: run folders into tidy DataFrames."""
from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from cl import analysis  # noqa: E402
from cl.evaluation import metrics, plots  # noqa: E402
from tests.conftest import read_events, read_results, run_inprocess  # noqa: E402

SMALL = ["scenario.max_per_class=10", "scenario.max_per_class_eval=10", "model.backbone.hidden=[8]",
         "trainer.batch_size=10", "evaluation.every=1"]


def test_trace_and_results_frames(tmp_path):
    for lr in (0.01, 0.1):
        run_inprocess(SMALL + [f"optimizer.lr={lr}"], tmp_path / f"lr{lr}")
    trace = analysis.load_trace(tmp_path)
    events = [e for e in read_events(tmp_path / "lr0.1") if e["event"] == "eval" and not e["full"]]
    assert len(trace[trace["optimizer.lr"] == 0.1]) == len(events)
    assert {"run", "iteration", "experience", "eval_experience", "accuracy", "strategy", "seed"} <= set(trace.columns)
    assert not trace.duplicated(["run", "iteration", "eval_experience"]).any()
    full = analysis.load_trace(tmp_path, full=True)
    assert set(full["n"]) == {10 * 2} and len(full) == 2 * 6 * 5  # initial + 5 ends, 5 experiences, 2 runs
    results = analysis.load_results(tmp_path)
    assert len(results) == 2 and set(results["strategy"]) == {"ER"}
    assert analysis.swept_keys(results) == ["optimizer.lr"]
    table = analysis.compare(results, ["min_acc", "final_average_accuracy"], by="optimizer.lr")
    assert list(table.index) == [0.01, 0.1] and (table["runs"] == 1).all() and "±" in table.iloc[0, 0]
    ax = analysis.plot_stability_gap(trace, eval_experience=0, by="optimizer.lr")
    assert len(ax.get_lines()) >= 2
    ax = analysis.plot_sweep(results, x="optimizer.lr", metric="min_acc")
    assert ax.get_xlabel() == "optimizer.lr"


def test_the_plotted_curves_are_the_accuracy_the_metrics_are_computed_from(tmp_path, monkeypatch):
    """In a task-incremental run the metrics are task-aware: the run folder's stability_gap.png,
    load_trace's `accuracy` and plot_stability_gap must draw that accuracy, not the task-agnostic one."""
    drawn = {}
    real = plots.stability_gap
    monkeypatch.setattr(plots, "stability_gap", lambda trace, ends, *a, **k: drawn.update(trace=trace) or real(trace, ends, *a, **k))
    run_inprocess(SMALL + ["scenario.setting=task"], tmp_path / "til")
    res = read_results(tmp_path / "til")
    assert res["accuracy"] == "task-aware"
    ends = res["continual_evaluation"]["experience_ends"]
    reported = res["metrics"]["min_acc"]

    assert metrics.min_acc(drawn["trace"], ends) == reported  # the run folder's plot
    trace = analysis.load_trace(tmp_path)
    assert set(trace["accuracy_type"]) == {"task-aware"}
    assert (trace["accuracy"] == trace["accuracy_task_aware"]).all()
    assert (trace["accuracy"] != trace["accuracy_task_agnostic"]).any()
    loaded = {j: list(zip(g["iteration"], g["accuracy"])) for j, g in trace.groupby("eval_experience")}
    assert metrics.min_acc(loaded, ends) == reported  # load_trace
    ax = analysis.plot_stability_gap(trace, eval_experience=0)
    (line,) = ax.get_lines()[:1]
    curve = dict(zip(line.get_xdata(), line.get_ydata() / 100))
    after = [a for it, a in curve.items() if ends[0] < it <= ends[-1]]
    assert min(after) == pytest.approx(min(a for it, a in loaded[0] if ends[0] < it <= ends[-1]))  # plot_stability_gap
    assert sorted(x for x in (l.get_xdata()[0] for l in ax.get_lines()[1:])) == ends[:-1]  # boundaries


def test_empty_folder_gives_empty_frames(tmp_path):
    assert analysis.load_trace(tmp_path).empty and analysis.load_results(tmp_path).empty


def test_wandb_curves_are_the_runs_primary_accuracy():
    """acc_exp<j> in wandb is the accuracy the metrics use (task-aware in task-incremental runs)."""
    from cl.loggers.wandb_logger import WandbLogger

    class Run:
        logged = []

        def log(self, data, step=None):
            self.logged.append(data)

    logger = WandbLogger.__new__(WandbLogger)
    logger.run, logger.task_aware = Run(), False
    event = {"event": "eval", "iteration": 3, "eval_experience": 1, "accuracy": 0.4, "accuracy_task_aware": 0.9}
    logger.log({"event": "run_start", "protocol": {"accuracy": "task-aware"}})
    logger.log(event)
    assert logger.run.logged[-1]["eval_subset/acc_exp1"] == 0.9
    assert logger.run.logged[-1]["eval_subset/acc_task_agnostic_exp1"] == 0.4
    logger.log({"event": "run_start", "protocol": {"accuracy": "task-agnostic"}})
    logger.log(event)
    assert logger.run.logged[-1]["eval_subset/acc_exp1"] == 0.4
