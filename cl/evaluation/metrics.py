"""Pure metric functions over the accuracy matrix and the continual-evaluation trace.

Accuracy matrix: R[i][j] is the accuracy on experience j's eval set after
training experience i (rows: stages 0..T-1; columns: all T experiences, seen and
unseen). `sizes[j]` is the number of eval samples of experience j; `b[j]` the
accuracy of the model before any training.

Trace (continual evaluation, De Lange et al. 2023): `trace[j]` is the list of
(iteration, accuracy) of every evaluation of experience j, in order.
`ends[k]` is the iteration at which experience k's training ended (n_k) and
`starts[k]` the iteration at which it began. Windows (WF^h, WP^h) are counted in
evaluations, not iterations.

Undefined values (e.g. forgetting with a single experience) are None, written
as null in results.json.

Lower-is-better scores (a token stream's loss matrix L[i][j]) get the same metrics under names
that say so (`loss_summary`, `loss_stability_summary`): each is the accuracy form on -L, turned
back into a loss where it is a level, so `loss_forgetting` is the final increase over the lowest
loss reached earlier, `max_loss` the worst loss an old domain reached after it was learned (the
stability gap's depth, min-ACC's counterpart), `loss_bwt` the mean decrease of old domains' losses.
"""
from __future__ import annotations

from collections import deque
from typing import Mapping, Sequence

from cl.errors import UserError

Matrix = Sequence[Sequence[float]]
Trace = Mapping[int, Sequence[tuple[int, float]]]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ---- accuracy matrix ------------------------------------------------------------------------

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


# ---- continual-evaluation trace -------------------------------------------------------------

def min_acc(trace: Trace, ends: Sequence[int]) -> float | None:
    """min-ACC = (1/(T-1)) Σ_{k<T-1} min over evaluations of k at iterations n_k < t <= n_{T-1}:
    the worst accuracy each finished experience fell to while later ones were learned.
    Experiences with no evaluation after their end are left out."""
    T = len(ends)
    mins = []
    for k in range(T - 1):
        after = [a for it, a in trace.get(k, ()) if ends[k] < it <= ends[-1]]
        mins.append(min(after) if after else None)
    return _mean(mins)


def wc_acc(trace: Trace, ends: Sequence[int]) -> float | None:
    """WC-ACC at the final iteration = (1/T)·A(E_T, f_final) + (1 - 1/T)·min-ACC, with
    A(E_T, f_final) the last evaluation of the last experience."""
    T = len(ends)
    last = [a for it, a in trace.get(T - 1, ()) if it <= ends[-1]]
    if not last:
        return None
    if T == 1:
        return last[-1]
    m = min_acc(trace, ends)
    return None if m is None else last[-1] / T + (1 - 1 / T) * m


def _window_extreme(accs: Sequence[float], h: int, drop: bool) -> float:
    """max over evaluations j of (max [drop] or min [gain] of the h evaluations ending at j)
    compared with A_j, i.e. the largest drop (or gain) within any h consecutive evaluations."""
    best = 0.0
    window: deque[int] = deque()  # indices, monotone in value
    for j, a in enumerate(accs):
        while window and window[0] <= j - h:
            window.popleft()
        while window and ((accs[window[-1]] <= a) if drop else (accs[window[-1]] >= a)):
            window.pop()
        window.append(j)
        ref = accs[window[0]]
        best = max(best, (ref - a) if drop else (a - ref))
    return best


def windowed_forgetting(trace: Trace, h: int) -> float | None:
    """WF^h: per experience, the largest accuracy drop within any h consecutive evaluations
    (max over windows of max_{i<=j} A_i - A_j); averaged over the evaluated experiences."""
    return _mean(_window_extreme([a for _, a in evals], h, True) for evals in trace.values() if evals)


def windowed_plasticity(trace: Trace, h: int) -> float | None:
    """WP^h: the same with the largest gain A_j - A_i within a window."""
    return _mean(_window_extreme([a for _, a in evals], h, False) for evals in trace.values() if evals)


def learning_curve_area(trace: Trace, starts: Sequence[int], ends: Sequence[int], beta: int = 10) -> float | None:
    """LCA^β: mean over experiences k of the mean accuracy on k over its first β evaluations
    during its own training. As in De Lange et al.'s code, an experience evaluated fewer
    than β times while it was learned is left out; None when no experience qualifies."""
    per = []
    for k, (s, e) in enumerate(zip(starts, ends)):
        during = [a for it, a in trace.get(k, ()) if s <= it <= e][:beta]
        per.append(_mean(during) if len(during) == beta else None)
    return _mean(per)


# ---- lower-is-better scores (loss) -----------------------------------------------------------

def _negated(R: Matrix) -> list[list[float]]:
    return [[-v for v in row] for row in R]


