"""Rehearsal with a reservoir buffer of raw (uint8) samples, augmented when replayed.

- ER (Chaudhry et al. 2019): the stream batch and a replay batch, one forward,
  one cross-entropy. `new_weight=λ` instead weighs λ·CE(new) + (1-λ)·CE(replay)
  (the form De Lange et al. 2023 use).
- ER-ACE (Caccia et al. 2022): the stream batch's cross-entropy sees only some
  logits (asymmetric CE); the replay batch gets the full cross-entropy.
  `mask=present` (default): only the classes present in the batch, as the paper's
  equation reads, on a head that grows with the classes seen. `mask=mammoth`:
  Mammoth's er_ace and AdaB²N's er_ace_ada, over a head fixed to all classes
  (`model.fixed_head=true`): also every class from the largest label seen so far
  upward, unless that label is the last class, so unseen classes stay in the
  softmax (the AdaB²N presets use it). As in Mammoth, masking and replay start with
  the second experience; `from_first_experience=true` applies both from the first.
  Differences from the official code (pclucas14/AML, task-free): it masks and
  replays from the first batch (our `from_first_experience=true`) and keeps the
  unseen classes as `mask=mammoth` does but without the last-class exception; our
  defaults (`mask=present`, from the second experience) differ from it.
- DER++ (Buzzega et al. 2020): CE on the stream batch, α·MSE between the current
  and the stored logits of one replay batch, β·CE on a second replay batch. The
  stored logits are those of the augmented input when it entered the buffer; with
  a growing head, only the columns that existed then are compared.

Under DDP (`cl.distributed`) the buffer is the same on every rank: each rank adds the
gathered global batch and keeps its share of the same global replay batch, so a
2-process run replays what a 1-process run with the same global batch replays.

Samples enter the buffer after the replay batch is drawn, so a step never replays
its own inputs. `joint_forward=True` runs ER-ACE's and DER++'s stream and replay
batches through one concatenated forward (the AdaB²N versions of the official code
do; it matters only to layers whose output depends on the batch, i.e. batch norm).
The replay batch has `replay_batch_size` samples (null: as many as the stream batch,
Mammoth's `minibatch_size` default).

Every class here declares `Replays` (strategies/buffer.py), what a method that wraps a
replay strategy (AdaB²N) reads: `joint_forward` and `replay_batches`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cl import distributed
from cl.errors import UserError
from cl.stream import Batch
from cl.strategy import Strategy
from strategies.buffer import Replays, ReservoirBuffer


class ER(Replays, Strategy):
    def __init__(self, model, optimizer, scheduler=None, mem_size: int = 500,
                 replay_batch_size: int | None = None, new_weight: float | None = None, seed: int = 0,
                 joint_forward: bool = False):
        super().__init__(model, optimizer, scheduler)
        if not isinstance(mem_size, int) or mem_size <= 0:
            raise UserError(f"strategy.mem_size must be a positive integer, got {mem_size!r}.")
        if replay_batch_size is not None and (not isinstance(replay_batch_size, int) or replay_batch_size <= 0):
            raise UserError(f"strategy.replay_batch_size must be a positive integer or null, got {replay_batch_size!r}.")
        self.mem_size = mem_size
        self.replay_batch_size = replay_batch_size
        self.new_weight = new_weight
        self.seed = seed
        self.buffer: ReservoirBuffer | None = None
        self.joint_forward = joint_forward
        self.replay_batches = 0  # declared in Replays: a wrapping method reads it

    def setup(self, stream, context=None):
        super().setup(stream, context)
        self.buffer = ReservoirBuffer(self.mem_size, self.device, self.seed, logit_width=stream.num_classes)

    def replay(self, n: int) -> dict[str, Tensor] | None:
        """A replay batch of `n` samples (under DDP, this rank's share of them: `n` is the
        global batch's size), augmented like the stream batch, or None while the buffer is empty."""
        if len(self.buffer) == 0:
            return None
        r = self.buffer.sample(self.replay_batch_size or n)
        r["x"] = self.augment(r["x"])
        self.replay_batches += 1
        return r

    def forward_parts(self, *parts: tuple[Tensor, Tensor]) -> list[Tensor]:
        """Logits of each (x, t) part: one concatenated forward with `joint_forward`,
        one forward per part otherwise."""
        if not self.joint_forward or len(parts) == 1:
            return [self.forward(x, t) for x, t in parts]
        logits = self.forward(torch.cat([x for x, _ in parts]), torch.cat([t for _, t in parts]))
        return list(logits.split([len(x) for x, _ in parts]))

    def training_step(self, batch: Batch) -> Tensor:
        r = self.replay(batch.global_size)
        if r is None:
            loss = F.cross_entropy(self.forward(batch.x, batch.t), batch.y)
        elif self.new_weight is None:
            logits = self.forward(torch.cat([batch.x, r["x"]]), torch.cat([batch.t, r["t"]]))
            loss = F.cross_entropy(logits, torch.cat([batch.y, r["y"]]))
        else:
            logits = self.forward(torch.cat([batch.x, r["x"]]), torch.cat([batch.t, r["t"]]))
            n = len(batch)
            loss = self.new_weight * F.cross_entropy(logits[:n], batch.y) + (1 - self.new_weight) * F.cross_entropy(
                logits[n:], r["y"]
            )
        self.buffer.add(batch.raw, batch.y, batch.t)
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.buffer.load_state_dict(state["buffer"])


def asymmetric_cross_entropy(logits: Tensor, y: Tensor, keep: Tensor | None = None) -> Tensor:
    """Cross-entropy over only the columns `keep` marks, by default the classes present in `y`
    (ER-ACE's loss on incoming data)."""
    if keep is None:
        keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        keep[y] = True
    return F.cross_entropy(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), y)


