"""The reservoir buffer: uniform over the stream, exact sequential semantics, raw storage."""
from __future__ import annotations

import math

import torch

from strategies.buffer import ReservoirBuffer


def sequential_reservoir(n_items: int, size: int, draws: list[float]) -> list[int]:
    """Algorithm R one item at a time, consuming one uniform draw per item (the reference)."""
    buf: list[int] = []
    for n in range(n_items):
        if n < size:
            buf.append(n)
        else:
            j = math.floor(draws[n] * (n + 1))
            if j < size:
                buf[j] = n
    return buf


def test_batched_insert_equals_one_by_one_reservoir():
    size, n, batch = 7, 200, 13
    buf = ReservoirBuffer(size, seed=5)
    g = torch.Generator().manual_seed(5)
    draws = torch.cat([torch.rand(min(batch, n - s), generator=g, dtype=torch.float64) for s in range(0, n, batch)])
    for start in range(0, n, batch):
        ids = torch.arange(start, min(n, start + batch))
        buf.add(ids.view(-1, 1), ids, torch.zeros_like(ids))
    assert buf.x.flatten().tolist() == sequential_reservoir(n, size, draws.tolist())
    assert len(buf) == size and buf.seen == n


def test_reservoir_is_uniform_over_the_stream():
    """Every stream position must end up in the buffer with probability size/n.
    Chi-square over 10 position bins across 400 independent streams."""
    size, n, trials, bins = 50, 1000, 400, 10
    counts = torch.zeros(bins)
    for seed in range(trials):
        buf = ReservoirBuffer(size, seed=seed)
        for start in range(0, n, 32):
            ids = torch.arange(start, min(n, start + 32))
            buf.add(ids.view(-1, 1), ids, ids)
        counts += torch.bincount(buf.y // (n // bins), minlength=bins).float()
    expected = trials * size / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, (chi2, counts.tolist())  # p = 0.001 for 9 degrees of freedom
    # and a biased buffer (keeping the first items) would fail the same test
    biased = torch.zeros(bins)
    biased[0] = trials * size
    assert float(((biased - expected) ** 2 / expected).sum()) > 27.88


def test_buffer_stores_raw_uint8_and_samples_distinct_items():
    buf = ReservoirBuffer(20, seed=0, logit_width=6)
    x = torch.randint(0, 255, (30, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(30)
    buf.add(x[:10], y[:10], y[:10], logits=torch.randn(10, 2))
    buf.add(x[10:], y[10:], y[10:], logits=torch.randn(20, 4))
    assert buf.x.dtype == torch.uint8 and buf.x.shape == (20, 1, 4, 4)
    s = buf.sample(8)
    assert len(set(s["y"].tolist())) == 8
    assert torch.equal(s["x"], x[s["y"]])
    assert s["logits"].shape == (8, 6) and set(s["logit_valid"].tolist()) <= {2, 4}
    # padded logit columns beyond each row's valid width are zero
    for row, valid in zip(s["logits"], s["logit_valid"]):
        assert torch.all(row[valid:] == 0)
    raw = 20 * 16
    assert buf.nbytes() - raw - buf.logits.nbytes - buf.logit_valid.nbytes == 20 * 16  # y and t: 8 bytes each


def test_state_dict_round_trip_continues_identically():
    a = ReservoirBuffer(10, seed=1)
    for s in range(0, 40, 8):
        ids = torch.arange(s, s + 8)
        a.add(ids.view(-1, 1), ids, ids)
    b = ReservoirBuffer(10, seed=99)
    b.load_state_dict(a.state_dict())
    ids = torch.arange(40, 60)
    a.add(ids.view(-1, 1), ids, ids)
    b.add(ids.view(-1, 1), ids, ids)
    assert torch.equal(a.y, b.y) and torch.equal(a.sample(5)["y"], b.sample(5)["y"])
