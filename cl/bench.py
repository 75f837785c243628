"""`python -m cl.bench <suite> [--size smoke] [--launcher joblib] [key=value ...]`: a results table.

A suite (`conf/suite/<name>.yaml`) names the two phases' scenarios (two disjoint class pools, or
two datasets of the same shape), the methods (a preset plus a tuning grid), the trial budget (the
same number of tuning configurations for every method), the seeds of each phase and the metric
that selects a configuration. The command

1. runs every method's tuning trials (`phase=tuning`) over the tuning seeds;
2. runs each method's best configuration (by the mean of the metric over its seeds, in the
   metric's direction) on the evaluation pool over the evaluation seeds (`phase=evaluation
   tuning.from=[<its tuning runs>]`: the protocol's own selection, cl/protocol.py);
3. writes `results/<suite>/`: report.md, report.html (self-contained, plots embedded), runs.csv
   (every run) and plots/.

Both phases go through Hydra's multirun with `hydra/sweeper=job_list` and the configured launcher
(`--launcher joblib|submitit_local|submitit_slurm`, or `hydra.launcher.*` overrides after `--`).
A run's folder is named by the sha256 of its resolved configuration (`runs/<method>/<phase>/<hash>`),
so a finished run is never run again: a killed suite continues where it stopped (a stopped run
from its checkpoint), and a changed grid reuses the runs it still contains.
`python -m cl.bench all` runs every suite at the default size and writes docs/results.md.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SUITES = ROOT / "conf" / "suite"
# keys that say where or how a run is recorded, not what it computes: not part of a run's identity
NOT_IDENTITY = ("logger", "data_dir", "resume", "tuning")
# what the evaluation phase may set besides the chosen configuration (cl.protocol.ALLOWED_IN_EVALUATION)
WHERE_AND_HOW = ("data_dir", "trainer.device", "logger")


@dataclass
class Run:
    """One run of the suite: its method, phase, seed, the overrides that make it, and its folder."""
    method: str
    phase: str
    seed: int
    overrides: list[str]
    config: dict  # resolved, without the keys that are not its identity
    trial: dict = field(default_factory=dict)  # the grid point (tuning runs)

    @property
    def identity(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def subdir(self) -> str:
        return f"{self.method}/{self.phase}/{self.identity}"


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES.glob("*.yaml"))


def load_suite(name: str, size: str, overrides: list[str]) -> DictConfig:
    """The suite's config with `sizes.<size>` merged over it and the command line's overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if name not in suite_names():
        raise UserError(f"No suite named {name!r}; choose one of {', '.join(suite_names())} (conf/suite/).")
    try:
        with initialize_config_dir(config_dir=str(SUITES), version_base="1.3"):
            suite = compose(name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"The suite override is not valid ({str(e).splitlines()[0]}); write key=value with keys of "
                        f"conf/suite/{name}.yaml.") from None
    sizes = suite.get("sizes") or {}
    if size not in sizes:
        raise UserError(f"--size {size} is not a size of suite {name}; choose one of {', '.join(sizes)}.")
    size_part = OmegaConf.to_container(sizes[size], resolve=False)
    merged = OmegaConf.merge(suite, {k: v for k, v in size_part.items() if k != "overrides"})
    OmegaConf.set_struct(merged, False)
    # unresolved here: `${...}` in an override string resolves against the merged suite when read
    merged.overrides = [*OmegaConf.to_container(suite.get("overrides") or [], resolve=False),
                        *(size_part.get("overrides") or [])]
    merged.size = size
    return merged


def as_override(key: str, value) -> str:
    """`key=value` in Hydra's override grammar (lists and dicts included, strings quoted)."""
    def fmt(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, str):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)
    return f"{key}={fmt(value)}"


def overrides_of(node) -> list[str]:
    """A suite's overrides: strings as written, and mappings `{key: value}` turned into override strings."""
    out = []
    for item in node or []:
        if isinstance(item, (DictConfig, dict)):
            plain = OmegaConf.to_container(item) if isinstance(item, DictConfig) else item
            out += [as_override(k, v) for k, v in plain.items()]
        else:
            out.append(str(item))
    return out


