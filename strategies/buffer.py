"""Replay building blocks: a reservoir buffer that stores samples in their raw form (uint8
images), and `Replays`, what a replaying strategy declares to a method that wraps it."""
from __future__ import annotations

import torch
from torch import Tensor

from cl import distributed


class Replays:
    """Declared by the strategies that replay from a buffer (strategies/replay.py), read by a
    method that wraps one (AdaB²N): `joint_forward`, whether stream and replay samples go through
    one concatenated forward (a constructor option), and `replay_batches`, the replay batches
    drawn so far (a training step replayed if it grew during the step)."""

    joint_forward: bool = False
    replay_batches: int = 0


class ReservoirBuffer:
    """Reservoir sampling (Vitter's algorithm R): after n stream samples, each of
    them is in the buffer with probability size/n. A batch is inserted at once, with
    the same outcome as inserting its samples one by one.

    Stores `x` as given (raw uint8 images), labels `y`, task labels `t`, and,
    optionally, `logits` (DER++) padded to `logit_width` with the valid width of
    each row in `logit_valid`.
    """

    def __init__(self, size: int, device="cpu", seed: int = 0, logit_width: int | None = None):
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self.size = int(size)
        self.device = torch.device(device)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.logit_width = logit_width
        self.x: Tensor | None = None
        self.y = torch.empty(0, dtype=torch.long, device=self.device)
        self.t = torch.empty(0, dtype=torch.long, device=self.device)
        self.logits: Tensor | None = None
        self.logit_valid: Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def _allocate(self, x: Tensor, logits: Tensor | None) -> None:
        self.x = torch.zeros((self.size, *x.shape[1:]), dtype=x.dtype, device=self.device)
        self.y = torch.zeros(self.size, dtype=torch.long, device=self.device)
        self.t = torch.zeros(self.size, dtype=torch.long, device=self.device)
        if logits is not None:
            width = self.logit_width or logits.shape[1]
            self.logits = torch.zeros((self.size, width), dtype=torch.float32, device=self.device)
            self.logit_valid = torch.zeros(self.size, dtype=torch.long, device=self.device)

    def slots(self, n: int) -> tuple[Tensor, Tensor]:
        """For the next `n` stream samples: (buffer slots written, index in the batch of
        the sample written there). Several samples drawing one slot: the last one wins."""
        pos = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        draw = torch.floor(torch.rand(n, generator=self.generator, dtype=torch.float64) * (pos + 1)).long()
        slot = torch.where(pos < self.size, pos.long(), draw)
        keep = slot < self.size
        slot, k = slot[keep], torch.arange(n)[keep]
        winner = torch.full((self.size,), -1, dtype=torch.long).scatter_reduce(0, slot, k, reduce="amax")
        slots = torch.nonzero(winner >= 0).flatten()
        return slots, winner[slots]

    def add(self, x: Tensor, y: Tensor, t: Tensor, logits: Tensor | None = None) -> None:
        """Insert a batch. Under DDP every rank passes its share and inserts the gathered global
        batch, so the buffers of all ranks stay identical."""
        if distributed.active():
            x, y, t = distributed.gather(x), distributed.gather(y), distributed.gather(t)
            logits = None if logits is None else distributed.gather(logits)
        if self.x is None:
            self._allocate(x, logits)
        slots, k = self.slots(len(y))
        self.seen += len(y)
        if len(slots) == 0:
            return
        slots, k = slots.to(self.device), k.to(x.device)
        self.x[slots] = x[k].to(self.device)
        self.y[slots] = y[k].to(self.device)
        self.t[slots] = t[k].to(self.device)
        if logits is not None:
            w = logits.shape[1]
            self.logits[slots, :w] = logits[k].detach().float().to(self.device)
            self.logits[slots, w:] = 0
            self.logit_valid[slots] = w

    def sample(self, n: int) -> dict[str, Tensor]:
        """`n` distinct stored samples, uniformly (all of them if fewer are stored); under DDP,
        this rank's contiguous share of the same `n` draws on every rank."""
        idx = distributed.shard(torch.randperm(len(self), generator=self.generator)[:n]).to(self.device)
        out = {"x": self.x[idx], "y": self.y[idx], "t": self.t[idx]}
        if self.logits is not None:
            out["logits"], out["logit_valid"] = self.logits[idx], self.logit_valid[idx]
        return out

    def nbytes(self) -> int:
        tensors = [self.x, self.y, self.t, self.logits, self.logit_valid]
        return sum(v.element_size() * v.nelement() for v in tensors if v is not None)

    def state_dict(self) -> dict:
        return {
            "seen": self.seen, "generator": self.generator.get_state(), "x": self.x, "y": self.y, "t": self.t,
            "logits": self.logits, "logit_valid": self.logit_valid,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self.generator.set_state(state["generator"])
        move = lambda v: None if v is None else v.to(self.device)  # noqa: E731
        self.x, self.y, self.t = move(state["x"]), move(state["y"]), move(state["t"])
        self.logits, self.logit_valid = move(state["logits"]), move(state["logit_valid"])
