"""How the engine scales with the length of the stream, and what a replay buffer costs in memory.

1. Per-iteration overhead at T = 10 versus T = 100 tasks. ER with a tiny MLP on a
   synthetic class-incremental stream (8×8 uint8 images, 2 classes and 64 training
   images per task, batch 16: 4 iterations per task), continual evaluation of every
   seen task every 2 iterations (16 samples each), the full accuracy matrix at each
   task end, a checkpoint at each task end. The model is tiny on purpose, so the
   times are the engine's and the evaluator's, not the network's. Printed:
   - training time per iteration (wall time outside evaluation), T=100 / T=10:
     goal no worse than linear in the tasks seen, ideally ≈ 1;
   - continual evaluation time per iteration, T=100 / T=10, next to the ratio of the
     mean number of tasks seen (each evaluation covers every seen task, so linear
     growth is the protocol's own cost): goal ≤ that ratio (no worse than linear);
   - the full matrix evaluations per iteration (T tasks after each of T tasks).
2. Replay buffer memory: the reservoir buffer's bytes over the raw uint8 bytes of the
   samples it stores (goal ≤ 1.1), for CIFAR- and MNIST-shaped images, and with DER++'s
   stored logits for information.

    python benchmarks/scaling.py [--tasks 10 100] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cl import checkpoint, engine, runtime
from cl.evaluation import Evaluation, Evaluator
from cl.loggers import JsonlLogger, RunLogger
from cl.models import MLP, Classifier
from cl.stream import TensorData
from cl.transforms import to_float
from scenarios.datasets import ImageDataset
from scenarios.split import class_split
from strategies.buffer import ReservoirBuffer
from strategies.replay import ER

SEED, BATCH, PER_CLASS, EVAL_PER_CLASS, EVERY, SUBSET = 0, 16, 32, 8, 2, 16


def make_stream(tasks: int):
    g = torch.Generator().manual_seed(1)
    classes = 2 * tasks

    def part(k):
        y = torch.arange(classes).repeat_interleave(k)
        return TensorData(torch.randint(0, 256, (len(y), 1, 8, 8), dtype=torch.uint8, generator=g), y)

    data = ImageDataset("synthetic", part(PER_CLASS), part(EVAL_PER_CLASS), classes)
    return class_split(data, increment=2, class_order_seed=SEED, train_transform=to_float(), eval_transform=to_float())


def run(tasks: int, folder: Path) -> dict:
    stream = make_stream(tasks)
    runtime.seed_everything(SEED, device=torch.device("cpu"))
    model = Classifier(lambda input_shape: MLP(input_shape, hidden=[32]), input_shape=(1, 8, 8))
    strategy = ER(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mem_size=200, seed=SEED)
    jsonl = JsonlLogger(folder / "metrics.jsonl", truncate_at=0)
    log = RunLogger([jsonl])
    evaluator = Evaluator(stream, strategy, Evaluation(every=EVERY, subset=SUBSET, batch_size=512), log, seed=SEED, device="cpu")
    trainer = engine.Trainer(epochs=1, batch_size=BATCH, device="cpu", log_every=10)
    start = time.perf_counter()
    pos = engine.train(stream, strategy, evaluator, log, trainer, checkpoint.Checkpointer(folder / "ckpt", jsonl=jsonl), SEED)
    wall = time.perf_counter() - start
    log.close()
    its = pos.iteration
    seen = [min(it // 4 + 1, tasks) for it in range(1, its + 1) if it % EVERY == 0]  # tasks seen at each evaluation
    return {"iterations": its, "train": (wall - evaluator.eval_seconds - evaluator.matrix_seconds) / its,
            "continual": evaluator.eval_seconds / its, "matrix": evaluator.matrix_seconds / its,
            "mean_seen": sum(seen) / max(len(seen), 1)}


def buffer_ratio(shape, logits: int | None = None, size: int = 2000) -> float:
    buf = ReservoirBuffer(size, seed=0, logit_width=logits)
    g = torch.Generator().manual_seed(0)
    for _ in range(2 * size // 100):
        x = torch.randint(0, 256, (100, *shape), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (100,), generator=g)
        buf.add(x, y, torch.zeros_like(y), logits=torch.randn(100, logits) if logits else None)
    raw = len(buf) * torch.Size(shape).numel()  # uint8: one byte per value
    return buf.nbytes() / raw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs=2, default=[10, 100])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    small, large = args.tasks
    results = {small: [], large: []}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warmup").mkdir()
        run(small, Path(tmp) / "warmup")  # first-use costs (lazy imports, allocator) out of the timings
        for r in range(args.repeats):  # interleaved, so machine noise hits both alike
            for t in (small, large) if r % 2 == 0 else (large, small):
                folder = Path(tmp) / f"T{t}_{r}"
                folder.mkdir()
                results[t].append(run(t, folder))

    def med(t, key):
        return statistics.median(res[key] for res in results[t])

    print(f"ER, MLP [32], batch {BATCH}, 4 iterations per task, continual evaluation every {EVERY} iterations "
          f"({SUBSET} samples per seen task), {args.repeats} interleaved repeats; times per iteration (ms):")
    for t in (small, large):
        print(f"  T={t:4d}: {results[t][0]['iterations']:5d} iterations | train {1e3 * med(t, 'train'):.3f} | "
              f"continual eval {1e3 * med(t, 'continual'):.3f} (mean tasks seen {med(t, 'mean_seen'):.1f}) | "
              f"matrix eval {1e3 * med(t, 'matrix'):.3f}")
    seen_ratio = med(large, "mean_seen") / med(small, "mean_seen")
    print(f"training per iteration, T={large} / T={small} = {med(large, 'train') / med(small, 'train'):.2f}   "
          f"(goal ≤ {seen_ratio:.2f}, linear; 1 is ideal: per-task costs such as the checkpoint of the growing "
          "accuracy matrix are spread over 4 iterations)")
    print(f"continual evaluation per iteration, T={large} / T={small} = "
          f"{med(large, 'continual') / med(small, 'continual'):.2f}   (goal ≤ {seen_ratio:.2f}, the ratio of tasks seen: linear)")
    print(f"continual evaluation per seen task per evaluation, T={large} / T={small} = "
          f"{(med(large, 'continual') / med(large, 'mean_seen')) / (med(small, 'continual') / med(small, 'mean_seen')):.2f}"
          "   (goal ≈ 1)")
    print(f"matrix evaluation per iteration, T={large} / T={small} = {med(large, 'matrix') / med(small, 'matrix'):.2f}"
          f"   (T tasks at each task end: linear in T, {large / small:.0f})")
    print("replay buffer bytes / raw uint8 bytes of the stored samples (goal ≤ 1.1):")
    print(f"  CIFAR-shaped 3×32×32: {buffer_ratio((3, 32, 32)):.4f}")
    print(f"  MNIST-shaped 1×28×28: {buffer_ratio((1, 28, 28)):.4f}")
    print(f"  CIFAR-shaped with DER++ logits over 100 classes (float32, for information): "
          f"{buffer_ratio((3, 32, 32), logits=100):.4f}")


if __name__ == "__main__":
    main()
