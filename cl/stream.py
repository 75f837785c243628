"""The data contract between scenarios and the engine: Batch, TensorData, Experience, Stream.

Scenarios build a `Stream`; the engine iterates its experiences and asks each
dataset for `Batch`es. Images stay in memory as uint8 NCHW tensors; augmentation
runs later, batched on the device (`cl.transforms`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from cl.errors import UserError


@dataclass
class Batch:
    """One minibatch. `x` is what the model eats (augmented on the device by the
    engine), `raw` the stored form before augmentation (what replay buffers keep),
    `y` the labels, `t` the task label of every sample. `extra` carries anything a
    scenario adds (attention masks for language models, sample indices)."""

    x: Tensor
    y: Tensor
    t: Tensor
    raw: Tensor | None = None
    extra: dict = field(default_factory=dict)
    global_size: int | None = None  # under DDP: the size of the global batch this rank's share comes from

    def __post_init__(self):
        if self.global_size is None:
            self.global_size = len(self)

    def __len__(self) -> int:
        return self.y.shape[0]

    def shard(self, lo: int, hi: int) -> "Batch":
        """Samples [lo, hi) of the batch (a rank's share under DDP); `global_size` stays the whole batch's."""
        n = len(self)

        def cut(v):
            return v[lo:hi] if isinstance(v, (Tensor, list)) and len(v) == n else v

        x = cut(self.x)
        return Batch(x=x, y=cut(self.y), t=cut(self.t), raw=x if self.raw is self.x else cut(self.raw),
                     extra={k: cut(v) for k, v in self.extra.items()}, global_size=self.global_size)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(v):
            return v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v

        x = move(self.x)
        return Batch(
            x=x,
            y=move(self.y),
            t=move(self.t),
            raw=x if self.raw is self.x else move(self.raw),
            extra={k: move(v) for k, v in self.extra.items()},
            global_size=self.global_size,
        )


def _epoch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63))


class TensorData:
    """In-memory samples: `x` (uint8 images N×C×H×W, or any tensor), labels `y`, task labels `t`.

    `batches` yields contiguous slices of a permutation drawn from `seed`; it does
    no per-sample Python work, so its cost does not grow with the dataset.
    """

    def __init__(self, x: Tensor, y: Tensor, t: Tensor | None = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x = x
        self.y = y.long()
        self.t = torch.zeros_like(self.y) if t is None else t.long()

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Tensor | Sequence[int]) -> "TensorData":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorData(self.x[idx], self.y[idx], self.t[idx])

    def with_task(self, task: int) -> "TensorData":
        return TensorData(self.x, self.y, torch.full_like(self.y, task))

    @staticmethod
    def concat(parts: Sequence["TensorData"]) -> "TensorData":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        return TensorData(
            torch.cat([p.x for p in parts]),
            torch.cat([p.y for p in parts]),
            torch.cat([p.t for p in parts]),
        )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        start: int = 0,
        step: int = 1,
    ) -> Iterator[Batch]:
        """Yield batches; with `shuffle`, in the order of a permutation drawn from `seed`.
        `start` skips that many batches (how a resumed run continues mid-epoch); `step`
        yields every step-th batch from there (a rank's share of a sharded evaluation)."""
        n = len(self)
        order = torch.randperm(n, generator=_epoch_generator(seed)) if shuffle else None
        for b in range(start, self.num_batches(batch_size, drop_last), step):
            if order is None:
                sl = slice(b * batch_size, min(n, (b + 1) * batch_size))
                x, y, t = self.x[sl], self.y[sl], self.t[sl]
            else:
                idx = order[b * batch_size : (b + 1) * batch_size]
                x, y, t = self.x[idx], self.y[idx], self.t[idx]
            yield Batch(x=x, y=y, t=t, raw=x)


class CollatedData:
    """Data whose batches are built by `collate(indices)` (token sequences): the `TensorData`
    batching, a seeded shuffle per epoch, `start` to resume mid-epoch, `step` to shard."""

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                start: int = 0, step: int = 1) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=_epoch_generator(seed)) if shuffle else torch.arange(n)
        for b in range(start, self.num_batches(batch_size, drop_last), step):
            yield self.collate(order[b * batch_size : (b + 1) * batch_size])


