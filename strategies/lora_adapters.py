"""LoRA adapters (through `peft`) on a `CausalLM`: the configuration, adding a named
adapter, and the adapter-only state that LoRA strategies checkpoint (SeqLoRA, LCIA)."""
from __future__ import annotations

from torch import nn

from cl.errors import UserError


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
