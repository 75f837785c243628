"""`python -m cl.report <folders...>`: the table of a sweep, or the two-phase report (Cha & Cho).

Reads every finished run under the folders. Runs of an ordinary sweep (phase=all): one row per
configuration (the settings that vary), each metric as mean ± std over its seeds. Runs of the
two-phase protocol, per strategy: the configuration the
evaluation phase ran (the tuning runs it recorded in `tuning.selected_runs`, chosen by
`tuning.metric`), its tuning-phase score (mean ± std of the metric over its seeds)
against the result of the evaluation phase (mean ± std over its seeds), their ranks
(rank 1 is the best: the highest value, or the lowest for a metric where lower is
better, e.g. forgetting), and Kendall's τ between the two rankings. A strategy with
tuning runs only shows its best tuning configuration by the metric. Only the
evaluation-phase column is the result; the tuning column shows how much conventional
tuning-and-testing on one pool would overstate it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from scipy.stats import kendalltau

from cl.analysis import find_runs, flatten
from cl.errors import UserError
from cl.evaluation.metrics import direction
from cl.protocol import load_job

SEED_KEYS = ("seed", "scenario.class_order_seed", "strategy.seed", "tuning.from")


def _runs(folders) -> pd.DataFrame:
    rows = []
    for run in find_runs(folders):
        job = load_job(run)  # the config it ran with, checked against its results' fingerprint
        if job is None:
            continue
        res = job.results
        flat = flatten(OmegaConf.to_container(job.config))
        identity = json.dumps({k: repr(v) for k, v in flat.items() if k not in SEED_KEYS and not k.startswith("tuning.")},
                              sort_keys=True)
        tuning = (OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True) or {}).get("tuning") or {}
        selected = tuning.get("selected_runs")
        rows.append({"run": str(run), "path": str(Path(run).resolve()), "phase": res["protocol"].get("phase", "all"),
                     "strategy": res["protocol"]["strategy"], "seed": res["protocol"]["seed"], "identity": identity,
                     "flat": flat, "selected": _selection_keys(selected, tuning.get("from")) if selected else None,
                     "chosen_by": f"{tuning.get('metric')}" if selected else None, **res["metrics"]})
    return pd.DataFrame(rows)


def _selection_keys(selected, sweep) -> tuple:
    """How to recognise the tuning runs an evaluation run recorded, wherever the folders are now:
    each run's path from its sweep folder's name down (`tune_er/3`), so a relative `tuning.from`
    or a sweep copied elsewhere (off a cluster, say) still matches."""
    if sweep is not None and not isinstance(sweep, (str, Path)):  # a list of run folders (cl.bench)
        return tuple(sorted(Path(run).parts[-3:] for run in selected))
    keys = []
    for run in selected:
        run = Path(run)
        try:
            keys.append((Path(sweep).name, *run.relative_to(sweep).parts) if sweep else run.parts[-2:])
        except ValueError:  # recorded outside tuning.from (an older record): the sweep's folder and the job
            keys.append(run.parts[-2:])
    return tuple(sorted(keys))


def _recorded(path: str, keys: tuple) -> bool:
    parts = Path(path).parts
    return any(parts[-len(k):] == tuple(k) for k in keys)


def _fmt(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "n/a"
    return f"{100 * v.mean():.2f} ± {100 * v.std(ddof=0):.2f} (n={len(v)})"


def _varied(configs: list[dict], chosen: dict) -> str:
    keys = sorted({k for c in configs for k in c} - set(SEED_KEYS))
    varied = [k for k in keys if not k.startswith(("tuning.", "hydra.")) and len({repr(c.get(k)) for c in configs}) > 1]
    return ", ".join(f"{k}={chosen.get(k)}" for k in varied) or "(single configuration)"


def _phase1(strategy: str, tune: pd.DataFrame, evaluate: pd.DataFrame, metric: str, mode: str):
    """(the tuning runs of the configuration phase 2 ran, its description): the selection the
    evaluation phase recorded; without evaluation runs, the best tuning configuration by `metric`."""
    selections = set(evaluate["selected"].dropna())
    if len(selections) > 1:
        raise UserError(f"The evaluation runs of {strategy} ran configurations chosen from different tuning sweeps; "
                        "report each tuning sweep with its own evaluation runs.")
    if tune.empty:
        return None, "-"
    if selections:
        keys = selections.pop()
        chosen = tune[[_recorded(p, keys) for p in tune["path"]]]
        if chosen.empty:
            return None, "(its chosen tuning runs are not under the folders given)"
        by = sorted(set(evaluate["chosen_by"].dropna()))
        note = f" (chosen by {', '.join(by)})" if by and by != [metric] else ""
    else:
        means = tune.groupby("identity")[metric].mean().dropna()
        if means.empty:
            return None, "-"
        chosen = tune[tune["identity"] == (means.idxmax() if mode == "max" else means.idxmin())]
        note = f" (no evaluation runs: best by {metric})"
    return chosen, _varied(list(tune["flat"]), chosen["flat"].iloc[0]) + note


# the columns of a sweep report, when the runs have them
SWEEP_METRICS = ("average_incremental_accuracy", "final_average_accuracy", "forgetting", "bwt", "min_acc", "wc_acc", "wf_10")


def sweep_report(runs: pd.DataFrame, metric: str, mode: str) -> list[str]:
    """Any sweep: one row per configuration (the settings that vary between the runs), each metric as
    mean ± std over its seeds, best `metric` first."""
    columns = [m for m in dict.fromkeys((metric, *SWEEP_METRICS)) if m in runs]
    lines = [f"# Sweep report ({len(runs)} runs; %, mean ± std over seeds; best {metric} first)", "",
             "| strategy | configuration | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    rows = []
    for _, group in runs.groupby("identity", sort=False):
        first = group.iloc[0]
        config = _varied(list(runs["flat"]), first["flat"])
        rows.append((group[metric].mean(), f"| {first['strategy']} | {config} | "
                     + " | ".join(_fmt(group[m]) for m in columns) + " |"))
    rows.sort(key=lambda r: (pd.isna(r[0]), -r[0] if mode == "max" else r[0]))
    return lines + [line for _, line in rows]


def two_phase_report(runs: pd.DataFrame, metric: str, mode: str) -> list[str]:
    lines = [f"# Two-phase report ({metric}, %, {'higher' if mode == 'max' else 'lower'} is better)", "",
             "| strategy | phase 1: chosen configuration | phase 1 (tuning pool) | phase 2 (evaluation pool) | rank 1 | rank 2 |",
             "|---|---|---|---|---|---|"]
    table = []
    for strategy in sorted(runs["strategy"].unique()):
        tune = runs[(runs["strategy"] == strategy) & (runs["phase"] == "tuning")]
        evaluate = runs[(runs["strategy"] == strategy) & (runs["phase"] == "evaluation")]
        best, best_desc = _phase1(strategy, tune, evaluate, metric, mode)
        table.append({
            "strategy": strategy, "config": best_desc,
            "p1": best[metric].mean() if best is not None else float("nan"), "p1s": _fmt(best[metric]) if best is not None else "n/a",
            "p2": evaluate[metric].mean() if not evaluate.empty else float("nan"), "p2s": _fmt(evaluate[metric]),
        })
    df = pd.DataFrame(table)
    df["r1"] = df["p1"].rank(ascending=mode == "min", method="min")  # rank 1: the best
    df["r2"] = df["p2"].rank(ascending=mode == "min", method="min")
    for _, r in df.iterrows():
        rank = lambda v: "-" if pd.isna(v) else str(int(v))  # noqa: E731
        lines.append(f"| {r.strategy} | {r.config} | {r.p1s} | {r.p2s} | {rank(r.r1)} | {rank(r.r2)} |")
    both = df.dropna(subset=["p1", "p2"])
    if len(both) >= 2:
        tau = kendalltau(both["p1"], both["p2"]).statistic
        lines += ["", f"Rank change between the phases: Kendall τ = {tau:.3f} over {len(both)} strategies "
                      "(1: same order, -1: reversed)."]
    else:
        lines += ["", "Kendall τ needs at least two strategies with both phases."]
    return lines + ["", "Phase 2 is the result: the configuration chosen on the tuning pool, run unchanged on the "
                        "disjoint evaluation pool."]


def report(folders, metric: str = "average_incremental_accuracy") -> str:
    """The two-phase report of the runs with a phase, and the sweep report of the others."""
    runs = _runs(folders)
    if runs.empty:
        raise UserError(f"No finished run under {', '.join(map(str, folders))}; pass run, sweep or two-phase folders.")
    if metric not in runs:
        raise UserError(f"No run reports '{metric}'; use --metric with one of the metrics in results.json.")
    mode = direction(metric)
    phased = runs["phase"].isin(["tuning", "evaluation"])
    parts = []
    if phased.any():
        parts.append(two_phase_report(runs[phased], metric, mode))
    if (~phased).any():
        parts.append(sweep_report(runs[~phased], metric, mode))
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cl.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="run, sweep, or tuning and evaluation folders")
    ap.add_argument("--metric", default="average_incremental_accuracy")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args(argv)
    try:
        text = report(args.folders, args.metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
