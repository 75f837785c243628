"""HFT: Half Fine-Tuning (Hui et al., ACL 2025, arXiv 2404.18466).

At the start of every task (a "stage") a new half of each decoder block is frozen,
drawn with a task-specific seed (`seed * 1000 + task`):

- attention: 2 of {q, k, v, o} per layer;
- feed-forward: the layers are shuffled; ⌊L/2⌋ of them freeze 2 of {gate, up, down},
  the others 1 (1.5 of 3 on average);
- norms: 1 of the 2 RMSNorms per layer.

Freezing is `requires_grad=False` and the optimizer is rebuilt over the trainable
parameters only (the engine calls `configure_optimizer` after `before_experience`),
so frozen weights get no `.grad`, no momentum and no weight decay, and stay
bit-identical: masked optimisation, min L(θ) s.t. θ_F = θ_F^prev. Gradient masking
under a persistent AdamW would not be HFT. Embeddings and the LM head are outside
the selection and follow `embed_policy` (train | freeze); the final norm trains.

The achieved frozen fraction of block parameters is logged per task: exactly 0.5
for multi-head attention and an even layer count, less for GQA models (smaller
k/v, e.g. SmolLM2: see `results.json` → strategy.frozen_fraction).
"""
from __future__ import annotations

import random
import re

from torch import nn

from cl.errors import UserError
from cl.stream import Experience
from cl.strategy import Strategy

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, in order: modules named `...layers.<i>`."""
    layers = [(int(m.group(1)), mod) for name, mod in model.named_modules()
              if (m := re.search(r"(?:^|\.)layers\.(\d+)$", name))]
    return [mod for _, mod in sorted(layers, key=lambda p: p[0])]


def _find(layer: nn.Module, name: str) -> nn.Module:
    for child_name, child in layer.named_modules():
        if child_name.rsplit(".", 1)[-1] == name:
            return child
    raise UserError(f"HFT found no {name} in a decoder layer; it needs separate q/k/v/o, gate/up/down projections "
                    "and two norms per block (Llama-style), not fused ones.")


def draw_half(num_layers: int, seed: int) -> list[dict[str, list[str]]]:
    """Per layer, the names frozen in each category (the spec's category-level selection)."""
    rng = random.Random(seed)
    order = list(range(num_layers))
    rng.shuffle(order)
    two = set(order[: num_layers // 2])  # these layers freeze 2 of the 3 feed-forward matrices
    return [{"attention": rng.sample(ATTENTION, 2),
             "feed_forward": rng.sample(FEED_FORWARD, 2 if layer in two else 1),
             "norm": rng.sample(NORMS, 1)} for layer in range(num_layers)]


class HFT(Strategy):
    def __init__(self, model, optimizer, scheduler=None, embed_policy: str = "train", seed: int = 0,
                 verify: bool = True):
        super().__init__(model, optimizer, scheduler)
        if embed_policy not in ("train", "freeze"):
            raise UserError(f"strategy.embed_policy must be train or freeze, not {embed_policy!r}.")
        self.embed_policy = embed_policy
        self.seed = seed
        self.verify = verify
        self.selections: list[list[dict]] = []
        self.frozen_fraction: list[float] = []
        self.frozen: list[nn.Parameter] = []
        self._sums: list[float] = []

    def setup(self, stream, context=None) -> None:
        super().setup(stream, context)
        self.layers = decoder_layers(self.model)
        if not self.layers:
            raise UserError("HFT needs a decoder-only transformer (blocks named layers.<i>); use a causal LM model.")
        self.block_params = [p for layer in self.layers for p in layer.parameters()]

    def before_experience(self, exp: Experience, plan=None) -> None:
        super().before_experience(exp, plan)
        selection = draw_half(len(self.layers), self.seed * 1000 + exp.index)
        for p in self.model.parameters():
            p.requires_grad_(True)
        frozen = []
        for layer, chosen in zip(self.layers, selection):
            for names in chosen.values():
                for name in names:
                    frozen += list(_find(layer, name).parameters())
        lm = getattr(self.model, "lm", self.model)
        if self.embed_policy == "freeze":
            frozen += list(lm.get_input_embeddings().parameters()) + list(lm.get_output_embeddings().parameters())
        for p in frozen:
            p.requires_grad_(False)
        self.frozen = frozen
        block = sum(p.numel() for p in self.block_params)
        fraction = sum(p.numel() for p in self.block_params if not p.requires_grad) / block
        self.selections = self.selections[: exp.index] + [selection]
        self.frozen_fraction = self.frozen_fraction[: exp.index] + [fraction]
        self._sums = [float(p.detach().double().sum()) for p in frozen] if self.verify else []
        self.log({"event": "hft_selection", "experience": exp.index, "frozen_fraction": fraction,
                  "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)})

    def after_experience(self, exp: Experience) -> None:
        if self.verify and self._sums:
            moved = [i for i, (p, s) in enumerate(zip(self.frozen, self._sums)) if float(p.detach().double().sum()) != s]
            if moved:
                raise RuntimeError(f"HFT: {len(moved)} frozen tensors changed during experience {exp.index}.")

    def results(self) -> dict:
        return {"frozen_fraction": self.frozen_fraction, "embed_policy": self.embed_policy,
                "selection_seeds": [self.seed * 1000 + i for i in range(len(self.selections))],
                "selections": self.selections}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "selections": self.selections, "frozen_fraction": self.frozen_fraction}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.selections, self.frozen_fraction = list(state["selections"]), list(state["frozen_fraction"])
        if self.verify and self.frozen:  # resumed mid-task: the frozen half as the checkpoint holds it
            self._sums = [float(p.detach().double().sum()) for p in self.frozen]

