"""Replay for continual pre-training (strategies/token_replay.py): the fraction, where replayed
blocks come from, and the same global batches under DDP (2 gloo processes)."""
from __future__ import annotations

import socket

import pytest
import torch

from cl import distributed
from cl.strategy import Plan
from strategies.token_replay import TokenReplay
from tests.test_token_stream import stream_of

B = 8


class Recording(TokenReplay):
    """TokenReplay whose loss records the rows it trains on (this rank's share)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = []

    def token_loss(self, x, y):
        self.rows.append((x.clone(), y.clone()))
        return torch.zeros(())


def make_stream(root):
    texts = {name: [f"{name} document {i} " * 8 for i in range(40)] for name in ("aa", "bb", "cc")}
    return stream_of(root, texts, tokens_per_experience=16 * 40, eval_tokens=32)


def replay_run(root, fraction: float, seed: int = 0) -> tuple[Recording, list]:
    """Drive the strategy over the stream's global batches, each rank on its share (as the engine does)."""
    stream = make_stream(root)
    strategy = Recording(torch.nn.Linear(1, 1), optimizer=None, fraction=fraction, seed=seed)
    strategy.setup(stream)
    per_experience = []
    for exp in stream:
        n = exp.train.num_batches(B)
        strategy.before_experience(exp, Plan(1, B, n, 1, exp.index, len(stream)))
        strategy.rows = []
        for batch in exp.train.batches(B, shuffle=True, seed=exp.index):
            if distributed.active():
                batch = batch.shard(*distributed.bounds(len(batch)))
            strategy.training_step(batch)
        per_experience.append(strategy.rows)
        strategy.after_experience(exp)
    return strategy, per_experience


def blocks_of(data) -> set[tuple]:
    return {tuple(row.tolist()) for b in data.batches(64) for row in b.x}


def test_replay_takes_the_exact_fraction_from_earlier_experiences_only(tmp_path):
    strategy, rows = replay_run(tmp_path, fraction=0.05)
    stream = make_stream(tmp_path)
    own = [blocks_of(e.train) for e in stream]
    for i, batches in enumerate(rows):
        assert all(len(x) == B for x, _ in batches)  # the batch size (and so the token budget) is unchanged
        counts = [sum(tuple(r.tolist()) not in own[i] for r in x) for x, _ in batches]
        # 5% of 8 sequences is 0.4 per batch: two in every five batches, never more than the running share
        expected = [0] * len(batches) if i == 0 else [round(0.4 * (b + 1)) - round(0.4 * b) for b in range(len(batches))]
        assert counts == expected, (i, counts)
        replayed = {tuple(r.tolist()) for x, _ in batches for r in x if tuple(r.tolist()) not in own[i]}
        assert replayed <= set().union(*own[:i])  # only earlier experiences' training blocks
        for x, y in batches:  # a replayed block keeps its own targets
            assert torch.equal(x[:, 1:], y[:, :-1])
    # by the third experience both earlier ones are drawn from (uniformly over their blocks)
    _, rows = replay_run(tmp_path, fraction=0.5)
    third = {tuple(r.tolist()) for x, _ in rows[2] for r in x} - own[2]
    assert third & own[0] and third & own[1]


def _ranks(rank: int, world: int, port: int, root, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _, rows = replay_run(root, fraction=0.3)
        out[rank] = [[x.tolist() for x, _ in batches] for batches in rows]
    finally:
        dist.destroy_process_group()


def test_two_processes_replay_the_rows_one_process_replays(tmp_path):
    """Under DDP each rank trains on its contiguous share of the global batch; the replayed rows
    (the last k of the global batch) are the single-process ones, whichever rank holds them."""
    import torch.multiprocessing as mp

    _, single = replay_run(tmp_path, fraction=0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ranks, args=(2, port, tmp_path, out), nprocs=2, join=True)
    for i, batches in enumerate(single):
        for b, (x, _) in enumerate(batches):
            joined = out[0][i][b] + out[1][i][b]
            assert joined == x.tolist(), (i, b)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_a_fraction_outside_0_1_is_refused(fraction):
    from cl.errors import UserError

    with pytest.raises(UserError, match="strategy.fraction must be in"):
        TokenReplay(torch.nn.Linear(1, 1), None, fraction=fraction)
