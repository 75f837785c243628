"""Figures written into every run folder. matplotlib is imported at the first figure, at a
run's end: importing it (0.4 s) would delay every run's first training step."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.cache
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_matrix(R, path: str | Path, title: str = "", initial=None, loss: bool = False) -> Path:
    """Heat map of R[i][j] (rows: after training experience i; columns: evaluated on j): accuracy
    in percent, or (`loss`) a loss matrix, darker where lower."""
    plt = pyplot()
    R = np.asarray(R, dtype=float) * (1 if loss else 100)
    T_rows, T = R.shape
    fig, ax = plt.subplots(figsize=(1.0 + (0.75 if loss else 0.55) * T, 1.0 + 0.5 * T_rows), dpi=120)
    low, high = (float(R.min()), float(R.max())) if loss else (0, 100)
    im = ax.imshow(R, vmin=low, vmax=high, cmap="viridis_r" if loss else "viridis")
    for i in range(T_rows):
        for j in range(T):
            light = (R[i, j] > low + 0.6 * (high - low)) if loss else R[i, j] < 60
            ax.text(j, i, f"{R[i, j]:.2f}" if loss else f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if light else "black")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T_rows))
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("after training experience i")
    ax.set_title(title or ("loss" if loss else "accuracy (%)"), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def stability_gap(trace, ends, path: str | Path, title: str = "", loss: bool = False,
                  held_out: dict | None = None, names: list[str] | None = None) -> Path:
    """Accuracy on each experience against iteration (continual evaluation), with the
    experience boundaries marked: the dips right after a boundary are the stability gap. With
    `loss`, the loss (its peaks are the gap); `held_out` traces (never trained on) dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
    cmap = plt.get_cmap("tab10" if len(trace) <= 10 else "tab20")
    scale = 1 if loss else 100
    for j, evals in sorted(trace.items()):
        its, accs = zip(*evals)
        label = f"experience {j}" + (f" ({names[j]})" if names and j < len(names) and names[j] else "")
        ax.plot(its, [scale * a for a in accs], lw=1.0, color=cmap(j % cmap.N), label=label)
    for name, evals in (held_out or {}).items():
        if evals:
            its, values = zip(*evals)
            ax.plot(its, [scale * v for v in values], lw=1.0, ls="--", color="black", label=f"{name} (held out)")
    for n in ends[:-1]:
        ax.axvline(n, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)" if loss else "accuracy (%)")
    if not loss:
        ax.set_ylim(-2, 102)
    ax.set_title(title or "continual evaluation", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(trace) + len(held_out or {}), 5), loc="upper left" if loss else "lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
