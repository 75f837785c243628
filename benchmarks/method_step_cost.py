"""Per-step cost of each CNN method relative to the plain fine-tuning step on the
same model and the same batches.

Every method trains the reduced ResNet-18 (nf 20) on a CIFAR-shaped task-
incremental stream (uint8 3×32×32, batch 32) through its hooks exactly as the
engine calls them (training_step, backward, after_backward, optimizer step,
after_optimizer_step), in its second experience (so replay, masks and stored
sets are live). Methods are timed in interleaved rounds in one process, so
machine noise hits all alike; the script prints the median time per step and
its ratio to fine-tuning.

    python benchmarks/method_step_cost.py [--steps 40] [--rounds 5]

What the ratios mean: ER-ACE runs two forwards per step (stream and replay), so
AdaB²N+ER-ACE is compared with ER-ACE as well as with fine-tuning; CLR trains
only its 0.4% of parameters but still back-propagates through the frozen
network; DST pays the masking every step and a topology update every ΔT steps
(shown at ΔT = 400, the CIFAR default, and ΔT = 10).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cl.models import Classifier, ReducedResNet18
from cl.stream import TensorData
from cl.strategy import Context
from cl.transforms import crop_flip, to_float
from scenarios.datasets import ImageDataset
from scenarios.split import class_split
from strategies.adab2n import AdaB2N
from strategies.clr import CLR
from strategies.dst import DST
from strategies.finetune import Finetune
from strategies.replay import ERACE

BATCH, NF = 32, 20


def make_stream(per_class: int):
    g = torch.Generator().manual_seed(0)

    def part(k):
        y = torch.arange(10).repeat_interleave(k)
        return TensorData(torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g), y)

    data = ImageDataset("cifar_shaped", part(per_class), part(10), 10)
    return class_split(data, increment=2, setting="task", class_order_seed=0,
                       train_transform=crop_flip(32, 4), eval_transform=to_float())


def model():
    torch.manual_seed(0)
    return Classifier(lambda input_shape: ReducedResNet18(input_shape, nf=NF), input_shape=(3, 32, 32))


def sgd(params):
    return torch.optim.SGD(params, lr=0.01)


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


METHODS = {
    "finetune": lambda: Finetune(model(), sgd),
    "er_ace": lambda: ERACE(model(), sgd, mem_size=200, replay_batch_size=BATCH),
    "adab2n+er_ace": lambda: AdaB2N(model(), sgd, base=_partial(ERACE, mem_size=200, replay_batch_size=BATCH)),
    "clr": lambda: CLR(model(), adam, select="last"),
    "dst (ΔT=400)": lambda: DST(model(), adam, update_every=400, epochs=100, batch_size=BATCH),
    "dst (ΔT=10)": lambda: DST(model(), adam, update_every=10, epochs=100, batch_size=BATCH),
}


def _partial(cls, **kw):
    import functools

    return functools.partial(cls, **kw)


def prepare(name: str, stream):
    """The strategy in its second experience, with a first experience behind it."""
    s = METHODS[name]()
    gen = torch.Generator().manual_seed(1)
    s.setup(stream, Context(augment=lambda raw: stream.train_transform(raw, gen)))
    for i in (0, 1):
        exp = stream[i]
        s.before_experience(exp)
        opt, _ = s.configure_optimizer(exp)
        if i == 0:
            for batch in list(exp.train.batches(BATCH, shuffle=True, seed=0))[:3]:
                step(s, opt, batch)
            s.after_epoch(0)
            s.after_experience(exp)
    s.model.train()
    return s, opt


def step(s, opt, batch):
    batch.x = s.augment(batch.raw)
    loss = s.training_step(batch)
    loss.backward()
    s.after_backward()
    opt.step()
    s.after_optimizer_step()
    opt.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    stream = make_stream(per_class=(args.steps + 2) * BATCH // 2 + 1)
    prepared = {name: prepare(name, stream) for name in METHODS}
    batches = list(stream[1].train.batches(BATCH, shuffle=True, seed=1))[: args.steps]
    for name, (s, opt) in prepared.items():  # warm-up
        for b in batches[:3]:
            step(s, opt, b)
    times = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, (s, opt) in prepared.items():
            start = time.perf_counter()
            for b in batches:
                step(s, opt, b)
            times[name].append((time.perf_counter() - start) / len(batches))
    base = statistics.median(times["finetune"])
    print(f"per-step cost on the reduced ResNet-18 (nf {NF}), batch {BATCH}, {args.steps} steps x {args.rounds} "
          f"interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'method':<16} {'ms/step':>8} {'/ finetune':>11}")
    for name in METHODS:
        t = statistics.median(times[name])
        print(f"{name:<16} {t * 1e3:8.1f} {t / base:11.2f}")
    ratio = statistics.median(times["adab2n+er_ace"]) / statistics.median(times["er_ace"])
    print(f"AdaB²N overhead over its base: adab2n+er_ace / er_ace = {ratio:.2f}")


if __name__ == "__main__":
    main()
