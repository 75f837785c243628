"""Token streams: continual pre-training of causal LMs, one corpus (domain or language) per experience.

Each domain's documents (`scenarios.corpora`) are tokenised with the model's tokenizer, each
followed by eos, and written once to a cache of memory-mapped token arrays
(`<cache_dir>/<corpus>-<key>/{train,eval}.bin`, uint16 when the vocabulary fits, else uint32).
The key covers the corpus's fingerprint, the tokenizer's name, the held-out fraction and the
split seed; `meta.json` records the tokenizer's vocabulary hash, so a tokenizer that changed under
the same name is refused instead of silently mixing ids. A second run opens the arrays and
tokenises nothing. Documents are streamed through the tokenizer and written in chunks, so a
corpus may be far larger than memory.

Each document goes to the held-out split with probability `eval_fraction` (a seeded draw per
document, in corpus order): training never sees a held-out document. The splits are packed into
blocks of `seq_len` next-token targets (`cl.stream.TokenBlocks`: `seq_len + 1` tokens, no padding,
consecutive blocks sharing one boundary token). An experience trains on `tokens_per_experience`
tokens: that many blocks' worth, drawn without replacement (seeded by `data_seed`) from the
domain's training blocks; evaluation scores the first `eval_tokens` of its held-out blocks. Both
budgets are config values, so a preset fits 2 CPU cores and a user scales it up.

`held_out` domains are scored at every evaluation and never trained on: the base model's original
distribution, whose loss shows what continual pre-training costs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cl.errors import UserError
from cl.stream import Experience, Stream, TokenBlocks

CACHE_VERSION = 1
CHUNK_DOCUMENTS = 64


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "corpus"


class TokenCache:
    """The token arrays of one corpus under one tokenizer: `train.bin`, `eval.bin` and `meta.json`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    def file(self, split: str) -> Path:
        return self.folder / f"{split}.bin"

    def tokens(self, split: str) -> int:
        return self.meta["tokens"][split]


