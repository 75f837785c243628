"""Data-parallel throughput on the CPU: `torchrun --nproc_per_node=2` over 1 process, for information.

The same run both ways (ER on split MNIST-5k, MLP 400-400, global batch 64, continual
evaluation off), each side using all the machine's cores (1 process × N threads,
2 processes × N/2 threads). Throughput is training samples per second of training
wall time (the run's wall time minus its evaluation time, from metrics.jsonl), so
process start-up and evaluation are left out. On a 2-core CPU with gloo, the gradient
all-reduce and the replay-buffer all-gather are on the critical path; GPUs with NCCL
are another matter.

    python benchmarks/ddp.py [--repeats 2] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(nproc: int, folder: Path, epochs: int, threads: int) -> float:
    args = ["experiment=er_splitmnist", f"trainer.epochs={epochs}", "trainer.batch_size=64", "evaluation.every=0",
            "logger.console=false", f"hydra.run.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "cl", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "run_end")
    samples = 64 * sum(e["iterations"] for e in events if e["event"] == "experience_start")  # full batches (≈)
    return samples / (end["wall_time"] - end["eval_time"] - end["matrix_eval_time"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    speed = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                speed[n].append(run(n, Path(tmp) / f"n{n}_{r}", args.epochs, max(cores // n, 1)))
    one, two = statistics.median(speed[1]), statistics.median(speed[2])
    print(f"ER, split MNIST-5k, MLP 400-400, global batch 64, {args.epochs} epochs per experience, "
          f"{cores} cores, gloo, {args.repeats} interleaved repeats")
    print(f"  1 process  × {max(cores, 1)} threads: {one:8.0f} training samples/s  ({', '.join(f'{s:.0f}' for s in speed[1])})")
    print(f"  2 processes × {max(cores // 2, 1)} threads: {two:8.0f} training samples/s  ({', '.join(f'{s:.0f}' for s in speed[2])})")
    print(f"throughput 2 processes / 1 process = {two / one:.2f}   (for information)")


if __name__ == "__main__":
    main()