class ERACE(ER):
    def __init__(self, model, optimizer, scheduler=None, mem_size: int = 500, replay_batch_size: int | None = None,
                 from_first_experience: bool = False, mask: str = "present", seed: int = 0,
                 joint_forward: bool = False):
        super().__init__(model, optimizer, scheduler, mem_size, replay_batch_size, None, seed, joint_forward)
        if mask not in ("present", "mammoth"):
            raise UserError(f"strategy.mask must be present or mammoth, not {mask!r}.")
        self.from_first_experience, self.mask = from_first_experience, mask
        self.seen_max = torch.tensor(-1)  # the largest label of any stream batch so far

    def setup(self, stream, context=None):
        super().setup(stream, context)
        if self.mask == "mammoth" and hasattr(self.model, "grow") and not getattr(self.model, "fixed_head", False):
            raise UserError("strategy.mask=mammoth keeps the unseen classes' logits in the softmax, so it needs "
                            "a head over all classes from the start; add ++model.fixed_head=true.")
        self.seen_max = self.seen_max.to(self.device)

    def stream_columns(self, logits: Tensor, y: Tensor) -> Tensor:
        """The columns the stream batch's cross-entropy sees: its classes (mask=present);
        with mask=mammoth also every class from the largest seen id upward, unless that id
        is the last class (Mammoth's er_ace, AdaB²N's er_ace_ada)."""
        keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        keep[y] = True
        if self.mask == "mammoth":
            cols = torch.arange(logits.shape[1], device=logits.device)
            keep |= (cols >= self.seen_max) & (self.seen_max < logits.shape[1] - 1)
        return keep

    def training_step(self, batch: Batch) -> Tensor:
        active = self.from_first_experience or self.experience_index > 0
        y = batch.y
        if self.mask == "mammoth":
            y = distributed.gather(batch.y)  # the global batch's classes, the same on every rank
            self.seen_max = torch.maximum(self.seen_max, y.max())
        r = self.replay(batch.global_size) if active else None
        parts = [(batch.x, batch.t)] + ([(r["x"], r["t"])] if r is not None else [])
        logits, *replayed = self.forward_parts(*parts)
        loss = (asymmetric_cross_entropy(logits, batch.y, self.stream_columns(logits, y)) if active
                else F.cross_entropy(logits, batch.y))
        if r is not None:
            loss = loss + F.cross_entropy(replayed[0], r["y"])
        self.buffer.add(batch.raw, batch.y, batch.t)
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen_max": self.seen_max}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen_max = state.get("seen_max", torch.tensor(-1)).to(self.device)


class DERPP(ER):
    def __init__(self, model, optimizer, scheduler=None, mem_size: int = 500, replay_batch_size: int | None = None,
                 alpha: float = 0.1, beta: float = 0.5, seed: int = 0, joint_forward: bool = False):
        super().__init__(model, optimizer, scheduler, mem_size, replay_batch_size, None, seed, joint_forward)
        self.alpha = alpha
        self.beta = beta

    def training_step(self, batch: Batch) -> Tensor:
        r = self.replay(batch.global_size)
        r2 = self.replay(batch.global_size) if r is not None else None
        parts = [(batch.x, batch.t)] + ([(r["x"], r["t"]), (r2["x"], r2["t"])] if r is not None else [])
        logits, *replayed = self.forward_parts(*parts)
        loss = F.cross_entropy(logits, batch.y)
        if r is not None:
            out, out2 = replayed
            width = out.shape[1]
            stored = r["logits"][:, :width]
            mask = torch.arange(width, device=out.device)[None, :] < r["logit_valid"][:, None]
            loss = loss + self.alpha * ((out - stored) ** 2 * mask).sum() / mask.sum().clamp(min=1)
            loss = loss + self.beta * F.cross_entropy(out2, r2["y"])
        self.buffer.add(batch.raw, batch.y, batch.t, logits=logits.detach())
        return loss
