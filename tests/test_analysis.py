"""cl.analysis: run folders into tidy DataFrames."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from cl import analysis  # noqa: E402
from tests.conftest import read_events, run_inprocess  # noqa: E402

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


def test_empty_folder_gives_empty_frames(tmp_path):
    assert analysis.load_trace(tmp_path).empty and analysis.load_results(tmp_path).empty
