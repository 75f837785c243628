"""The report of a `python -m cl.bench` suite: report.md, report.html (self-contained: plots embedded
as data URIs, no network), runs.csv (every run) and plots/ in the suite's folder; and
docs/results.md, every suite's report at the default size.

Accuracy-type metrics are in percent, mean ± std (population, ddof=0) over the evaluation seeds.
"""
from __future__ import annotations

import base64
import html
import json
import os
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from cl.evaluation.metrics import direction
from cl.protocol import load_job

# the columns of the results table, when the suite's runs report them
METRICS = {"average_incremental_accuracy": "Ā", "final_average_accuracy": "last acc.", "forgetting": "forgetting",
           "bwt": "BWT", "min_acc": "min-ACC", "wc_acc": "WC-ACC", "wf_10": "WF₁₀", "retention": "retention",
           "individual": "each task's own model"}  # merging: the fine-tuned models before merging (the upper bound)
COST = {"wall_time_s": "wall (s)", "evaluation_share": "eval share", "trainable_parameters": "trainable params",
        "peak_memory_mb": "peak mem (MB)"}


def run_cost(folder: Path, results: dict) -> dict:
    """Wall time, evaluation times and share, trainable parameters and peak memory: from the run's
    run_end event in metrics.jsonl (measured values stay out of results.json, which is the same bytes
    for the same seed)."""
    end = {}
    with open(folder / "metrics.jsonl") as f:
        for line in f:
            if '"run_end"' in line:
                end = json.loads(line)
    end = {**(results.get("cost") or {}), **end}  # results.json's cost record: runs of an earlier version
    wall = end.get("wall_time", end.get("wall_time_s"))
    evaluating = [end.get(k, end.get(f"{k}_s")) for k in ("eval_time", "matrix_eval_time")]
    return {"wall_time_s": wall, "eval_time_s": evaluating[0], "matrix_eval_time_s": evaluating[1],
            "evaluation_share": sum(evaluating) / wall if wall and None not in evaluating else None,
            "trainable_parameters": end.get("trainable_parameters"), "peak_memory_mb": end.get("peak_memory_mb")}


def collect(runs, out: Path) -> pd.DataFrame:
    """One row per run of the suite (finished or not): method, phase, seed, trial, status, folder,
    metrics and cost."""
    rows = []
    runs_dir = (out / "runs").absolute()
    for r in runs:
        folder = runs_dir / r.subdir
        row = {"method": r.method, "phase": r.phase, "seed": r.seed, "run": r.identity,
               "trial": "; ".join(f"{k}={v}" for k, v in r.trial.items()), "folder": str(folder.relative_to(out.absolute()))}
        job = load_job(folder)  # checked against the config fingerprint its results.json recorded
        if job is None:
            why = (folder / "error.txt").read_text().strip() if (folder / "error.txt").is_file() else ""
            row["status"] = f"failed: {why.split(';')[0][:160]}" if why else "not finished"
        else:
            row["status"] = "finished"
            row.update(job.metrics)
            own = (job.results.get("strategy") or {}).get("individual_accuracy")
            if own:  # a merging run: each fine-tuned model on its own task, averaged over the tasks
                row["individual"] = sum(own) / len(own)
            row.update(run_cost(folder, job.results))
            origin = job.results.get("provenance") or {}
            row["commit"] = (origin.get("git_commit") or "unknown")[:12] + ("+dirty" if origin.get("git_dirty") else "")
            selected = (job.config.get("tuning") or {}).get("selected_runs")
            if r.phase == "evaluation" and selected:
                row["selected"] = ";".join(sorted(Path(s).name for s in selected))
        rows.append(row)
    return pd.DataFrame(rows)


def fmt(values: pd.Series, percent: bool = True, digits: int = 2) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "n/a"
    scale = 100 if percent else 1
    if len(v) == 1:
        return f"{scale * v.iloc[0]:.{digits}f}"
    return f"{scale * v.mean():.{digits}f} ± {scale * v.std(ddof=0):.{digits}f}"