def build_cache(corpus, tokenizer, tokenizer_name: str, root: str | Path, eval_fraction: float,
                split_seed: int, label: str | None = None) -> TokenCache:
    """The corpus's token arrays, tokenised now if no cache holds them (written to a temporary
    folder, then renamed: a killed build leaves no half cache)."""
    key = hashlib.sha256(json.dumps({"corpus": corpus.fingerprint, "tokenizer": tokenizer_name,
                                     "eval_fraction": eval_fraction, "split_seed": split_seed,
                                     "version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root).expanduser() / f"{_slug(label or corpus.name)}-{key}"
    fingerprint = tokenizer_fingerprint(tokenizer)
    if (folder / "meta.json").is_file():
        cache = TokenCache(folder)
        if cache.meta["tokenizer_fingerprint"] != fingerprint:
            raise UserError(f"The token cache {folder} was built with a different tokenizer than the one "
                            f"{tokenizer_name} loads now (their vocabularies differ); delete that folder to "
                            "tokenise again, or set scenario.cache_dir to another folder.")
        return cache
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"Could not write the token cache in {folder.parent} ({e.strerror}); set scenario.cache_dir "
                        "to a writable folder.") from None
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(split_seed)
    counts = {"train": 0, "eval": 0}
    documents = {"train": 0, "eval": 0}
    print(f"Tokenising {label or corpus.name} ({corpus.about.get('source', corpus.name)}) once into {folder} ...",
          file=sys.stderr, flush=True)
    try:
        with open(tmp / "train.bin", "wb") as train, open(tmp / "eval.bin", "wb") as held:
            out = {"train": train, "eval": held}

            def flush(texts: list[str]) -> None:
                ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
                for tokens in ids:
                    split = "eval" if rng.random() < eval_fraction else "train"
                    arr = np.asarray(tokens + [eos], dtype=dtype)
                    out[split].write(arr.tobytes())
                    counts[split] += len(arr)
                    documents[split] += 1

            chunk: list[str] = []
            for text in corpus.documents():
                if text.strip():
                    chunk.append(text)
                if len(chunk) == CHUNK_DOCUMENTS:
                    flush(chunk)
                    chunk = []
            if chunk:
                flush(chunk)
        if not counts["train"] + counts["eval"]:
            raise UserError(f"The corpus {corpus.name} ({corpus.about.get('source', '')}) has no text; give it "
                            "files that contain some.")
        meta = {"corpus": corpus.name, "about": corpus.about, "fingerprint": corpus.fingerprint,
                "tokenizer": tokenizer_name, "tokenizer_fingerprint": fingerprint, "vocab_size": vocab, "eos": eos,
                "dtype": dtype, "eval_fraction": eval_fraction, "split_seed": split_seed, "tokens": counts,
                "documents": documents, "version": CACHE_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCache(folder)


def _budget(value, i: int, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if i >= len(value):
            raise UserError(f"scenario.{what} lists {len(value)} budgets but the stream has more domains; give one "
                            "per domain.")
        value = value[i]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"scenario.{what} must be a positive number of tokens (or a list, one per domain), "
                        f"got {value!r}.")
    return value


def _blocks(cache: TokenCache, split: str, seq_len: int, tokens: int, what: str, name: str, fix: str,
            seed: int | None) -> TokenBlocks:
    """`tokens // seq_len` blocks of the split: the first ones (seed None) or a seeded sample."""
    every = TokenBlocks.packed(cache.file(split), cache.dtype, seq_len, tokens=cache.tokens(split))
    want = tokens // seq_len
    if want < 1:
        raise UserError(f"scenario.{what}={tokens} is less than one block of scenario.seq_len={seq_len} tokens; "
                        "raise it.")
    if want > len(every):
        raise UserError(f"scenario.{what}={tokens} is more than the {every.tokens} {split} tokens that {name} holds "
                        f"in blocks of {seq_len}; {fix}")
    if seed is None:
        return every.subset(torch.arange(want))
    pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:want]
    return every.subset(pick.sort().values)


def token_stream(domains: Sequence[dict], tokenizer: str = "tiny", cache_dir: str = "data/token_cache",
                 model_cache_dir: str = "data/models", seq_len: int = 256,
                 tokens_per_experience: int | Sequence[int] = 65536, eval_tokens: int = 8192,
                 eval_fraction: float = 0.05, data_seed: int = 0, held_out: Sequence[dict] | None = None,
                 retention: dict | None = None, name: str = "token_stream") -> Stream:
    """One experience per domain (`{name, corpus}`, the corpus a `scenarios.corpora` source), in
    the order given; `held_out` domains are scored, never trained on. `tokenizer` is the model's
    `pretrained`. The token arrays are cached under `cache_dir`. `retention` (the instruction
    streams' probe: general prompts answered before training and re-asked after each experience)
    needs a tokenizer with a chat template; null leaves it out."""
    if not domains:
        raise UserError("scenario.domains is empty; list the corpora to learn in order, e.g. "
                        "[{name: en, corpus: {_target_: scenarios.corpora.debian_man_pages, package: manpages}}].")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"scenario.seq_len must be an integer of at least 2, got {seq_len!r}.")
    if not 0 < eval_fraction < 1:
        raise UserError(f"scenario.eval_fraction must be a fraction in (0, 1), got {eval_fraction!r}.")
    for d in list(domains) + list(held_out or []):
        if not isinstance(d, dict) or "corpus" not in d or "name" not in d:
            raise UserError(f"Each domain is {{name: ..., corpus: {{_target_: scenarios.corpora.<source>, ...}}}}, "
                            f"got {d!r}.")
    from cl.models.causal_lm import load_tokenizer

    tok = load_tokenizer(tokenizer, model_cache_dir)
    names = [d["name"] for d in domains]
    if len(set(names)) < len(names):
        raise UserError(f"scenario.domains has repeated names ({', '.join(names)}); name each domain once.")

    def cached(d):
        return build_cache(d["corpus"], tok, tokenizer, cache_dir, eval_fraction, data_seed, d["name"])

    experiences, about = [], []
    for i, d in enumerate(domains):
        cache = cached(d)
        budget = _budget(tokens_per_experience, i, "tokens_per_experience")
        test = _budget(eval_tokens, i, "eval_tokens")
        train = _blocks(cache, "train", seq_len, budget, "tokens_per_experience", d["name"],
                        "lower it, or give the domain more text.", data_seed * 1000 + i)
        held = _blocks(cache, "eval", seq_len, test, "eval_tokens", d["name"],
                       "lower it, or raise scenario.eval_fraction.", None)
        experiences.append(Experience(i, [i], train.with_task(i), held.with_task(i), i, name=d["name"]))
        about.append({"name": d["name"], **cache.meta["about"], "cache": cache.folder.name,
                      "corpus_tokens": cache.meta["tokens"], "train_tokens": train.tokens, "eval_tokens": held.tokens})
    extra = {}
    for d in held_out or []:
        cache = cached(d)
        test = eval_tokens if isinstance(eval_tokens, int) else min(eval_tokens)
        whole = TokenBlocks.packed(cache.file("train"), cache.dtype, seq_len, tokens=cache.tokens("train"))
        # never trained on: the whole corpus is held out; score its first blocks
        if test // seq_len > len(whole):
            raise UserError(f"scenario.eval_tokens={test} is more than the {whole.tokens} tokens that the held-out "
                            f"domain {d['name']} holds; lower it or give the domain more text.")
        extra[d["name"]] = whole.subset(torch.arange(test // seq_len))
        about.append({"name": d["name"], "held_out": True, **cache.meta["about"], "cache": cache.folder.name,
                      "eval_tokens": extra[d["name"]].tokens})
    probe = None
    if retention is not None:
        if tok.chat_template is None:
            raise UserError(f"scenario.retention needs a tokenizer with a chat template, and {tokenizer}'s has none; "
                            "set scenario.retention=null.")
        from scenarios.instruction import retention_prompts

        probe = retention_prompts(tok, retention)
    info = {"tokenizer": tokenizer, "seq_len": seq_len, "domains": about, "data_seed": data_seed,
            "eval_fraction": eval_fraction, "packing": f"blocks of {seq_len} next-token targets, no padding"}
    return Stream(experiences, setting="domain", name=name, num_classes=len(domains), input_shape=(seq_len,),
                  modality="tokens", held_out=extra, retention=probe, info=info)
