"""Replay for instruction tuning: a share of every batch comes from stored examples
of earlier tasks.

At each task's end `per_task` of its training examples (drawn with the run's seed)
join the memory. Each step adds round(B·f/(1−f)) memory examples to the B stream
examples, so a fraction f of the combined batch is replayed; the loss is the
token-mean over the response tokens of the combined batch.
"""
from __future__ import annotations

import torch

from cl import distributed
from cl.errors import UserError
from cl.stream import Batch, Experience, TokenData
from cl.strategy import Strategy


def cat_batches(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Two right-padded token batches as one (x padded with pad_id, y with -100)."""
    length = max(a.x.shape[1], b.x.shape[1])

    def pad(v, value):
        return torch.nn.functional.pad(v, (0, length - v.shape[1]), value=value)

    return Batch(x=torch.cat([pad(a.x, pad_id), pad(b.x, pad_id)]), y=torch.cat([pad(a.y, -100), pad(b.y, -100)]),
                 t=torch.cat([a.t, b.t]))


class LMReplay(Strategy):
    def __init__(self, model, optimizer, scheduler=None, fraction: float = 0.2, per_task: int = 50, seed: int = 0):
        super().__init__(model, optimizer, scheduler)
        if not 0 <= fraction < 1:
            raise UserError(f"strategy.fraction must be in [0, 1), got {fraction}.")
        self.fraction, self.per_task = fraction, per_task
        self.memory: TokenData | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, stream, context=None) -> None:
        if stream.modality != "instruction":
            raise UserError("strategy=lm_replay replays instruction examples; for image streams use er, er_ace or derpp.")
        super().setup(stream, context)

    def training_step(self, batch: Batch) -> torch.Tensor:
        k = round(batch.global_size * self.fraction / (1 - self.fraction))
        if self.memory is not None and k > 0:
            # under DDP: the same k draws on every rank, each keeping its share
            idx = distributed.shard(torch.randint(len(self.memory), (k,), generator=self.generator))
            if len(idx):
                batch = cat_batches(batch, self.memory.collate(idx).to(self.device), self.memory.pad_id)
        return self.token_loss(batch.x, batch.y)

    def after_experience(self, exp: Experience) -> None:
        keep = torch.randperm(len(exp.train), generator=self.generator)[: self.per_task]
        stored = exp.train.subset(keep.sort().values)
        self.memory = stored if self.memory is None else TokenData.concat([self.memory, stored])

    def state_dict(self) -> dict:
        memory = None if self.memory is None else {
            "seqs": self.memory.seqs, "prompt_lens": self.memory.prompt_lens, "answers": self.memory.answers,
            "instructions": self.memory.instructions, "pad_id": self.memory.pad_id, "t": self.memory.t}
        return {**super().state_dict(), "memory": memory, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.memory = None if state["memory"] is None else TokenData(**state["memory"])
        self.generator.set_state(state["generator"])