class TokenData(CollatedData):
    """Tokenised instruction examples for causal language models: each sequence is
    the prompt (the chat template applied, up to the assistant header) followed by
    the response (answer tokens + eos). `prompt_lens` says where the response starts.

    `batches` pads each batch to its own longest sequence (dynamic padding):
    `x` right-padded inputs, `y` next-token targets with -100 on prompt and padding
    (so the loss is on response tokens only), and in `extra` the left-padded
    prompts for generation, the reference answers and the instructions.
    """

    def __init__(self, seqs: list[Tensor], prompt_lens: Tensor, answers: list[str], instructions: list[str],
                 pad_id: int, t: Tensor | None = None):
        self.seqs = seqs
        self.prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long)
        self.answers = answers
        self.instructions = instructions
        self.pad_id = int(pad_id)
        self.t = torch.zeros(len(seqs), dtype=torch.long) if t is None else t.long()

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def instruction_set(self) -> list[str]:
        return sorted(set(self.instructions))

    def subset(self, indices) -> "TokenData":
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        return TokenData([self.seqs[i] for i in idx], self.prompt_lens[idx], [self.answers[i] for i in idx],
                         [self.instructions[i] for i in idx], self.pad_id, self.t[idx])

    def with_task(self, task: int) -> "TokenData":
        return TokenData(self.seqs, self.prompt_lens, self.answers, self.instructions, self.pad_id,
                         torch.full_like(self.t, task))

    @staticmethod
    def concat(parts: Sequence["TokenData"]) -> "TokenData":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        return TokenData([s for p in parts for s in p.seqs], torch.cat([p.prompt_lens for p in parts]),
                         [a for p in parts for a in p.answers], [i for p in parts for i in p.instructions],
                         parts[0].pad_id, torch.cat([p.t for p in parts]))


    def by_length(self) -> "TokenData":
        """The same examples, longest response first (ties: longest prompt): generation batches of
        similar lengths pad little and stop together."""
        key = [(len(s) - p, p) for s, p in zip(self.seqs, self.prompt_lens.tolist())]
        return self.subset(sorted(range(len(self)), key=lambda i: key[i], reverse=True))

    def collate(self, idx: Tensor | Sequence[int]) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        seqs = [self.seqs[i] for i in idx.tolist()]
        plens = self.prompt_lens[idx].tolist()
        n, length, plen = len(seqs), max(len(s) for s in seqs) - 1, max(plens)
        x = torch.full((n, length), self.pad_id, dtype=torch.long)
        y = torch.full((n, length), -100, dtype=torch.long)
        prompts = torch.full((n, plen), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, plen), dtype=torch.long)
        for b, (s, p) in enumerate(zip(seqs, plens)):
            x[b, : len(s) - 1] = s[:-1]
            y[b, p - 1 : len(s) - 1] = s[p:]  # position i predicts token i+1: targets are response tokens only
            prompts[b, plen - p :] = s[:p]
            mask[b, plen - p :] = 1
        responses = max(len(s) - p for s, p in zip(seqs, plens))
        extra = {"prompt_ids": prompts, "prompt_mask": mask, "answers": [self.answers[i] for i in idx.tolist()],
                 "instructions": [self.instructions[i] for i in idx.tolist()], "max_new_tokens": responses + 2}
        return Batch(x=x, y=y, t=self.t[idx], raw=None, extra=extra)



