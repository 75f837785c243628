"""The notebooks execute (nbclient) on tiny runs and produce their figures."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

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


def test_compare_sweep_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_SWEEP_DIR", str(tmp_path / "sweep"))
    monkeypatch.setenv("CL_NOTEBOOK_ARGS", "debug=smoke")
    nb = execute("compare_sweep.ipynb", tmp_path)
    assert images(nb) >= 1
    assert (tmp_path / "sweep" / "sweep.png").is_file()
    printed = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "6 runs; swept: ['optimizer.lr']" in printed
