"""Continual-evaluation overhead.

1. The cost of one continual evaluation (the evaluator on the subsets of all seen
   experiences, logging included) divided by the raw inference cost of the same
   samples through the same model in a plain loop (eval mode, inference_mode,
   same batch size, same eval transform, argmax). Goal: <= 1.1.
2. The eval share (continual-evaluation wall time / run wall time) of an ER run
   with evaluation.every = 1, 10 and 100.

    python benchmarks/eval_overhead.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cl import checkpoint, engine
from cl.evaluation import Evaluation, Evaluator
from cl.runtime import eval_mode
from cl.loggers import JsonlLogger, RunLogger
from cl.models import Classifier, ReducedResNet18
from cl.stream import TensorData
from cl.transforms import crop_flip, to_float
from scenarios.datasets import ImageDataset
from scenarios.split import class_split
from strategies.replay import ER

MEAN, STD = [0.5] * 3, [0.25] * 3
SUBSET, EVAL_BATCH = 1000, 512


def make_stream(train_per_class: int, test_per_class: int):
    g = torch.Generator().manual_seed(0)

    def part(k):
        y = torch.arange(10).repeat_interleave(k)
        return TensorData(torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g), y)

    data = ImageDataset("cifar_shaped", part(train_per_class), part(test_per_class), 10)
    return class_split(data, increment=2, class_order_seed=0, train_transform=crop_flip(32, 4, mean=MEAN, std=STD),
                       eval_transform=to_float(MEAN, STD))


def model_and_strategy():
    torch.manual_seed(0)
    model = Classifier(lambda input_shape: ReducedResNet18(input_shape, nf=20), input_shape=(3, 32, 32))
    model.grow(10)
    return model, ER(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), mem_size=500, seed=0)


def plain_inference(model, datasets, transform) -> int:
    correct = 0
    with eval_mode(model):
        for d in datasets:
            for s in range(0, len(d), EVAL_BATCH):
                logits = model(transform(d.x[s:s + EVAL_BATCH]))
                correct += int((logits.argmax(1) == d.y[s:s + EVAL_BATCH]).sum())
    return correct


def per_evaluation_ratio(repeats: int) -> tuple[float, int]:
    stream = make_stream(10, 600)  # 1200 test images per experience, subset 1000
    model, strategy = model_and_strategy()
    with tempfile.TemporaryDirectory() as tmp:
        log = RunLogger([JsonlLogger(Path(tmp) / "metrics.jsonl")])
        ev = Evaluator(stream, strategy, Evaluation(every=1, subset=SUBSET, batch_size=EVAL_BATCH), log)
        seen = list(range(len(stream)))
        datasets = [ev.subsets[j] if ev.subsets[j] is not None else ev.data[j] for j in seen]
        t_cl, t_plain = [], []
        for r in range(repeats + 1):
            a = time.perf_counter()
            ev._evaluate(seen, False, r, len(stream) - 1)
            b = time.perf_counter()
            plain_inference(model, datasets, stream.eval_transform)
            c = time.perf_counter()
            if r:  # the first round warms up
                t_cl.append(b - a)
                t_plain.append(c - b)
        log.close()
    return statistics.median(t_cl) / statistics.median(t_plain), sum(len(d) for d in datasets)


def eval_share(every: int) -> tuple[float, int]:
    stream = make_stream(200, 100)
    model, strategy = model_and_strategy()
    model.head.fc = None  # start with an empty head, as a real run does
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = JsonlLogger(Path(tmp) / "metrics.jsonl")
        log = RunLogger([jsonl])
        ev = Evaluator(stream, strategy, Evaluation(every=every, subset=SUBSET, batch_size=EVAL_BATCH), log)
        engine.train(stream, strategy, ev, log, engine.Trainer(epochs=3, batch_size=32, device="cpu"),
                     checkpoint.Checkpointer(Path(tmp) / "ckpt", jsonl=jsonl), seed=0)
        log.close()
    return ev.eval_share, sum(len(t) for t in ev.trace_iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    ratio, n = per_evaluation_ratio(args.repeats)
    print(f"one continual evaluation of 5 seen experiences ({n} samples, reduced ResNet-18 nf=20, batch {EVAL_BATCH}), "
          f"median of {args.repeats}:")
    print(f"  cl evaluator / plain inference loop = {ratio:.3f}   (goal <= 1.1)")
    print("eval share of an ER run (5 experiences x 2 classes, 400 train images each, 3 epochs, batch 32, "
          "subset = the 200 test images of each seen experience):")
    for every in (1, 10, 100):
        share, evals = eval_share(every)
        print(f"  evaluation.every={every:<3}  eval share = {100 * share:5.1f}%   ({evals} experience evaluations)")


if __name__ == "__main__":
    main()