class TokenBlocks(CollatedData):
    """Fixed-length training sequences of a token stream, read from memory-mapped arrays of token
    ids (the `.bin` files a scenario's token cache writes once: documents tokenised, each followed
    by eos, concatenated). Sample i is the `length + 1` tokens from `starts[i]` of file `sources[i]`:
    `x` its first `length` tokens and `y` its last `length` (position k predicts token k+1). Blocks
    of one file step by `length`, so consecutive blocks share one boundary token and every token of
    the packed range is a target exactly once per epoch; there is no padding and no -100.

    Only the index tensors live in memory, so a corpus may be far larger than memory, and subsets,
    concatenations and replay samples are views over the same files, never copies. The files are
    opened read-only on first use in each process (a pickled TokenBlocks carries paths, not data)."""

    def __init__(self, files: Sequence[str | Path], dtype: str, sources: Tensor, starts: Tensor, length: int,
                 t: Tensor | None = None):
        self.files = [str(f) for f in files]
        self.dtype = str(dtype)
        self.sources = torch.as_tensor(sources, dtype=torch.long)
        self.starts = torch.as_tensor(starts, dtype=torch.long)
        self.length = int(length)
        self.t = torch.zeros(len(self.starts), dtype=torch.long) if t is None else torch.as_tensor(t).long()
        self._arrays: list | None = None

    @staticmethod
    def packed(file: str | Path, dtype: str, length: int, blocks: Tensor | Sequence[int] | None = None,
               offset: int = 0, tokens: int | None = None) -> "TokenBlocks":
        """Blocks k = 0, 1, ... of the token range [offset, offset + tokens) of one file (all of
        it by default), or only the listed `blocks`."""
        if tokens is None:
            tokens = np.memmap(file, dtype=dtype, mode="r").shape[0] - offset
        count = max(0, (tokens - 1) // length)
        index = torch.arange(count) if blocks is None else torch.as_tensor(blocks, dtype=torch.long)
        return TokenBlocks([file], dtype, torch.zeros_like(index), offset + index * length, length)

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> list:
        if self._arrays is None:
            self._arrays = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        return self._arrays

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def tokens(self) -> int:
        """Target tokens: each block predicts `length` tokens."""
        return len(self) * self.length

    def subset(self, indices) -> "TokenBlocks":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TokenBlocks(self.files, self.dtype, self.sources[idx], self.starts[idx], self.length, self.t[idx])

    def with_task(self, task: int) -> "TokenBlocks":
        return TokenBlocks(self.files, self.dtype, self.sources, self.starts, self.length, torch.full_like(self.t, task))

    @staticmethod
    def concat(parts: Sequence["TokenBlocks"]) -> "TokenBlocks":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({(p.length, p.dtype) for p in parts}) > 1:
            raise ValueError("token blocks of different lengths or dtypes cannot be concatenated")
        files = list(dict.fromkeys(f for p in parts for f in p.files))
        where = {f: k for k, f in enumerate(files)}
        sources = torch.cat([torch.tensor([where[f] for f in p.files], dtype=torch.long)[p.sources] for p in parts])
        return TokenBlocks(files, parts[0].dtype, sources, torch.cat([p.starts for p in parts]), parts[0].length,
                           torch.cat([p.t for p in parts]))


    def collate(self, idx: Tensor | Sequence[int]) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        arrays, n = self.arrays(), self.length + 1
        rows = np.stack([arrays[s][a : a + n] for s, a in zip(self.sources[idx].tolist(), self.starts[idx].tolist())])
        block = torch.from_numpy(rows.astype(np.int64))
        return Batch(x=block[:, :-1], y=block[:, 1:], t=self.t[idx], raw=None)



@dataclass
class Experience:
    """One step of the stream: its classes (labels after the class-order remap),
    train and eval data, and its task label. `valid` holds the validation split
    held out from train, when the scenario asks for one."""

    index: int
    classes: list[int]
    train: TensorData
    eval: TensorData
    task_label: int
    name: str = ""
    valid: TensorData | None = None
    metric: str = "accuracy"  # instruction tasks: exact | rouge_l | edit_similarity (how generations are scored)
    max_new_tokens: int | None = None  # instruction tasks: the cap on generated tokens (None: reference length + 2)


MODALITIES = ("classification", "instruction", "tokens")
TEXT_METRICS = ("exact", "rouge_l", "edit_similarity")  # an instruction task's `metric` (cl.evaluation.text scores it)


@dataclass
class RetentionPrompts:
    """General prompts for the retention probe of instruction streams: the untrained model's
    greedy answers (`max_new_tokens` at most) are the reference later answers are scored against."""

    prompts: TokenData
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass
class Stream:
    """An ordered list of experiences plus what describes them.

    Labels are remapped so that label k is the k-th class of `class_order`:
    each experience's classes are contiguous, and `class_order[k]` is the
    dataset's original class id of label k.
    """

    experiences: list[Experience]
    setting: str  # "class" | "task" | "dataset" | "domain" | "instruction"
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    class_order: list[int] | None = None
    class_order_seed: int | None = None
    base: int | None = None
    increment: int | None = None
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    online: bool = False
    batch_size: int | None = None  # the stream batch of an online scenario
    info: dict = field(default_factory=dict)  # dataset, pool, pretraining... for results.json
    # what a sample is, which picks the training loss (`Strategy.training_step`) and the scorers
    # (`cl.evaluation.scorer_for`): "classification" (labels) | "instruction" (prompt -> response tokens)
    # | "tokens" (packed token blocks of a corpus per experience: language modelling, scored by loss)
    modality: str = "classification"
    retention: "RetentionPrompts | None" = None  # instruction streams: the retention probe's prompts
    # domains scored at every evaluation but never trained on, by name (a token stream's original
    # distribution: what continual pre-training costs the base model)
    held_out: dict = field(default_factory=dict)

    def __post_init__(self):
        """A stream that trains on nothing would report the untrained model as the result: refuse it."""
        if not self.experiences:
            raise UserError(f"The stream {self.name} has no experiences; give the scenario data to split.")
        if self.modality not in MODALITIES:
            raise UserError(f"A stream's modality is one of {', '.join(MODALITIES)}, not {self.modality!r}.")
        for e in self.experiences:
            if len(e.train) == 0:
                raise UserError(f"Experience {e.index} ({e.name or e.classes}) of {self.name} has no training samples; "
                                "give the scenario training data for it (its train files, or less held out by "
                                "scenario.validation).")

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    @property
    def task_aware(self) -> bool:
        """Whether predictions may use the task label (task-incremental)."""
        return self.setting in ("task", "dataset")  # dataset: each experience a dataset with its own head

    @property
    def shape_name(self) -> str:
        if self.base is None or self.increment is None:
            return f"{len(self)} experiences"
        return f"B{self.base}Inc{self.increment}"

    def classes_upto(self, i: int) -> list[int]:
        seen: list[int] = []
        for e in self.experiences[: i + 1]:
            seen.extend(c for c in e.classes if c not in seen)
        return seen

    def protocol(self) -> dict:
        """What results.json states about the scenario."""
        return {
            "setting": self.setting,
            "scenario": self.name,
            "shape": self.shape_name,
            "num_experiences": len(self),
            "num_classes": self.num_classes,
            "classes_per_experience": [len(e.classes) for e in self.experiences],
            "class_order": self.class_order,
            "class_order_seed": self.class_order_seed,
            "online": self.online,
            **self.info,
        }
