"""Nothing lost, nothing silently wrong: a refused command leaves every run folder as it was (and
creates none), a sweep continues where it was stopped, the two-phase selection reads the config a
run ran with, and the advice in a message works when followed."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cl.report import report
from tests.conftest import ROOT, cli, read_results

TUNE = ["debug=smoke", "scenario.increment=1", "logger.console=false"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes' hash and its modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(r) -> str:
    return [line for line in r.stderr.splitlines() if line.strip()][-1]


@pytest.mark.slow  # six CLI processes (19 s); make test-slow, which CI runs
def test_a_refused_command_touches_no_run_folder_and_creates_none(tmp_path):
    run = tmp_path / "run"
    assert cli(["debug=smoke", f"hydra.run.dir={run}"]).returncode == 0
    before = snapshot(run)
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before

    for other in (["seed=3"], ["optimizer.lr=0.5"]):  # another run pointed at a finished run's folder
        r = cli(["debug=smoke", *other, f"hydra.run.dir={run}"])
        assert snapshot(run) == before
        assert r.returncode == 2 and f"{run} holds another run" in last_line(r), r.stderr[-2000:]
        assert other[0].split("=")[0].split(".")[-1] in last_line(r)

    again = cli(["debug=smoke", f"hydra.run.dir={run}"])  # the same run again: nothing to do
    assert again.returncode == 0 and "finished before; nothing was run again" in again.stdout
    assert snapshot(run) == before

    new = tmp_path / "new" / "a" / "b"
    r = cli(["debug=smoke", "scenario.increment=3", f"hydra.run.dir={new}"])  # refused after Hydra started
    assert r.returncode == 2 and "does not divide" in last_line(r)
    r = cli([f"resume={tmp_path / 'missing'}"])
    assert r.returncode == 2 and "holds no run" in last_line(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow  # two sweeps, a phase 2 and a report through the CLI (17 s)
def test_a_refused_sweep_touches_nothing_and_phase_2_runs_the_best_configuration(tmp_path):
    tune = tmp_path / "tune"
    r = cli(["-m", "phase=tuning", "optimizer.lr=0.005,0.1", "seed=0,1", *TUNE, f"hydra.sweep.dir={tune}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((r.stdout + r.stderr).splitlines()) < 40, "a 4-job sweep should print a few lines per job"
    table = r.stdout[r.stdout.index("sweep "):]
    assert all(re.search(rf"│\s+{j} │ .*│\s+[\d.]+ │ finished", table) for j in range(4)), table
    before = snapshot(tune)

    # the same folder with another grid: refused before any job starts, nothing written
    r = cli(["-m", "phase=tuning", "optimizer.lr=0.5,0.1", "seed=0,1", *TUNE, f"hydra.sweep.dir={tune}"])
    assert r.returncode == 2 and f"hydra.sweep.dir={tune} holds another sweep" in last_line(r)
    assert f"python -m cl -m resume={tune}" in last_line(r)
    assert snapshot(tune) == before

    scores = {}
    for res in tune.rglob("results.json"):
        lr = json.loads((res.parent / "config.yaml").read_text().split("lr:")[1].split()[0])
        scores.setdefault(lr, []).append(json.loads(res.read_text())["metrics"]["average_incremental_accuracy"])
    best = max(scores, key=lambda lr: sum(scores[lr]) / 2)
    r = cli(["phase=evaluation", f"tuning.from={tune}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    ran = (tmp_path / "eval" / "config.yaml").read_text()
    assert f"lr: {best}\n" in ran and "phase: evaluation" in ran
    text = report([tune, tmp_path / "eval"])
    row = next(line for line in text.splitlines() if line.startswith("| ER |"))
    assert f"optimizer.lr={best}" in row and f"{100 * sum(scores[best]) / 2:.2f} ±" in row, text

    # a config file changed after its run: the selection refuses it instead of trusting it
    job = next(tune.rglob("results.json")).parent
    composed = job / ".hydra" / "config.yaml"
    composed.write_text(composed.read_text().replace("lr: ", "lr: 0.5 #"))
    r = cli(["phase=evaluation", f"tuning.from={tune}", f"hydra.run.dir={tmp_path / 'eval2'}"])
    assert r.returncode == 2 and f"{composed} is not the config {job} ran with" in last_line(r)
    assert not (tmp_path / "eval2").exists()


# three jobs of ~60 steps each; with $CL_TEST_SLOW a step takes ≥ 30 ms
SWEEP = ["debug=smoke", "strategy._target_=tests.helpers.SlowER", "scenario.max_per_class=60", "trainer.batch_size=8",
         "trainer.checkpoint_every=5", "logger.console=false", "seed=0,1,2"]


def start_sweep(args, kill_in_job: str, sig, folder: Path):
    proc = subprocess.Popen([sys.executable, "-m", "cl", "-m", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1", "CL_TEST_SLOW": "1"})
    deadline = time.time() + 180
    while not (folder / kill_in_job / "checkpoints" / "last.pt").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert not (folder / kill_in_job / "results.json").exists(), "the job finished before the signal"
    return proc.returncode, out, err


@pytest.mark.slow  # four sweeps of three jobs (32 s)
def test_a_stopped_sweep_continues_with_only_its_unfinished_jobs(tmp_path):
    reference = tmp_path / "reference"
    assert cli(["-m", *SWEEP, f"hydra.sweep.dir={reference}"]).returncode == 0
    sweep = tmp_path / "sweep"

    code, out, err = start_sweep([*SWEEP, f"hydra.sweep.dir={sweep}"], "1", signal.SIGTERM, sweep)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"resume with: python -m cl -m resume={sweep}" in err
    assert re.search(r"│\s+0 │ .*│ finished", err) and re.search(r"│\s+1 │ .*│ stopped", err), err
    first_job = snapshot(sweep / "0")

    # continued, then killed hard in job 2 of 3, continued again: the numbers of an uninterrupted sweep
    code, out, err = start_sweep([f"resume={sweep}"], "2", signal.SIGKILL, sweep)
    assert code == -signal.SIGKILL and "finished earlier" in out
    assert (sweep / "1" / "results.json").is_file() and snapshot(sweep / "0") == first_job
    done = cli(["-m", f"resume={sweep}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(sweep / "0") == first_job
    for job in "012":
        assert read_results(sweep / job) == read_results(reference / job)
    assert "status: finished\n" in (sweep / "sweep.yaml").read_text()

    r = cli(["-m", f"resume={sweep / '0'}"])  # a run, not a sweep
    assert r.returncode == 2 and f"python -m cl resume={sweep / '0'}" in last_line(r)


def test_the_advice_after_a_diverged_loss_works_when_followed(tmp_path):
    r = cli(["debug=smoke", "strategy._target_=tests.helpers.NaNLoss", "+strategy.max_lr=0.05", "optimizer.lr=0.1",
             f"hydra.run.dir={tmp_path / 'diverged'}"])
    assert r.returncode == 2 and "The loss became nan at iteration 3" in last_line(r)
    command = re.search(r"python -m cl (.*) \(or add", last_line(r)).group(1).split()
    assert "optimizer.lr=0.01" in command and not any(a.startswith("hydra.run.dir") for a in command)
    again = subprocess.run([sys.executable, "-m", "cl", *command], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "diverged" / "checkpoints" / "last.pt").is_file()  # the diverged run's folder is kept


def test_a_read_only_resume_folder_advises_a_copy_that_resumes(tmp_path, monkeypatch):
    import tempfile

    from cl.cli import check_writable
    from cl.errors import UserError

    run = tmp_path / "run"
    args = ["debug=smoke", "strategy._target_=tests.helpers.CrashingER", "trainer.checkpoint_every=3",
            "scenario.max_per_class=20"]
    assert cli([*args, f"hydra.run.dir={run}"], env={"CL_TEST_KILL_AT": "10"}).returncode == 9

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    try:
        check_writable(run, "resume")
        raise AssertionError("a read-only folder was accepted")
    except UserError as e:
        advice = str(e)
    monkeypatch.undo()
    copy = tmp_path / "copy"
    assert f"cp -r {run} <dir>" in advice and "resume=<dir>" in advice
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    resumed = cli([f"resume={copy}"])  # (that a resumed run ends with the uninterrupted numbers: test_preemption)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_results(copy)["iterations"] > 10 and not (run / "results.json").exists()