def loss_summary(L: Matrix, sizes: Sequence[int], b: Sequence[float] | None = None) -> dict:
    """End-of-experience metrics of a loss matrix L[i][j] (lower is better):
    final_average_loss = mean_j L[T-1][j]; final_loss = the same pooled over eval samples;
    average_incremental_loss = mean over stages of the (pooled) loss on the domains seen so far;
    loss_forgetting = mean_{j<T-1} L[T-1][j] - min_{j<=i<T-1} L[i][j] (>0: forgot);
    loss_bwt = mean_{j<T-1} L[j][j] - L[T-1][j] (>0: later training lowered old losses);
    loss_fwt = mean_{j>=1} b[j] - L[j-1][j] (>0: earlier domains lowered an unseen one's loss);
    final_perplexity = exp(final_loss)."""
    import math

    neg = _negated(L)
    final = final_accuracy(L, sizes)
    return {
        "final_average_loss": final_average_accuracy(L),
        "final_loss": final,
        "final_perplexity": math.exp(final) if final < 700 else float("inf"),
        "average_incremental_loss": average_incremental_accuracy(L, sizes),
        "loss_forgetting": forgetting(neg),
        "loss_bwt": backward_transfer(neg),
        "loss_fwt": forward_transfer(neg, [-v for v in b]) if b is not None else None,
    }


def loss_stability_summary(trace: Trace, starts: Sequence[int], ends: Sequence[int], windows=(10, 100),
                           beta: int = 10) -> dict:
    """The continual-evaluation metrics of a loss trace: max_loss (mean over finished domains of
    the highest loss after they were learned), wc_loss (last domain's last loss / T + (1 - 1/T)
    max_loss), loss_wf_<h> (the largest loss rise within h evaluations), loss_wp_<h> (the largest
    fall), loss_lca_<β> (mean loss over a domain's first β evaluations while it is learned)."""
    neg = {j: [(it, -v) for it, v in evals] for j, evals in trace.items()}

    def back(v):
        return None if v is None else -v

    out = {"max_loss": back(min_acc(neg, ends)), "wc_loss": back(wc_acc(neg, ends))}
    for h in windows:
        out[f"loss_wf_{h}"] = windowed_forgetting(neg, h)
        out[f"loss_wp_{h}"] = windowed_plasticity(neg, h)
    out[f"loss_lca_{beta}"] = back(learning_curve_area(neg, starts, ends, beta))
    return out


# ---- which way is better ----------------------------------------------------------------------

# The one place that says it: cl.protocol selects the tuning phase's best configuration and
# cl.report ranks strategies with it. Windowed metrics (wf_<h>, wp_<h>, lca_<β>) by prefix.
LOWER_IS_BETTER = ("forgetting", "wf_", "final_average_loss", "final_loss", "final_perplexity",
                   "average_incremental_loss", "loss_forgetting", "max_loss", "wc_loss", "loss_wf_", "loss_lca_",
                   "held_out_loss_increase")
HIGHER_IS_BETTER = ("final_average_accuracy", "final_accuracy", "average_incremental_accuracy", "bwt", "fwt",
                    "min_acc", "wc_acc", "wp_", "lca_", "retention", "loss_bwt", "loss_fwt", "loss_wp_")


def direction(name: str) -> str:
    """"max" if a higher value of metric `name` is better, "min" if a lower one is."""
    def known(names):
        return any(name == n or (n.endswith("_") and name.startswith(n) and name[len(n):].isdigit()) for n in names)

    if known(LOWER_IS_BETTER):
        return "min"
    if known(HIGHER_IS_BETTER):
        return "max"
    names = ", ".join(n + "<h>" if n.endswith("_") else n for n in HIGHER_IS_BETTER + LOWER_IS_BETTER)
    raise UserError(f"'{name}' is not a metric of results.json; use one of {names}.")


# ---- everything for results.json --------------------------------------------------------------

def summary(R: Matrix, sizes: Sequence[int], b: Sequence[float] | None = None) -> dict:
    """The end-of-experience metrics."""
    out = {
        "final_average_accuracy": final_average_accuracy(R),
        "final_accuracy": final_accuracy(R, sizes),
        "average_incremental_accuracy": average_incremental_accuracy(R, sizes),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b) if b is not None else None,
    }
    return out


def stability_summary(trace: Trace, starts: Sequence[int], ends: Sequence[int], windows=(10, 100), beta: int = 10) -> dict:
    """The continual-evaluation metrics (all None when nothing was tracked)."""
    out = {"min_acc": min_acc(trace, ends), "wc_acc": wc_acc(trace, ends)}
    for h in windows:
        out[f"wf_{h}"] = windowed_forgetting(trace, h)
        out[f"wp_{h}"] = windowed_plasticity(trace, h)
    out[f"lca_{beta}"] = learning_curve_area(trace, starts, ends, beta)
    return out