def cost_cell(key: str, values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "n/a"
    if key == "evaluation_share":
        return f"{100 * v.mean():.0f}%"
    if key == "trainable_parameters":
        n = v.max()
        return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n else "0"
    return f"{v.mean():.0f}"


def tables(suite: DictConfig, df: pd.DataFrame) -> dict:
    """The results table (evaluation phase), the selection table and Kendall's τ, as rows of cells."""
    from scipy.stats import kendalltau

    metric, mode = suite.metric, direction(suite.metric)
    done = df[df["status"] == "finished"] if "status" in df else df
    tune, evaluate = done[done["phase"] == "tuning"], done[done["phase"] == "evaluation"]
    metrics = [m for m in METRICS if m in done]
    cost = [c for c in COST if c in done]
    results = [["method", *[METRICS[m] for m in metrics], *[COST[c] for c in cost]]]
    selection = [["method", "selected configuration", "trials × seeds", f"tuning pool: {metric}",
                  f"evaluation pool: {metric}", "rank (tuning)", "rank (evaluation)"]]
    scores = []
    for method in suite.methods:
        mine = evaluate[evaluate["method"] == method]
        results.append([method, *[fmt(mine[m]) if len(mine) else "not run" for m in metrics],
                        *[cost_cell(c, mine[c]) for c in cost]])
        trials = tune[tune["method"] == method]
        means = trials.groupby("run_config")[metric].mean().dropna() if len(trials) else pd.Series(dtype=float)
        if means.empty:
            selection.append([method, "not tuned (runs failed or missing)", "0", "n/a", "n/a", "", ""])
            continue
        best = means.idxmax() if mode == "max" else means.idxmin()
        chosen = trials[trials["run_config"] == best]
        n_trials = trials["run_config"].nunique()
        seeds = trials.groupby("run_config").size().max()
        scores.append((method, chosen[metric].mean(), mine[metric].mean() if len(mine) else float("nan")))
        selection.append([method, chosen["trial"].iloc[0] or "(its preset: nothing to tune)", f"{n_trials} × {seeds}",
                          fmt(chosen[metric]), fmt(mine[metric]) if len(mine) else "n/a", "", ""])
    ranked = pd.DataFrame(scores, columns=["method", "tuning", "evaluation"]).set_index("method")
    for col, idx in (("tuning", 5), ("evaluation", 6)):
        ranks = ranked[col].rank(ascending=mode == "min", method="min")
        for row in selection[1:]:
            if row[0] in ranks and not pd.isna(ranks[row[0]]):
                row[idx] = str(int(ranks[row[0]]))
    both = ranked.dropna()
    tau = kendalltau(both["tuning"], both["evaluation"]).statistic if len(both) >= 2 else float("nan")
    return {"results": results, "selection": selection, "tau": tau, "n_tau": len(both)}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {gpu}"


def provenance(command: str) -> list[tuple[str, str]]:
    """The header's command, commit, library versions, machine and time (the commit and versions as
    every run's results.json records them: `cl.run.provenance`)."""
    from cl.run import provenance as run_provenance

    origin = run_provenance("cpu", 1)
    dirty = " (with uncommitted changes)" if origin["git_dirty"] else ""
    libs = ", ".join(f"{name} {v}" for name, v in origin["versions"].items())
    return [("command", f"`{command}`"), ("git commit", f"{origin['git_commit'] or 'unknown'}{dirty}"),
            ("libraries", libs), ("machine", machine()),
            ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]


def plots(suite: DictConfig, df: pd.DataFrame, out: Path) -> dict[str, Path]:
    """stability_gap.png (experience 0's accuracy against iteration, mean over the evaluation
    seeds, one line per method), abar.png (Ā with std error bars), accuracy_matrices.png."""
    import numpy as np

    from cl.analysis import load_trace, plot_stability_gap
    from cl.evaluation.plots import pyplot

    plt = pyplot()
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    evaluate = df[(df["phase"] == "evaluation") & (df["status"] == "finished")]
    made = {}
    if evaluate.empty:
        return made
    methods = [m for m in suite.methods if m in set(evaluate["method"])]
    method_of = {str((out / f).resolve()): m for f, m in zip(evaluate["folder"], evaluate["method"])}
    trace = load_trace([out / f for f in evaluate["folder"]], config=False)
    if not trace.empty:
        trace["method"] = [method_of.get(str(Path(r).resolve()), "?") for r in trace["run"]]
        fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
        plot_stability_gap(trace, 0, by="method", ax=ax)
        ax.set_title(f"{suite.name}: accuracy on the first experience during training (evaluation pool, "
                     f"mean over seeds {list(suite.seeds.evaluation)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "stability_gap.png")
        plt.close(fig)
        made["stability gap (first experience)"] = folder / "stability_gap.png"
    m = "average_incremental_accuracy"
    if m in evaluate:
        fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(methods), 3.5), dpi=110)
        mean = [100 * evaluate.loc[evaluate["method"] == k, m].mean() for k in methods]
        std = [100 * evaluate.loc[evaluate["method"] == k, m].std(ddof=0) for k in methods]
        ax.bar(range(len(methods)), mean, yerr=std, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Ā (%), mean ± std over seeds")
        fig.tight_layout()
        fig.savefig(folder / "abar.png")
        plt.close(fig)
        made["Ā per method"] = folder / "abar.png"
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 2.8), dpi=110, squeeze=False)
    for ax, k in zip(axes[0], methods):
        Rs = [json.loads((out / f / "results.json").read_text())["accuracy_matrix"]
              for f in evaluate.loc[evaluate["method"] == k, "folder"]]
        R = 100 * np.mean(np.array(Rs, dtype=float), axis=0)
        ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if R[i, j] < 60 else "black")
        ax.set_title(k, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("accuracy matrices (row i: after experience i; column j: experience j; mean over seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_matrices.png")
    plt.close(fig)
    made["accuracy matrices"] = folder / "accuracy_matrices.png"
    return made


def md_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(suite: DictConfig, df: pd.DataFrame, seconds: float, command: str, out: Path) -> dict:
    t = tables(suite, df)
    done = df[df["status"] == "finished"]
    compute = pd.to_numeric(done.get("wall_time_s", pd.Series(dtype=float)), errors="coerce").sum()
    took, sittings = elapsed(df, out)
    failed = df[df["status"] != "finished"]
    what = measured(df, out)
    about = [
        ("suite", f"{suite.name} (size {suite.size}): {suite.get('title', '')}"),
        ("phases", str(suite.get("phases", "")).strip()),
        *([("measured", what)] if what else []),
        ("selection", f"per method, the configuration with the best mean {suite.metric} over the tuning seeds "
                      f"{list(suite.seeds.tuning)} ({'higher' if direction(suite.metric) == 'max' else 'lower'} is "
                      f"better), run unchanged except phase and seed on the evaluation seeds {list(suite.seeds.evaluation)}"),
        ("budget", f"at most {suite.get('trials')} tuning configurations per method, drawn from its grid "
                   "(seeded) when the grid is larger"),
        ("time", f"{seconds / 60:.1f} min for this command; {took / 60:.1f} min of elapsed time for its runs (in "
                 f"{sittings} sitting{'s' * (sittings != 1)}, idle gaps over 5 min left out); {compute / 60:.1f} min "
                 f"of run time in the {len(done)} finished runs (the sum of their wall times)"),
        *provenance(command),
        ("runs made at", ", ".join(f"{c} ({n} runs)" for c, n in done.get("commit", pd.Series(dtype=str))
                                   .value_counts().items()) + " (the commit each run's results.json records; "
                                   "+dirty: with uncommitted changes)"),
    ]
    tau = "undefined (the scores are tied)" if t["tau"] != t["tau"] else f"{t['tau']:.3f}"
    notes = [f"Kendall τ between the tuning-pool and evaluation-pool rankings: {tau} over {t['n_tau']} methods "
             "(1: the same order; -1: reversed)." if t["n_tau"] >= 2 else "Kendall τ needs two methods with both phases.",
             "Only the evaluation-pool columns are the result; the tuning-pool score shows what tuning and testing "
             "on one pool would have reported."]
    if len(failed):
        notes.append(f"{len(failed)} runs did not finish: " + "; ".join(f"{r.folder} ({r.status})"
                                                                        for r in failed.itertuples())[:2000])
    return {"about": about, "notes": notes, **t}


def measured(df: pd.DataFrame, out: Path) -> str | None:
    """What the accuracy columns measure, read from a finished evaluation run's results.json."""
    done = df[(df["status"] == "finished") & (df["phase"] == "evaluation")]
    if done.empty:
        return None
    res = json.loads((out / done["folder"].iloc[0] / "results.json").read_text())
    if "continual_score" in res:  # instruction tasks: two scorers
        metrics = ", ".join(sorted(set(res["protocol"].get("metrics") or [])))
        return (f"Ā, last acc., forgetting and BWT score greedily generated answers by each task's metric ({metrics}), "
                f"generated entries: {res.get('generated_entries')}; min-ACC, WC-ACC and WF₁₀ come from the continual "
                f"trace's teacher-forced {res['continual_score'].replace('_', ' ')} of the response tokens"
                + ("; retention: agreement with the base model's answers on the retention probe"
                   if "retention" in df else ""))
    if "accuracy" in res:
        return (f"{res['accuracy']} accuracy on the test split"
                + (" (each task's classes only)" if res["accuracy"] == "task-aware" else " (over every class seen)"))
    return None


def elapsed(df: pd.DataFrame, out: Path, gap: float = 300.0) -> tuple[float, int]:
    """The suite's elapsed time in seconds, from each finished run's end (its results.json's mtime) and
    wall time, with idle gaps longer than `gap` left out, and how many sittings that makes: the same
    whether this command made the runs or reused them."""
    done = df[df["status"] == "finished"]
    spans = []
    for folder, wall in zip(done["folder"], done.get("wall_time_s", [])):
        if wall == wall:  # not NaN
            end = (out / folder / "results.json").stat().st_mtime
            spans.append((end - float(wall), end))
    sittings: list[list[float]] = []  # [start, stop] of each stretch without an idle gap over `gap`
    for start, stop in sorted(spans):
        if sittings and start <= sittings[-1][1] + gap:
            sittings[-1][1] = max(sittings[-1][1], stop)
        else:
            sittings.append([start, stop])
    return sum(stop - start for start, stop in sittings), len(sittings)


def write(suite: DictConfig, runs, out: Path, command: str, seconds: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    df = collect(runs, out)
    df["run_config"] = [f"{m}:{t}" for m, t in zip(df["method"], df["trial"])]
    df.drop(columns=["run_config"]).to_csv(out / "runs.csv", index=False)
    s = sections(suite, df, seconds, command, out)
    images = plots(suite, df, out)
    lines = [f"# {suite.name}: {suite.get('title', '')}", "", *[f"- **{k}**: {v}" for k, v in s["about"]], "",
             "## Results on the evaluation pool", "",
             "Percent, mean ± std (population, ddof=0) over the evaluation seeds; cost columns: mean wall time per "
             "run, share of it spent evaluating, parameters the optimizer updates, peak memory.", "",
             *md_table(s["results"]), "",
             "## Selection on the tuning pool", "", *md_table(s["selection"]), "", *s["notes"], "",
             *[f"![{name}](plots/{p.name})" for name, p in images.items()], ""]
    (out / "report.md").write_text("\n".join(lines))
    embedded = "".join(f"<figure><img alt='{html.escape(n)}' src='data:image/png;base64,"
                       f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{html.escape(n)}</figcaption></figure>"
                       for n, p in images.items())
    about = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in s["about"])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(suite.name)}</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(suite.name)}: {html.escape(str(suite.get('title', '')))}</h1><ul>{about}</ul>"
            f"<h2>Results on the evaluation pool</h2>{html_table(s['results'])}"
            f"<h2>Selection on the tuning pool</h2>{html_table(s['selection'])}"
            + "".join(f"<p>{html.escape(n)}</p>" for n in s["notes"]) + f"{embedded}</body></html>")
    (out / "report.html").write_text(page)
    return out


def write_docs(outs: list[Path], path: Path, command: str) -> None:
    """docs/results.md: every suite's report.md, its plots copied next to it."""
    parts = ["# Results", "", f"Generated by `{command}` (cl/bench.py); do not edit by hand.", ""]
    for out in outs:
        text = (out / "report.md").read_text()
        target = path.parent / "results" / out.name
        target.mkdir(parents=True, exist_ok=True)
        for png in (out / "plots").glob("*.png"):
            shutil.copy(png, target / png.name)
        parts += [text.replace("# ", "## ", 1).replace("\n## ", "\n### ").replace("](plots/", f"](results/{out.name}/"), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
