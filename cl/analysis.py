"""Runs into pandas, and the plots researchers look at.

    trace = load_trace("multirun/er_splitmnist/2026-...")     # one row per (run, iteration, experience)
    results = load_results("outputs/")                       # one row per run: metrics + config
    plot_stability_gap(trace, eval_experience=0, by="strategy")
    compare(results, ["min_acc", "wc_acc", "final_average_accuracy"], by="strategy")
    check_config("outputs/nb/er", ["strategy=er", "seed=1"])  # reuse a run only if it ran these settings

A run folder is any folder holding `metrics.jsonl` and `config.yaml`; a path may
be one run, a multirun folder, or any tree of them. Config fields become columns
named by their dotted keys (`optimizer.lr`, `strategy.mem_size`, `seed`), plus
`strategy` (the class name) and `run` (the folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import yaml


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = set()
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            found.add(p)
        found.update(m.parent for m in p.rglob("metrics.jsonl") if (m.parent / "config.yaml").is_file())
    return sorted(found)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def run_config(run: Path) -> dict:
    """The run's resolved config, flattened, with `strategy` and `run` added."""
    cfg = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    flat = flatten(cfg)
    flat["strategy"] = str(flat.get("strategy._target_", "?")).rsplit(".", 1)[-1]
    flat["run"] = str(run)
    return flat


