"""Pure metric functions over the accuracy matrix.

R[i][j] is the accuracy on experience j's eval set after training experience i
(rows: training stages 0..T-1; columns: all T experiences, seen and unseen).
`sizes[j]` is the number of eval samples of experience j. `b[j]` is the
accuracy of the model before any training. Undefined values (e.g. forgetting
with a single experience) are None, written as null in results.json.
"""
from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def seen_accuracy(R: Matrix, i: int, sizes: Sequence[int] | None = None) -> float:
    """Accuracy on everything seen after stage i: over the pooled eval samples of
    experiences 0..i when `sizes` is given (accuracy on all seen classes), else the
    mean over those experiences."""
    if sizes is None:
        return _mean(R[i][: i + 1])
    n = sum(sizes[: i + 1])
    return sum(R[i][j] * sizes[j] for j in range(i + 1)) / n


def final_average_accuracy(R: Matrix) -> float:
    """Mean over experiences of the final accuracy: (1/T) Σ_j R[T-1][j]."""
    return _mean(R[-1])


def final_accuracy(R: Matrix, sizes: Sequence[int]) -> float:
    """Accuracy over all eval samples at the end ("last accuracy", A_B in PyCIL)."""
    return seen_accuracy(R, len(R) - 1, sizes)


def average_incremental_accuracy(R: Matrix, sizes: Sequence[int] | None = None) -> float:
    """Ā = (1/T) Σ_i (accuracy on all seen classes after stage i)."""
    return _mean(seen_accuracy(R, i, sizes) for i in range(len(R)))


def forgetting(R: Matrix) -> float | None:
    """Chaudhry et al.: mean over j < T-1 of max_{j<=i<T-1} R[i][j] - R[T-1][j]."""
    T = len(R)
    return _mean(max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1))


def backward_transfer(R: Matrix) -> float | None:
    """BWT (GEM) = (1/(T-1)) Σ_{j<T-1} R[T-1][j] - R[j][j]."""
    T = len(R)
    return _mean(R[T - 1][j] - R[j][j] for j in range(T - 1))


def forward_transfer(R: Matrix, b: Sequence[float]) -> float | None:
    """FWT (GEM) = (1/(T-1)) Σ_{j>=1} R[j-1][j] - b[j], b = accuracy before training."""
    T = len(R)
    return _mean(R[j - 1][j] - b[j] for j in range(1, T))


def summary(R: Matrix, sizes: Sequence[int], b: Sequence[float] | None = None) -> dict:
    """The end-of-experience metrics that go into results.json."""
    out = {
        "final_average_accuracy": final_average_accuracy(R),
        "final_accuracy": final_accuracy(R, sizes),
        "average_incremental_accuracy": average_incremental_accuracy(R, sizes),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
    }
    if b is not None:
        out["fwt"] = forward_transfer(R, b)
    return out
