"""Sequential LoRA: one LoRA adapter (through `peft`) on a frozen causal LM, trained
on every task in turn, with nothing else against forgetting. The baseline LCIA and
O-LoRA-style methods are measured against.

Checkpoints hold only the adapter weights: the frozen base comes back from
`model.pretrained` at resume.
"""
from __future__ import annotations

from cl.strategy import Strategy
from strategies.lora_adapters import adapter_state, add_lora, load_adapter_state, lora_config


class SeqLoRA(Strategy):
    def __init__(self, model, optimizer, scheduler=None, lora: dict | None = None):
        super().__init__(model, optimizer, scheduler)
        self.lora = lora_config(**(lora or {}))

    def setup(self, stream, context=None) -> None:
        super().setup(stream, context)
        add_lora(self.model, "default", self.lora)
        self.model.to(self.device)

    def state_dict(self) -> dict:
        return {"adapters": adapter_state(self.model)}

    def load_state_dict(self, state: dict) -> None:
        load_adapter_state(self.model, state["adapters"])
