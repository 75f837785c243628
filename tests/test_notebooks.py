"""The notebooks execute (nbclient) on tiny runs and produce their figures."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from omegaconf import OmegaConf

from tests.conftest import compose

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, cwd: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def images(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {}))


def test_stability_gap_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CL_NOTEBOOK_ARGS", "debug=smoke scenario.max_per_class=30")
    nb = execute("stability_gap.ipynb", tmp_path)
    assert images(nb) >= 1
    assert (tmp_path / "runs" / "first_experience.png").is_file()
    table = nb.cells[-1].outputs[0]["data"]["text/plain"]
    assert "ER" in table and "Finetune" in table and "min_acc" in table
    # run again: the runs of the same configuration are reused
    again = execute("stability_gap.ipynb", tmp_path)
    printed = "".join(o.get("text", "") for o in again.cells[2].outputs)
    assert printed.count("using the run in") == 2 and "running:" not in printed


def test_stability_gap_notebook_refuses_runs_of_another_configuration(tmp_path, monkeypatch):
    """A results.json made with other settings than the notebook asks for is refused, naming the keys."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("CL_NOTEBOOK_RUNS", str(runs))
    monkeypatch.setenv("CL_NOTEBOOK_ARGS", "debug=smoke")
    other = runs / "finetune"
    other.mkdir(parents=True)
    cfg = compose(["strategy=finetune", "evaluation.every=1", "logger.console=false", "debug=smoke", "seed=3",
                   "optimizer.lr=0.5"])
    (other / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (other / "results.json").write_text("{}")
    with pytest.raises(CellExecutionError) as failed:
        execute("stability_gap.ipynb", tmp_path)
    message = str(failed.value)
    assert "UserError" in message and "another configuration" in message
    assert "it differs at optimizer.lr, scenario.class_order_seed, seed)" in message  # the order follows the seed
    assert not (runs / "er").exists()  # it stopped before running anything


def test_compare_sweep_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_SWEEP_DIR", str(tmp_path / "sweep"))
    monkeypatch.setenv("CL_NOTEBOOK_ARGS", "debug=smoke")
    nb = execute("compare_sweep.ipynb", tmp_path)
    assert images(nb) >= 1
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    printed = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "6 runs; swept: ['optimizer.lr']" in printed


@pytest.mark.parametrize("name", ["stability_gap.ipynb", "compare_sweep.ipynb", "continual_pretraining.ipynb"])
def test_the_first_cell_says_the_notebook_runs_full_experiments_unless_smoke(name):
    first = nbformat.read(NOTEBOOKS / name, as_version=4).cells[0]
    assert first.cell_type == "markdown" and "full" in first.source and "CL_NOTEBOOK_ARGS=debug=smoke" in first.source


def test_continual_pretraining_notebook(tmp_path, monkeypatch, data_root):
    """The four presets at smoke size: the loss-per-domain figure (held-out domain included) and
    the table of loss metrics, one row per preset."""
    monkeypatch.setenv("CL_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CL_NOTEBOOK_ARGS", f"debug=smoke data_dir={data_root}")
    nb = execute("continual_pretraining.ipynb", tmp_path)
    assert images(nb) >= 1 and (tmp_path / "runs" / "loss_per_domain.png").is_file()
    table = nb.cells[-1].outputs[0]["data"]["text/plain"]
    for preset in ("cpt_smollm2 ", "cpt_smollm2_replay", "cpt_smollm2_infinite", "cpt_smollm2_joint"):
        assert preset in table, preset
    assert "final_average_loss" in table and "held_out_loss_increase" in table