def trials(suite: DictConfig, method: str) -> list[dict]:
    """The method's tuning configurations: its grid's product, or `suite.trials` of them drawn
    without replacement (seeded by suite and method) when the product is larger."""
    grid = suite.methods[method].get("grid")
    grid = OmegaConf.to_container(grid) if grid is not None else {}
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    budget = suite.get("trials")
    if budget and len(points) > budget:
        picked = sorted(random.Random(f"{suite.name}:{method}").sample(range(len(points)), budget))
        points = [points[i] for i in picked]
    return points


def identity_config(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in plain.items() if k not in NOT_IDENTITY}


def tuning_runs(suite: DictConfig) -> list[Run]:
    from cl.checks import compose

    runs = []
    for method in suite.methods:
        base = [*overrides_of(suite.overrides), *overrides_of(suite.methods[method].overrides), "phase=tuning",
                f"objective={suite.metric}", f"tuning.metric={suite.metric}"]
        for point in trials(suite, method):
            for seed in suite.seeds.tuning:
                ov = [*base, *[as_override(k, v) for k, v in point.items()], f"seed={seed}"]
                try:
                    cfg = compose(ov)
                except Exception as e:  # noqa: BLE001 - Hydra's composition errors: one sentence
                    raise UserError(f"Suite {suite.name}, method {method}: the overrides do not compose "
                                    f"({str(e).splitlines()[0]}); fix its entry in conf/suite/{suite.name}.yaml.") from None
                runs.append(Run(method, "tuning", int(seed), ov, identity_config(cfg), point))
    return runs


def evaluation_runs(suite: DictConfig, method: str, tuned: list[Path]) -> list[Run]:
    """The method's evaluation runs: its best tuning configuration with the evaluation phase and seeds."""
    from cl.protocol import best_configuration

    job, _, _ = best_configuration(tuned, suite.metric)
    where = [o for o in overrides_of(suite.overrides) if o.split("=", 1)[0].lstrip("+~").startswith(WHERE_AND_HOW)]
    runs = []
    for seed in suite.seeds.evaluation:
        chosen = job.config.copy()
        chosen.phase, chosen.seed = "evaluation", int(seed)
        ov = ["phase=evaluation", as_override("tuning.from", [str(p) for p in tuned]),
              f"tuning.metric={suite.metric}", f"seed={seed}", *where]
        runs.append(Run(method, "evaluation", int(seed), ov, identity_config(chosen)))
    return runs


def finished(folder: Path) -> bool:
    return (folder / "results.json").is_file()


def launch(runs: list[Run], runs_dir: Path, launcher: list[str], phase: str) -> None:
    """Run the not yet finished `runs` as one Hydra multirun (job_list sweeper, the given launcher)."""
    from hydra.core.global_hydra import GlobalHydra

    from cl import cli

    todo = [r for r in runs if not finished(runs_dir / r.subdir)]
    print(f"[{phase}] {len(runs) - len(todo)} of {len(runs)} runs finished earlier; running {len(todo)}.", flush=True)
    if not todo:
        return
    jobs_file = runs_dir / ".jobs" / f"{phase}.yaml"
    jobs_file.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create([[*r.overrides, f"hydra.sweep.subdir={r.subdir}"] for r in todo]), jobs_file)
    argv = ["-m", "hydra/sweeper=job_list", f"hydra.sweeper.jobs_file={jobs_file}", f"hydra.sweep.dir={runs_dir}",
            "hydra/hydra_logging=disabled", *launcher]
    saved = sys.argv
    sys.argv = ["cl", *argv]
    try:
        cli.hydra_main()
    except SystemExit as e:  # Hydra reported an error it could not turn into a failed job
        if e.code:
            raise UserError(f"The {phase} phase stopped (Hydra exited with {e.code}, see above); fix the cause and run "
                            "the same command again: finished runs are kept.") from None
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()


