"""Data parallelism: `torchrun --nproc_per_node=2` on the CPU (gloo) trains what one process
trains with the same global batch.

Tolerance (stated in DESIGN.md and the README): the per-step training losses agree to
1e-4 relative and every accuracy-matrix entry to within one evaluation sample. The two
runs differ only in the order of floating-point sums (a gradient averaged over two
half-batches instead of one mean over the batch), so anything beyond that is a bug.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, cli, read_events, read_results

LOSS_RTOL = 1e-4

CASES = {
    # ER: replay under DDP (the buffer must stay identical on both ranks)
    "er": ["debug=smoke", "scenario.max_per_class=40", "trainer.batch_size=16", "trainer.epochs=2",
           "strategy.mem_size=40"],
    # DST: parameter hooks (masks applied to gradients and weights, topology updates, best-epoch restore)
    "dst": ["debug=smoke", "strategy=dst", "scenario.setting=task", "scenario.max_per_class=40",
            "trainer.batch_size=16", "trainer.epochs=2", "optimizer=adam", "optimizer.lr=0.01",
            "strategy.update_every=4"],
    # continual pre-training with replay: token blocks from the memory-mapped cache, replayed rows of the global batch
    "cpt_replay": ["experiment=cpt_smollm2_replay", "debug=smoke", "strategy.fraction=0.3", "trainer.batch_size=4"],
}


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "cl", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "train"]


@pytest.mark.slow  # two torchrun runs and two single-process runs (38 s); make test-slow, which CI runs
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_what_one_process_trains(case, tmp_path):
    args = CASES[case] + ["trainer.log_every=1"]
    ddp = torchrun(args + [f"hydra.run.dir={tmp_path / 'ddp'}"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = cli(args + [f"hydra.run.dir={tmp_path / 'one'}"], env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]

    a, b = read_results(tmp_path / "one"), read_results(tmp_path / "ddp")
    assert b["provenance"]["world_size"] == 2 and a["provenance"]["world_size"] == 1
    assert a["iterations"] == b["iterations"]
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert len(la) == len(lb) == a["iterations"]
    assert torch.allclose(torch.tensor(lb), torch.tensor(la), rtol=LOSS_RTOL, atol=0), (la, lb)
    sizes = a["eval_sizes"]
    if "loss_matrix" in a:  # a token stream: losses agree to float-sum order
        assert torch.allclose(torch.tensor(b["loss_matrix"]), torch.tensor(a["loss_matrix"]), rtol=LOSS_RTOL)
    for row_a, row_b in zip(a.get("accuracy_matrix", []), b.get("accuracy_matrix", [])):
        for j, (x, y) in enumerate(zip(row_a, row_b)):
            assert abs(x - y) <= 1 / sizes[j] + 1e-9, (a["accuracy_matrix"], b["accuracy_matrix"])

    # sharded evaluation covers every sample once: the same events, the same sizes, written once (rank 0)
    ea, eb = read_events(tmp_path / "one"), read_events(tmp_path / "ddp")
    strip = lambda events: [(e["event"], e.get("iteration"), e.get("eval_experience"), e.get("held_out"), e.get("n"))  # noqa: E731
                            for e in events]
    assert strip(ea) == strip(eb)
    assert not (tmp_path / "ddp" / "error.txt").exists()
    assert len(list((tmp_path / "ddp").glob("**/config.yaml"))) == 2  # ours + Hydra's, from rank 0 only

    if case == "er":  # the replay buffer is the single-process one, sample for sample
        buf_a = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=False)["strategy"]["buffer"]
        buf_b = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=False)["strategy"]["buffer"]
        assert buf_a["seen"] == buf_b["seen"]
        assert torch.equal(buf_a["y"], buf_b["y"]) and torch.equal(buf_a["x"], buf_b["x"])

        # a 2-process run resumes with 2 processes, not 1
        r = cli([f"resume={tmp_path / 'ddp'}"])
        assert r.returncode == 2 and "torchrun --nproc_per_node=2" in r.stderr, r.stderr[-2000:]
        # and not with 3: torchrun's failure report names the sentence as the root cause
        r = torchrun([f"resume={tmp_path / 'ddp'}"], nproc=3)
        root_cause = r.stderr[r.stderr.index("Root Cause"):]
        assert r.returncode != 0 and "traceback : error: The run being resumed trained on 2 process(es)" in root_cause


def _collectives(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from cl import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        used = torch.nn.Parameter(torch.zeros(3))
        only_rank0 = torch.nn.Parameter(torch.zeros(2))  # a per-task module only rank 0's share reached
        never = torch.nn.Parameter(torch.zeros(2))  # no rank used it: it must stay without a gradient
        used.grad = torch.full((3,), float(rank + 1))
        if rank == 0:
            only_rank0.grad = torch.full((2,), 4.0)
        stats = torch.full((2,), float(10 + rank))  # a batch-norm running mean
        loss, stop = distributed.sync_step([used, only_rank0, never], [stats], loss=float(rank), stop=rank == 1)
        out[rank] = {
            "used": used.grad.tolist(), "only": only_rank0.grad.tolist(), "never": never.grad,
            "stats": stats.tolist(), "loss": loss, "stop": stop,
            "gather": distributed.gather(torch.arange(rank + 2)).tolist(),  # uneven shares, rank order
            "shard": distributed.shard(list(range(5))),
        }
    finally:
        dist.destroy_process_group()


def test_collectives_on_two_gloo_processes():
    """The flat all-reduce: gradients averaged (a gradient missing on one rank counts as zero,
    missing everywhere stays None), buffers taken from rank 0, the loss averaged, a stop
    request seen by all; gathers keep rank order with uneven sizes; shards are contiguous."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_collectives, args=(2, port, out), nprocs=2, join=True)
    for rank in (0, 1):
        r = out[rank]
        assert r["used"] == [1.5, 1.5, 1.5] and r["only"] == [2.0, 2.0] and r["never"] is None
        assert r["stats"] == [10.0, 10.0] and r["loss"] == 0.5 and r["stop"] is True
        assert r["gather"] == [0, 1, 0, 1, 2]
    assert out[0]["shard"] == [0, 1, 2] and out[1]["shard"] == [3, 4]
