"""Preemption: SIGINT and SIGTERM (SLURM's preemption signal) stop a run with a checkpoint
and one line saying how to resume; after SIGKILL at a random moment, `resume=<run dir>`
still ends with the uninterrupted run's results.json, byte for byte, and its event log,
with no event missing or written twice. A requeued job (the same command in the same
folder, as submitit requeues a preempted SLURM job) continues from its checkpoint."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, cli, read_events
from tests.test_engine import comparable

# ~120 steps; the signalled run takes ≥ 30 ms per step ($CL_TEST_SLOW): about 4 s after the first checkpoint
ARGS = ["debug=smoke", "strategy._target_=tests.helpers.SlowER", "scenario.max_per_class=60", "trainer.epochs=2",
        "trainer.batch_size=8", "trainer.checkpoint_every=5", "trainer.log_every=1", "evaluation.every=2",
        "scheduler=cosine"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    r = cli(ARGS + [f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# SIGINT takes the same path as SIGTERM (cl.checkpoint.Preemption): it runs in make test-slow, which CI runs
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_a_signalled_run_resumes_to_the_uninterrupted_numbers(sig, reference, tmp_path):
    out = tmp_path / "run"
    args = ARGS + [f"hydra.run.dir={out}"]
    delay = random.uniform(0.0, 2.5)  # a random iteration: the moment is not chosen by the code under test
    proc = subprocess.Popen([sys.executable, "-m", "cl", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1", "CL_TEST_SLOW": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    where = f"(signal {sig.name} {delay:.2f}s after the first checkpoint)"
    assert not (out / "results.json").exists(), f"the run finished before the signal {where}; make it longer"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
        assert "Traceback" not in err
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert re.fullmatch(rf"{sig.name}: stopped at iteration \d+ with a checkpoint; resume with: "
                            rf"python -m cl resume={re.escape(str(out))}", last), last

    if sig == signal.SIGTERM:  # SLURM preemption: the requeued job runs the same command again
        resumed = cli(args)
        assert "holds a checkpoint of this run; continuing from it" in resumed.stderr + resumed.stdout
    else:
        resumed = cli([f"resume={out}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "results.json").read_text() == (reference / "results.json").read_text(), where
    assert comparable(read_events(out)) == comparable(read_events(reference)), where

    if sig == signal.SIGTERM:  # another run pointed at this folder is refused, naming what differs
        other = cli(ARGS + ["seed=5", f"hydra.run.dir={out}"])
        assert other.returncode == 2 and "holds another run" in other.stderr
        assert "seed" in other.stderr