def run_suite(suite: DictConfig, out: Path, launcher: list[str]) -> list[Run]:
    from hydra.utils import instantiate

    runs_dir = (out / "runs").absolute()
    for step in suite.get("prepare") or []:  # e.g. pretraining a backbone once (cached)
        try:
            instantiate(step)
        except Exception as e:  # noqa: BLE001 - Hydra wraps the step's own one-sentence error
            cause = e.__cause__ if isinstance(e.__cause__, UserError) else e
            if isinstance(cause, UserError):
                raise cause from None
            raise UserError(f"The suite's preparation step {step.get('_target_')} failed ({cause}); fix it in "
                            f"conf/suite/{suite.name}.yaml.") from None
    tune = tuning_runs(suite)
    launch(tune, runs_dir, launcher, "tuning")
    failed = [r for r in tune if not finished(runs_dir / r.subdir)]
    evaluate = []
    for method in suite.methods:
        mine = [r for r in tune if r.method == method]
        if any(r in failed for r in mine):
            print(f"[evaluation] {method}: {sum(r in failed for r in mine)} tuning runs failed "
                  f"(see {runs_dir / method / 'tuning'}/*/error.txt); not evaluated.", file=sys.stderr)
            continue
        evaluate += evaluation_runs(suite, method, [runs_dir / r.subdir for r in mine])
    launch(evaluate, runs_dir, launcher, "evaluation")
    if not suite.get("keep_checkpoints", True):  # a finished run needs only its results to be skipped
        for r in tune + evaluate:
            if finished(runs_dir / r.subdir):
                shutil.rmtree(runs_dir / r.subdir / "checkpoints", ignore_errors=True)
    return tune + evaluate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cl.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", help=f"one of {', '.join(suite_names())}, or all")
    ap.add_argument("overrides", nargs="*", help="suite overrides (key=value), e.g. seeds.evaluation=[0,1]")
    ap.add_argument("--size", default="default", help="default, or smoke (every run at debug=smoke size)")
    ap.add_argument("--out", default="results", help="where results/<suite>/ is written")
    ap.add_argument("--launcher", default=None, help="basic (in this process, default), joblib, submitit_local, "
                                                     "submitit_slurm")
    ap.add_argument("--launcher-override", action="append", default=[], metavar="KEY=VALUE",
                    help="e.g. hydra.launcher.n_jobs=2 or hydra.launcher.partition=gpu (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs")
    args = ap.parse_args(argv)
    from cl import bench_report as report_html
    from cl.resolvers import register_resolvers

    register_resolvers()
    launcher = ([f"hydra/launcher={args.launcher}"] if args.launcher and args.launcher != "basic" else [])
    launcher += args.launcher_override
    command = "python -m cl.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    names = suite_names() if args.suite == "all" else [args.suite]
    failures = 0
    try:
        reports = []
        for name in names:
            suite = load_suite(name, args.size, args.overrides)
            out = Path(args.out) / (name if args.size == "default" else f"{name}-{args.size}")
            start = time.time()
            runs = tuning_runs(suite) if args.report_only else run_suite(suite, out, launcher)
            if args.report_only:
                runs += [r for m in suite.methods for r in _evaluated(suite, m, out, runs)]
            reports.append(report_html.write(suite, runs, out, command, time.time() - start))
            unfinished = [r for r in runs if not finished((out / "runs").absolute() / r.subdir)]
            print(f"{name}: report in {out / 'report.md'}" + (f" ({len(unfinished)} runs did not finish: see its notes)"
                                                               if unfinished else ""))
            failures += len(unfinished)
        if args.suite == "all" and args.size == "default":
            report_html.write_docs(reports, ROOT / "docs" / "results.md", command)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if failures:
        print(f"error: {failures} runs did not finish (the reports list them); fix the cause and run the same command "
              "again: finished runs are kept.", file=sys.stderr)
        sys.exit(1)


def _evaluated(suite: DictConfig, method: str, out: Path, tune: list[Run]) -> list[Run]:
    runs_dir = (out / "runs").absolute()
    mine = [runs_dir / r.subdir for r in tune if r.method == method]
    if not mine or not all(finished(p) for p in mine):
        return []
    return evaluation_runs(suite, method, mine)


if __name__ == "__main__":
    main()
