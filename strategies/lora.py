"""Sequential LoRA: one LoRA adapter (through `peft`) on a frozen causal LM, trained
on every task in turn, with nothing else against forgetting. The baseline LCIA and
O-LoRA-style methods are measured against.

Checkpoints hold only the adapter weights: the frozen base comes back from
`model.pretrained` at resume.
"""
from __future__ import annotations

from torch import nn

from cl.errors import UserError
from cl.strategy import Strategy


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules="all-linear"):
    from peft import LoraConfig

    if r < 1:
        raise UserError(f"strategy.lora.r must be a positive integer, got {r}.")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")


def add_lora(model: nn.Module, name: str, config) -> None:
    """Wrap `model.lm` in a PeftModel with adapter `name`, or add `name` to it."""
    from peft import PeftModel, get_peft_model

    if not hasattr(model, "lm"):
        raise UserError("LoRA strategies need a causal LM model (model=smollm2, causal_lm or tiny_llama).")
    if isinstance(model.lm, PeftModel):
        model.lm.add_adapter(name, config)
    else:
        model.lm = get_peft_model(model.lm, config, adapter_name=name)


def adapter_state(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_adapter_state(model: nn.Module, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = unexpected + [k for k in missing if "lora_" in k]
    if wrong:
        raise UserError(f"The checkpoint's adapters do not fit this model (e.g. {wrong[0]}); resume with the same "
                        "model and strategy.lora settings.")


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
