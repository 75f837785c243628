"""Lazy against eager self-refined retrieval in MOS, on the same ViT.

For T = 5, 10 and 20 tasks, a MOS strategy on a ViT (timm vit_tiny widths, 12
blocks, 32×32 inputs in 4×4 patches) gets T distinct stored adapters, prototypes
and Gaussian statistics (a few real steps per task, then a perturbation so the
adapters differ). The same evaluation batches then go through `predict` with
`retrieval=eager` (every adapter for every sample, as the official code) and
`retrieval=lazy` (only the adapters the refinement visits, batched by guess),
interleaved in one process. The script asserts identical predictions and prints
samples per second for each and the ratio lazy / eager (goal: >= 3 at T = 20).

    python benchmarks/mos_retrieval.py [--tasks 5 10 20] [--samples 256] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cl.models import Classifier, TimmBackbone
from cl.stream import Batch, TensorData
from cl.strategy import Context
from cl.transforms import to_float
from scenarios.datasets import ImageDataset
from scenarios.split import class_split
from strategies.mos import MOS

VIT = dict(img_size=32, patch_size=4, depth=12, embed_dim=192, num_heads=3)


def build(tasks: int, per_class: int, eval_per_class: int):
    g = torch.Generator().manual_seed(0)

    def part(k):
        y = torch.arange(2 * tasks).repeat_interleave(k)
        x = (torch.rand(len(y), 3, 32, 32, generator=g) * 100 + (y[:, None, None, None] * 37 % 150)).to(torch.uint8)
        return TensorData(x, y)

    data = ImageDataset("toy", part(per_class), part(eval_per_class), 2 * tasks)
    stream = class_split(data, increment=2, class_order_seed=0, train_transform=to_float(), eval_transform=to_float())
    torch.manual_seed(0)
    model = Classifier(lambda input_shape: TimmBackbone("vit_tiny_patch16_224", input_shape=input_shape, **VIT),
                       input_shape=(3, 32, 32))
    mos = MOS(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), batch_size=8, ca_epochs=1)
    mos.setup(stream, Context(augment=lambda raw: raw.float() / 255))
    for i in range(tasks):
        exp = stream[i]
        mos.before_experience(exp)
        opt, _ = mos.configure_optimizer(exp)
        mos.model.train()
        for batch in list(exp.train.batches(8, shuffle=True, seed=i))[:2]:
            batch.x = mos.augment(batch.raw)
            mos.training_step(batch).backward()
            opt.step()
            mos.after_optimizer_step()
            opt.zero_grad()
        with torch.no_grad():
            for p in mos.net.adapter.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        mos.after_experience(exp)
    mos.model.eval()
    return mos, stream


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"ViT depth {VIT['depth']}, width {VIT['embed_dim']}, {(VIT['img_size'] // VIT['patch_size']) ** 2} patches; "
          f"{args.samples} samples per measurement, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'T':>3} {'eager samples/s':>16} {'lazy samples/s':>15} {'lazy/eager':>11} {'adapters/sample (lazy)':>23}")
    for tasks in args.tasks:
        per_eval = max(args.samples // (2 * tasks), 1)
        mos, stream = build(tasks, per_class=6, eval_per_class=per_eval)
        eval_data = TensorData.concat([stream[j].eval for j in range(tasks)])
        batch = Batch(x=eval_data.x.float() / 255, y=eval_data.y, t=torch.full_like(eval_data.y, -1))
        times = {"eager": [], "lazy": []}
        outputs = {}
        calls = []
        original = mos.net.features
        mos.net.features = lambda x, *a, **k: (calls.append(len(x)), original(x, *a, **k))[1]
        for _ in range(args.rounds):
            for mode in ("eager", "lazy"):
                mos.retrieval = mode
                calls.clear()
                start = time.perf_counter()
                outputs[mode] = mos.predict(batch)
                times[mode].append(time.perf_counter() - start)
                if mode == "lazy":
                    visited = sum(calls) / len(batch.y)
        mos.net.features = original
        assert torch.equal(outputs["lazy"].argmax(1), outputs["eager"].argmax(1)), "predictions differ"
        eager, lazy = statistics.median(times["eager"]), statistics.median(times["lazy"])
        n = len(batch.y)
        print(f"{tasks:>3} {n / eager:16.1f} {n / lazy:15.1f} {eager / lazy:11.2f} {visited:23.2f}")


if __name__ == "__main__":
    main()
