"""Figures written into every run folder."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_matrix(R, path: str | Path, title: str = "", initial=None) -> Path:
    """Heat map of R[i][j] (rows: after training experience i; columns: evaluated on j)."""
    R = np.asarray(R, dtype=float) * 100
    T_rows, T = R.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * T, 1.0 + 0.5 * T_rows), dpi=120)
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for i in range(T_rows):
        for j in range(T):
            ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if R[i, j] < 60 else "black")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T_rows))
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("after training experience i")
    ax.set_title(title or "accuracy (%)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
