"""Continual pre-training throughput: training tokens/s through `cl` against a plain PyTorch loop.

Both sides continually pre-train the same causal LM (SmolLM2-135M offline, or the tiny test
Llama) on the same packed blocks of the man-page stream English -> German -> French
(`scenarios.token_stream`, read from the memory-mapped token cache): AdamW, a warm-up + cosine
schedule restarted per experience, gradient clipping at 1.0, one epoch per experience, the
same shuffles, and a checkpoint at each experience end. The script checks that both processed
identical batches by asserting that the final weights are bitwise equal.

`cl` also evaluates (the held-out loss of every domain before training and at each experience
end); its training time is its wall time minus that evaluation time, which is printed as
evaluation tokens/s. Prints the training tokens/s of each side and the ratio cl / plain
(goal: >= 0.95), from runs interleaved in one process so that machine noise hits both alike.

    python benchmarks/cpt_throughput.py [--model smollm2|tiny] [--tokens 4096] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cl import checkpoint, engine, runtime
from cl.evaluation import Evaluation, Evaluator
from cl.loggers import JsonlLogger, RunLogger
from cl.models import CausalLM
from cl.schedules import WarmupCosine
from cl.strategy import Plan
from scenarios.corpora import debian_man_pages
from scenarios.token_stream import token_stream
from strategies.finetune import Finetune

SEED, LR, BATCH, SEQ = 0, 1e-4, 4, 256


def make_stream(model: str, tokens: int, cache: Path):
    domains = [{"name": n, "corpus": debian_man_pages(p, max_documents=200)}
               for n, p in (("en", "manpages"), ("de", "manpages-de"), ("fr", "manpages-fr"))]
    return token_stream(domains, tokenizer=model, cache_dir=cache / "tokens", model_cache_dir="data/models",
                        seq_len=SEQ, tokens_per_experience=tokens, eval_tokens=2 * SEQ, eval_fraction=0.05)


def optimizer(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, betas=(0.9, 0.95))


def schedule(opt):
    return WarmupCosine(opt, warmup=0.1, min_ratio=0.1)


def run_cl(stream, model_name: str, folder: Path) -> tuple[torch.nn.Module, float, float]:
    """-> (model, training seconds, evaluation seconds)"""
    runtime.seed_everything(SEED)
    model = CausalLM(model_name, cache_dir="data/models")
    strategy = Finetune(model, optimizer=optimizer, scheduler=schedule)
    jsonl = JsonlLogger(folder / "metrics.jsonl")
    log = RunLogger([jsonl])
    evaluator = Evaluator(stream, strategy, Evaluation(every=0, batch_size=BATCH), log, seed=SEED, device="cpu")
    trainer = engine.Trainer(epochs=1, batch_size=BATCH, device="cpu", log_every=10, clip_grad_norm=1.0)
    start = time.perf_counter()
    engine.train(stream, strategy, evaluator, log, trainer, checkpoint.Checkpointer(folder / "ckpt", jsonl=jsonl), SEED)
    wall = time.perf_counter() - start
    log.close()
    return model, wall - evaluator.matrix_seconds, evaluator.matrix_seconds


def run_plain(stream, model_name: str, folder: Path) -> tuple[torch.nn.Module, float, float]:
    """What a researcher would write by hand: the same batches, optimizer, schedule and clipping."""
    runtime.seed_everything(SEED)
    model = CausalLM(model_name, cache_dir="data/models")
    lm = model.lm
    lm.train()
    start = time.perf_counter()
    for i, exp in enumerate(stream):
        data = exp.train
        steps = data.num_batches(BATCH)
        opt = optimizer([p for p in model.parameters() if p.requires_grad])
        sched = schedule(opt)
        sched.start(Plan(1, BATCH, steps, 1, i, len(stream)))
        for batch in data.batches(BATCH, shuffle=True, seed=runtime.epoch_seed(SEED, i, 0)):
            logits = lm(input_ids=batch.x, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, folder / "plain.pt")
    return model, time.perf_counter() - start, 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096, help="training tokens per experience")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stream = make_stream(args.model, args.tokens, Path(tmp))
        train_tokens = sum(e.train.tokens for e in stream)
        eval_tokens = sum(e.eval.tokens for e in stream) * (len(stream) + 1)  # before training and after each
        times = {"cl": [], "plain": []}
        evaluating = []
        for r in range(args.repeats):
            order = (("cl", run_cl), ("plain", run_plain)) if r % 2 == 0 else (("plain", run_plain), ("cl", run_cl))
            weights = {}
            for name, fn in order:
                folder = Path(tmp) / f"{name}{r}"
                folder.mkdir()
                model, training, evaluation = fn(stream, args.model, folder)
                times[name].append(training)
                if name == "cl":
                    evaluating.append(evaluation)
                weights[name] = [p.detach().clone() for p in model.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(weights["cl"], weights["plain"])), \
                "cl and the plain loop did not process identical batches"
    cl, plain = statistics.median(times["cl"]), statistics.median(times["plain"])
    print(f"{args.model}: {len(stream)} experiences x {args.tokens} training tokens (blocks of {SEQ}, batch {BATCH}); "
          f"final weights bitwise equal on both sides")
    print(f"training tokens/s   cl {train_tokens / cl:9.1f}   plain loop {train_tokens / plain:9.1f}   "
          f"(median of {args.repeats}; cl's evaluation time excluded)")
    print(f"ratio cl / plain loop (throughput): {plain / cl:.3f}   goal >= 0.95")
    print(f"evaluation tokens/s (held-out loss, inference): {eval_tokens / statistics.median(evaluating):.1f}")


if __name__ == "__main__":
    main()
