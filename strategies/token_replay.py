"""Replay for continual pre-training (Ibrahim et al. 2024): a fraction of every batch's sequences
come from the earlier experiences' training blocks.

The batch size and the experience's token budget stay as configured: in each batch the last k
sequences are replaced by blocks drawn uniformly (with replacement, seeded) from every earlier
experience's training blocks, so replay displaces new tokens rather than adding compute, as in the
paper's x% replay. k follows the fraction exactly over the experience: batch b replays
round(f·B·(b+1)) - round(f·B·b) sequences, so a 5% replay of batches of 8 replays 2 sequences in
every 5 batches. The blocks are read from the token cache's memory-mapped arrays; the memory holds
only their indices (`TokenBlocks`), never token copies.

Under DDP every rank draws the same global replay indices and keeps those in its share of the
global batch. The experience's first batch (no earlier experience) replays nothing.
"""
from __future__ import annotations

import torch

from cl import distributed
from cl.errors import UserError
from cl.stream import Batch, Experience, TokenBlocks
from cl.strategy import Strategy


class TokenReplay(Strategy):
    def __init__(self, model, optimizer, scheduler=None, fraction: float = 0.05, seed: int = 0):
        super().__init__(model, optimizer, scheduler)
        if not 0 <= fraction < 1:
            raise UserError(f"strategy.fraction must be in [0, 1), got {fraction}.")
        self.fraction = fraction
        self.memory: TokenBlocks | None = None  # earlier experiences' training blocks (indices into the cache)
        self.batches = 0  # micro-batches of this experience so far
        self.replayed = 0  # sequences replayed in this experience
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, stream, context=None) -> None:
        if stream.modality != "tokens":
            raise UserError("strategy=token_replay replays token blocks of a token stream; for instruction streams "
                            "use lm_replay, for image streams er, er_ace or derpp.")
        super().setup(stream, context)

    def before_experience(self, exp: Experience, plan=None) -> None:
        super().before_experience(exp, plan)
        self.batches = self.replayed = 0

    def replay_count(self, size: int) -> int:
        """Sequences to replay in the next batch of `size` (global): the exact running fraction."""
        b = self.batches
        return round(self.fraction * size * (b + 1)) - round(self.fraction * size * b)

    def training_step(self, batch: Batch) -> torch.Tensor:
        size = batch.global_size
        k = min(self.replay_count(size), size) if self.memory is not None else 0
        self.batches += 1
        if k:
            draws = torch.randint(len(self.memory), (k,), generator=self.generator)  # the same on every rank
            lo, hi = distributed.bounds(size) if distributed.active() else (0, size)
            first = max(size - k, lo)  # global rows [size - k, size) are replayed
            if first < hi:
                blocks = self.memory.collate(draws[first - (size - k) : hi - (size - k)]).to(self.device)
                x, y, t = batch.x.clone(), batch.y.clone(), batch.t.clone()
                x[first - lo :], y[first - lo :], t[first - lo :] = blocks.x, blocks.y, blocks.t
                batch = Batch(x=x, y=y, t=t, global_size=size)
            self.replayed += k
        return self.token_loss(batch.x, batch.y)

    def after_experience(self, exp: Experience) -> None:
        self.memory = exp.train if self.memory is None else TokenBlocks.concat([self.memory, exp.train])
        self.log({"event": "replay", "experience": exp.index, "replayed_sequences": self.replayed,
                  "batches": self.batches, "memory_blocks": len(self.memory)})

    def state_dict(self) -> dict:
        memory = None if self.memory is None else {
            "files": self.memory.files, "dtype": self.memory.dtype, "sources": self.memory.sources,
            "starts": self.memory.starts, "length": self.memory.length, "t": self.memory.t}
        return {**super().state_dict(), "memory": memory, "batches": self.batches, "replayed": self.replayed,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory = None if state["memory"] is None else TokenBlocks(**state["memory"])
        self.batches, self.replayed = state["batches"], state["replayed"]
        self.generator.set_state(state["generator"])
