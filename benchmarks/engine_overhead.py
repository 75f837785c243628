"""Engine overhead: the same ER work through `cl` and through a plain PyTorch loop.

Both sides train the reduced ResNet-18 with ER (reservoir buffer, replay batch =
stream batch) on a CIFAR-shaped class-incremental stream (uint8 32×32×3 images,
5 experiences × 2 classes), with random-crop + flip augmentation on the device,
an evaluation of every experience before training and at each experience end,
and a checkpoint at each experience end. They draw every random number from the
same generators, so they process identical batches; the script checks that by
asserting that the final weights are bitwise equal.

Prints the wall-time ratio cl / plain (goal: <= 1.05), from runs interleaved in
one process so that machine noise hits both sides alike.

    python benchmarks/engine_overhead.py [--per-class 300] [--repeats 3]
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
from cl.models import Classifier, ReducedResNet18
from cl.stream import TensorData
from cl.transforms import crop_flip, to_float
from scenarios.datasets import ImageDataset
from scenarios.split import class_split
from strategies.buffer import ReservoirBuffer
from strategies.replay import ER

SEED, LR, BATCH, MEM, NF = 0, 0.05, 32, 500, 20
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def make_stream(per_class: int):
    g = torch.Generator().manual_seed(123)

    def part(k):
        y = torch.arange(10).repeat_interleave(k)
        return TensorData(torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g), y)

    data = ImageDataset("cifar_shaped", part(per_class), part(max(per_class // 5, 1)), 10)
    return class_split(data, increment=2, class_order_seed=SEED,
                       train_transform=crop_flip(32, 4, mean=MEAN, std=STD), eval_transform=to_float(MEAN, STD))


def run_cl(stream, folder: Path) -> torch.nn.Module:
    runtime.seed_everything(SEED)
    model = Classifier(lambda input_shape: ReducedResNet18(input_shape, nf=NF), input_shape=(3, 32, 32))
    strategy = ER(model, optimizer=lambda p: torch.optim.SGD(p, lr=LR), mem_size=MEM, replay_batch_size=BATCH, seed=SEED)
    jsonl = JsonlLogger(folder / "metrics.jsonl")
    log = RunLogger([jsonl])
    evaluator = Evaluator(stream, strategy, Evaluation(every=0, batch_size=512), log, seed=SEED, device="cpu")
    trainer = engine.Trainer(epochs=1, batch_size=BATCH, device="cpu", log_every=10)
    engine.train(stream, strategy, evaluator, log, trainer, checkpoint.Checkpointer(folder / "ckpt", jsonl=jsonl), SEED)
    log.close()
    return model


def run_plain(stream, folder: Path) -> torch.nn.Module:
    """What a researcher would write by hand for the same experiment."""
    torch.manual_seed(SEED)
    backbone = ReducedResNet18((3, 32, 32), nf=NF)
    head = None
    train_tf, eval_tf = stream.train_transform, stream.eval_transform
    aug = torch.Generator().manual_seed(SEED + 1)
    buffer = ReservoirBuffer(MEM, seed=SEED, logit_width=10)

    def forward(x):
        return head(backbone(x)) if head is not None else backbone(x).new_zeros(len(x), 0)

    def evaluate():
        backbone.eval()
        if head is not None:
            head.eval()
        accs = []
        with torch.inference_mode():
            for e in stream:
                correct = 0
                for s in range(0, len(e.eval), 512):
                    x, y = e.eval.x[s:s + 512], e.eval.y[s:s + 512]
                    logits = forward(eval_tf(x))
                    correct += int((logits.argmax(1) == y).sum()) if logits.shape[1] else 0
                accs.append(correct / len(e.eval))
        backbone.train()
        if head is not None:
            head.train()
        return accs

    evaluate()
    for i, exp in enumerate(stream):
        n_classes = 2 * (i + 1)
        new = torch.nn.Linear(backbone.num_features, n_classes)
        if head is not None:
            with torch.no_grad():
                new.weight[: head.out_features].copy_(head.weight)
                new.bias[: head.out_features].copy_(head.bias)
        head = new
        opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=LR)
        perm = torch.randperm(len(exp.train), generator=torch.Generator().manual_seed(runtime.epoch_seed(SEED, i, 0)))
        for s in range(0, len(perm), BATCH):
            idx = perm[s:s + BATCH]
            raw, y = exp.train.x[idx], exp.train.y[idx]
            x = train_tf(raw, aug)
            if len(buffer):
                r = buffer.sample(BATCH)
                x, y_all = torch.cat([x, train_tf(r["x"], aug)]), torch.cat([y, r["y"]])
            else:
                y_all = y
            loss = F.cross_entropy(forward(x), y_all)
            buffer.add(raw, y, exp.train.t[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        evaluate()
        torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(), "buffer": buffer.state_dict()},
                   folder / "plain.pt")
    return torch.nn.ModuleDict({"backbone": backbone, "head": head})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=300, help="train images per class")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    stream = make_stream(args.per_class)
    times = {"cl": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, fn in (("cl", run_cl), ("plain", run_plain)) if r % 2 == 0 else (("plain", run_plain), ("cl", run_cl)):
                folder = Path(tmp) / f"{name}{r}"
                folder.mkdir()
                start = time.perf_counter()
                model = fn(stream, folder)
                times[name].append(time.perf_counter() - start)
                if name == "cl":
                    cl_params = [p.detach().clone() for p in model.parameters()]
                else:
                    plain_params = [p.detach().clone() for p in model.parameters()]
            same = all(torch.equal(a, b) for a, b in zip(cl_params, plain_params))
            assert same, "cl and the plain loop did not process identical batches"
    iters = sum(-(-len(e.train) // BATCH) for e in stream)
    ratio = statistics.median(times["cl"]) / statistics.median(times["plain"])
    print(f"ER, reduced ResNet-18 (nf={NF}), {len(stream)} experiences, {iters} iterations of batch {BATCH}+{BATCH} replay, "
          f"{args.repeats} interleaved repeats; identical final weights: yes")
    print("per-repeat ratio cl/plain: " + ", ".join(f"{a / b:.3f}" for a, b in zip(times["cl"], times["plain"])))
    print(f"engine overhead (median wall time) cl / plain = {ratio:.3f}   (goal <= 1.05)")


if __name__ == "__main__":
    main()