def config_differences(run: str | Path, overrides: Sequence[str]) -> list[str]:
    """Dotted keys where the run's saved config.yaml differs from the config that
    `python -m cl <overrides>` would run now (`hydra.*` overrides and `resume` aside)."""
    from omegaconf import OmegaConf

    from cl.checks import compose

    cfg = compose([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    asked = flatten(OmegaConf.to_container(cfg, resolve=True))
    saved = flatten(yaml.safe_load((Path(run) / "config.yaml").read_text()) or {})
    return sorted(k for k in set(asked) | set(saved) if k != "resume" and asked.get(k) != saved.get(k))


def check_config(run: str | Path, overrides: Sequence[str]) -> None:
    """Refuse to reuse a run whose saved config differs from the one `overrides` ask for."""
    from cl.errors import UserError

    differing = config_differences(run, overrides)
    if differing:
        raise UserError(f"{run} holds a run of another configuration than the one asked for (it differs at "
                        f"{', '.join(differing[:10])}{' ...' if len(differing) > 10 else ''}); delete that folder "
                        "or point the notebook at another one.")


def _events(run: Path) -> pd.DataFrame:
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def primary_accuracy(run: Path, events: pd.DataFrame | None = None) -> str:
    """"task-aware" or "task-agnostic": the accuracy the run's metrics are computed from
    (results.json's "accuracy"; for an unfinished run, its run_start event's protocol)."""
    res = Path(run) / "results.json"
    if res.is_file():
        return json.loads(res.read_text()).get("accuracy", "loss")
    events = _events(run) if events is None else events
    return _run_start(events).get("accuracy", "task-agnostic")


def _run_start(events: pd.DataFrame) -> dict:
    if "event" in events and "protocol" in events:
        for proto in events.loc[events["event"] == "run_start", "protocol"]:
            if isinstance(proto, dict):
                return proto
    return {}


def trace_score(run: Path, events: pd.DataFrame, full: bool) -> str:
    """The event field a run's trace (`full=False`) or full evaluations hold as its score: a token
    stream's `loss`; an instruction stream's declared teacher-forced score in its trace
    (`evaluation.continual_score`) and the generated `accuracy` in full evaluations; otherwise
    "accuracy"."""
    proto = _run_start(events)
    if "accuracy" not in proto:  # a token stream: its protocol names a loss instead (an instruction
        return "loss"             # stream's "score" only describes its scorers)
    if proto.get("setting") == "instruction" and not full:
        cfg = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
        score = (cfg.get("evaluation") or {}).get("continual_score", "token_accuracy")
        return {"exact": "exact_tf"}.get(score, score)
    return "accuracy"


def load_trace(paths, full: bool = False, config: bool = True) -> pd.DataFrame:
    """Every evaluation as a row: run, iteration, experience (being trained),
    eval_experience, accuracy, n. `accuracy` is the run's primary accuracy, the one its
    metrics (min-ACC, WF, ...) are computed from (`accuracy_type` says which: task-aware in
    task-incremental runs); `accuracy_task_agnostic` and, where known, `accuracy_task_aware`
    hold both. `full=False` keeps the continual (subset) evaluations, `full=True` the
    end-of-experience ones.

    `score` is what the run's metrics are computed from and `score_type` names it: the primary
    accuracy; an instruction stream's teacher-forced continual score (token_accuracy,
    token_loss or exact_tf) in its trace; a token stream's `loss` (lower is better, no
    `accuracy` column), whose rows also carry `tokens` (training tokens seen by then) and
    `held_out` (the name of a domain never trained on; its eval_experience is NaN)."""
    frames = []
    for run in find_runs(paths):
        ev = _events(run)
        if ev.empty or "event" not in ev:
            continue
        primary = primary_accuracy(run, ev)
        score = trace_score(run, ev, full)
        proto = _run_start(ev)
        ev = ev[(ev["event"] == "eval") & (ev["full"] == full)].drop(columns=["event"])
        if ev.empty:
            continue
        ev = ev.dropna(axis=1, how="all")
        if "accuracy" in ev:
            ev = ev.rename(columns={"accuracy": "accuracy_task_agnostic"})
            ev.insert(ev.columns.get_loc("accuracy_task_agnostic"), "accuracy",
                      ev["accuracy_task_aware"] if primary == "task-aware" else ev["accuracy_task_agnostic"])
        ev["score"] = ev["accuracy"] if score == "accuracy" else ev[score]
        ev["score_type"] = primary if score == "accuracy" else score
        if score == "loss" and proto.get("seq_len"):
            ev["tokens"] = ev["iteration"] * proto["batch_size"] * proto["seq_len"]
        ev["accuracy_type"] = primary
        if config:
            for k, v in run_config(run).items():
                ev[k] = [v] * len(ev)
        else:
            ev["run"] = str(run)
        frames.append(ev)
    if not frames:
        return pd.DataFrame(columns=["run", "iteration", "experience", "eval_experience", "accuracy"])
    return pd.concat(frames, ignore_index=True)


def load_results(paths) -> pd.DataFrame:
    """One row per finished run: every metric of results.json, the protocol, and the config."""
    rows = []
    for run in find_runs(paths):
        res_path = run / "results.json"
        if not res_path.is_file():
            continue
        res = json.loads(res_path.read_text())
        row = run_config(run)
        row.update({f"protocol.{k}": (tuple(v) if isinstance(v, list) else v)
                    for k, v in res["protocol"].items() if not isinstance(v, dict)})
        row.update(res["metrics"])
        row["accuracy_type"] = res.get("accuracy", "loss")  # a token stream's score is a loss
        rows.append(row)
    return pd.DataFrame(rows)


def swept_keys(results: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs (what a sweep varied, seeds included)."""
    skip = set(METRICS) | {"run", "accuracy_type"}
    return [c for c in results.columns if c not in skip and not c.startswith(("protocol.", "hydra."))
            and results[c].map(repr).nunique() > 1]


METRICS = ("final_average_accuracy", "final_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt",
           "min_acc", "wc_acc", "wf_10", "wp_10", "wf_100", "wp_100", "lca_10", "accuracy_type")


def compare(results: pd.DataFrame, metrics: Sequence[str], by: str | Sequence[str] = "strategy") -> pd.DataFrame:
    """mean ± std of `metrics` per group (seeds pooled), as strings in percent, plus the run count."""
    groups = results.groupby(list([by] if isinstance(by, str) else by), dropna=False)
    table = pd.DataFrame({
        m: groups[m].agg(lambda s: f"{100 * s.mean():.2f} ± {100 * s.std(ddof=0):.2f}" if s.notna().any() else "n/a")
        for m in metrics
    })
    table["runs"] = groups.size()
    return table


def experience_ends(run: str | Path) -> list[int]:
    """The iterations at which the run's experiences ended (its experience_end events)."""
    ev = _events(Path(run))
    if "event" not in ev:
        return []
    return [int(it) for it in ev.loc[ev["event"] == "experience_end", "iteration"]]


def _boundaries(run: str, trace: pd.DataFrame) -> list[int]:
    """Iterations where a new experience starts: the run's experience_end events (the last
    evaluation of an experience), else the first evaluation of each later experience."""
    if (Path(run) / "metrics.jsonl").is_file():
        ev = _events(Path(run))
        if "event" in ev and (ev["event"] == "experience_end").any():
            last = trace["iteration"].max()
            return [int(it) for it in ev.loc[ev["event"] == "experience_end", "iteration"] if it < last]
    return [int(it) for it in trace.groupby("experience")["iteration"].min().iloc[1:]]


def plot_stability_gap(trace: pd.DataFrame, eval_experience: int = 0, by: str = "strategy", ax=None):
    """Accuracy on one experience against iteration, one line per group (mean over runs),
    with the experience boundaries of the first run marked. The curve is `trace["score"]`,
    what each run's metrics are computed from (its primary accuracy; a loss is plotted as
    a loss, where the peaks after a boundary are the gap)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    sub = trace[trace["eval_experience"] == eval_experience]
    column = "score" if "score" in sub else "accuracy"
    kinds = sorted(set(sub["score_type" if "score_type" in sub else "accuracy_type"].dropna())) if len(sub) else []
    loss = any("loss" in k for k in kinds)  # a lower-is-better trace: plotted as is, peaks are the gap
    scale = 1 if loss else 100
    for name, g in sub.groupby(by):
        curve = g.groupby("iteration")[column].mean()
        ax.plot(curve.index, scale * curve.values, lw=1.0, label=str(name))
    first = sub["run"].iloc[0] if len(sub) else None
    if first is not None:
        for it in _boundaries(first, trace[trace["run"] == first]):
            ax.axvline(it, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{' / '.join(kinds) or 'accuracy'} on experience {eval_experience}" + ("" if loss else " (%)"))
    if not loss:
        ax.set_ylim(-2, 102)
    ax.legend()
    return ax


def plot_sweep(results: pd.DataFrame, x: str, metric: str = "average_incremental_accuracy", hue: str | None = None, ax=None):
    """A metric against one swept hyperparameter (mean ± std over seeds), one line per `hue`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    groups = [(None, results)] if hue is None else list(results.groupby(hue))
    for name, g in groups:
        stats = g.groupby(x)[metric].agg(["mean", "std"]).sort_index()
        ax.errorbar(stats.index.astype(float) if pd.api.types.is_numeric_dtype(stats.index) else stats.index.astype(str),
                    100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o", capsize=3,
                    label=None if name is None else f"{hue}={name}")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (%)")
    if hue is not None:
        ax.legend()
    return ax
