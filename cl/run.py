"""One run: build the pieces from the config, train, and write the run folder.

    config.yaml         the resolved config
    metrics.jsonl       every event, append-only (the source of truth)
    results.json        the summary: protocol, accuracy matrix (token streams: loss matrix), metrics, provenance
    accuracy_matrix.png (token streams: loss_matrix.png), stability_gap.png
    checkpoints/last.pt
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cl import checkpoint, distributed, engine, runtime
from cl.checks import build, check_config
from cl.errors import UserError, cannot_write
from cl.evaluation import Evaluation, Evaluator
from cl.evaluation import plots
from cl.loggers import ConsoleLogger, JsonlLogger, RunLogger

log = logging.getLogger("cl")

CONFIG_FILE = "config.yaml"  # resolved: what the run ran with
COMPOSED_FILE = ".hydra/config.yaml"  # as composed (interpolations kept): what phase 2 re-runs with its own phase and seed
ROOT = Path(__file__).resolve().parent.parent
IGNORED_ON_RESUME = ("resume",)


def diff_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain containers."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k in IGNORED_ON_RESUME and not prefix:
                continue
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _plain(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def existing_run(cfg: DictConfig, run_dir: Path) -> str:
    """What `run_dir` holds for this config, read before anything is written: "fresh" (no run, or
    this run stopped before its first checkpoint: it starts over), "checkpoint" (this run, stopped:
    it continues) or "finished" (this run, with results.json). Another run's folder is refused and
    left untouched."""
    if not (run_dir / CONFIG_FILE).is_file():
        return "fresh"
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
    differing = diff_keys(OmegaConf.to_container(cfg, resolve=True), saved)
    if differing:
        raise UserError(
            f"{run_dir} holds another run (its config differs at {', '.join(differing[:10])}"
            f"{' ...' if len(differing) > 10 else ''}); choose another folder, or continue that run with resume={run_dir}."
        )
    if (run_dir / "results.json").is_file():
        return "finished"
    return "checkpoint" if (run_dir / "checkpoints" / checkpoint.CHECKPOINT).is_file() else "fresh"


def load_resume(cfg: DictConfig, run_dir: Path, touched: list[str]) -> tuple[DictConfig, dict | None]:
    """The saved config of `run_dir` (checked against the keys the command line set)
    and its checkpoint, if one was written."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(f"resume={run_dir} holds no {CONFIG_FILE}; pass the folder of an earlier run (it has metrics.jsonl).")
    saved = OmegaConf.load(saved_path)
    new = OmegaConf.to_container(cfg, resolve=True)
    old = OmegaConf.to_container(saved, resolve=True)
    differing = []
    for key in touched:
        if key is None:  # a global override (experiment=...): compare everything
            differing += diff_keys(new, old)
        else:
            differing += diff_keys(_plain(cfg, key), _plain(saved, key), f"{key}.")
    differing = sorted(set(differing))
    if differing:
        raise UserError(
            f"The config differs from the run being resumed at {', '.join(differing[:10])}"
            f"{' ...' if len(differing) > 10 else ''}; resume with `resume={run_dir}` alone, or start a new run."
        )
    saved.resume = str(run_dir)
    ckpt = run_dir / "checkpoints" / checkpoint.CHECKPOINT
    return saved, (checkpoint.Checkpointer.load(ckpt) if ckpt.is_file() else None)


def missing_weights(cfg: DictConfig) -> str | None:
    """The sentence a timm backbone would fail with for missing pretrained weights, or None."""
    if OmegaConf.select(cfg, "model._target_") == "cl.models.CausalLM":
        from cl.models.causal_lm import weights_problem as lm_problem

        return lm_problem(cfg.model.pretrained)
    node = OmegaConf.select(cfg, "model.backbone")
    if node is None or node.get("_target_") != "cl.models.TimmBackbone":
        return None
    if not node.get("pretrained") or node.get("checkpoint_path"):
        return None
    from cl.models.timm_backbone import weights_problem

    return weights_problem(node.name)


def strategy_name(node) -> str:
    """`ER`, or `AdaB2N+ERACE` for a strategy wrapping a base strategy."""
    name = node._target_.rsplit(".", 1)[-1]
    base = node.get("base")
    if base is not None and node.get("norm") == "bn":  # AdaB²N's ablation: the base method alone
        return strategy_name(base)
    return f"{name}+{strategy_name(base)}" if base is not None and "_target_" in base else name


def trace_description(evaluator: Evaluator) -> str:
    """When the continual-evaluation trace was measured, in words."""
    when = ("after update 1, 1+every, 1+2·every, ... of each epoch" if evaluator.settings.period == "epoch"
            else "every `every` iterations of the run")
    before = "the run's first update" if evaluator.settings.pre_update == "first" else "each experience's first update"
    ends = ", at epoch ends" if evaluator.settings.at_epoch_end else ""
    return f"subset of each seen experience, {when}{ends} and before {before}"


def protocol(cfg: DictConfig, stream, model, evaluator: Evaluator, trainer: engine.Trainer) -> dict:
    describe = getattr(model, "describe", None)
    return {
        **stream.protocol(),
        **(describe() if describe else {"backbone": type(model).__name__, "pretrained": None}),
        "strategy": strategy_name(cfg.strategy),
        **({"score": "loss: mean cross-entropy per target token, lower is better"} if evaluator.score.lower_is_better
           else {"accuracy": "task-aware" if evaluator.primary_is_task_aware else "task-agnostic"}),
        "evaluation": {
            "split": evaluator.settings.split,
            "every": evaluator.every,
            "subset": evaluator.settings.subset,
            "resample": evaluator.settings.resample,
            "matrix": "full eval split of every experience at each experience end"
                      + (f" (and of the held-out domains {', '.join(stream.held_out)})" if stream.held_out else ""),
            "pre_update": evaluator.settings.pre_update,
            "period": evaluator.settings.period,
            "trace": trace_description(evaluator) if evaluator.every else "none",
        },
        "deterministic": trainer.deterministic,
        "epochs": 1 if stream.online else trainer.epochs,
        "batch_size": (stream.batch_size or trainer.batch_size) if stream.online else trainer.batch_size,
        "seed": cfg.seed,
        "phase": cfg.get("phase", "all"),
    }


def provenance(device, world_size: int) -> dict:
    """What produced the numbers: the code's git commit (and whether the tree had
    uncommitted changes), the versions of the libraries, the device and the world size."""
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    device = torch.device(device)
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "versions": {name: version(name) for name in ("cl", "torch", "torchvision", "timm", "transformers", "peft",
                                                      "hydra-core")} | {"python": platform.python_version()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "world_size": world_size,
    }


def config_fingerprint(run_dir: Path) -> dict:
    """sha256 of the run's config files as it starts; results.json keeps it, so whoever reads a
    finished run (two-phase selection, report) can check the files are the ones it ran with."""
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
            for name in (CONFIG_FILE, COMPOSED_FILE) if (run_dir / name).is_file()}


def write(path: Path, text: str) -> None:
    """Write a file of the run folder atomically; a full disk or a read-only folder is one sentence."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e.strerror or e, path.parent) from e


def cost(wall: float, evaluator: Evaluator, position: checkpoint.Position, device) -> dict:
    """What the run cost, for metrics.jsonl's run_end event (results.json stays the same bytes for the
    same seed): wall time, continual and full-evaluation time, the continual share (`eval_share`) and
    the share of every evaluation (`evaluation_share`: continual, accuracy matrix, baseline), the most
    parameters an experience's optimizer updated, and peak memory."""
    evaluating = evaluator.eval_seconds + evaluator.matrix_seconds
    return {"wall_time": wall, "eval_time": evaluator.eval_seconds, "matrix_eval_time": evaluator.matrix_seconds,
            "eval_share": evaluator.eval_share, "evaluation_share": evaluating / max(wall, 1e-9),
            "trainable_parameters": position.trainable_parameters, **runtime.peak_memory(device)}


def run(cfg: DictConfig, run_dir: str | Path, resume_state: dict | None = None, console: bool = True) -> dict:
    run_dir = Path(run_dir)
    main = distributed.is_main()  # under torchrun, rank 0 alone writes files
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"Cannot create the run folder {run_dir} ({e.strerror}); choose a writable place with "
                            "hydra.run.dir=<dir>.") from e
    if main and resume_state is None and not cfg.get("resume"):
        write(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / COMPOSED_FILE).parent.mkdir(exist_ok=True)
        write(run_dir / COMPOSED_FILE, OmegaConf.to_yaml(cfg))
    fingerprint = config_fingerprint(run_dir)

    check_config(cfg)
    trainer = engine.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True))
    if cfg.get("phase", "all") not in ("all", "tuning", "evaluation"):
        raise UserError(f"phase must be all, tuning or evaluation, not {cfg.phase!r}.")
    if cfg.get("phase", "all") != "all" and cfg.scenario.get("pool") is None and not cfg.get("phase_datasets"):
        raise UserError(
            f"phase={cfg.phase} needs two disjoint pools: use a class-split scenario (scenario.pool follows phase) "
            "or set phase_datasets={tuning: ..., evaluation: ...} with 'scenario.dataset=\"${phase_datasets.${phase}}\"'."
        )
    device = runtime.resolve_device(trainer.device)
    runtime.seed_everything(cfg.seed, trainer.deterministic, device)
    try:
        stream = build(cfg, "scenario", _convert_="all")
    except UserError as e:  # name every missing piece at once (data and offline weights)
        weights = missing_weights(cfg)
        raise UserError(f"{e} {weights}" if weights else str(e)) from None
    model = build(cfg, "model", input_shape=stream.input_shape)
    optimizer = build(cfg, "optimizer")
    scheduler = build(cfg, "scheduler") if cfg.get("scheduler") else None
    strategy = build(cfg, "strategy", model=model, optimizer=optimizer, scheduler=scheduler)

    # a fresh run starts metrics.jsonl afresh; a resumed one cuts it back to its checkpoint's offset
    truncate = resume_state.get("metrics_offset", 0) if resume_state else 0
    jsonl = JsonlLogger(run_dir / "metrics.jsonl", truncate_at=truncate) if main else None
    sinks = [jsonl, ConsoleLogger(enabled=main and console and cfg.logger.console)]
    if main and cfg.logger.get("wandb"):
        try:
            wandb = instantiate(cfg.logger.wandb, _partial_=True)
            sinks.append(wandb(dir=str(run_dir), run_config=OmegaConf.to_container(cfg, resolve=True)))
        except Exception as e:  # noqa: BLE001 - a logger never kills a run
            log.warning("wandb could not start (%s); the run continues without it.", e)
    events = RunLogger(sinks)
    if resume_state:
        events.time_offset = resume_state.get("wall_time", 0.0)
    evaluator = Evaluator(stream, strategy, Evaluation(**OmegaConf.to_container(cfg.evaluation, resolve=True)),
                          events, seed=cfg.seed, device=device, precision=trainer.precision)
    proto = protocol(cfg, stream, model, evaluator, trainer)
    origin = provenance(device, distributed.world())
    if resume_state is None:
        events({"event": "run_start", "protocol": proto, "device": str(device), "provenance": origin})

    runtime.reset_peak_memory(device)
    try:
        with checkpoint.Preemption() as preemption:
            position = engine.train(stream, strategy, evaluator, events, trainer,
                                    checkpoint.Checkpointer(run_dir / "checkpoints", jsonl=jsonl), cfg.seed, resume_state,
                                    preemption)
        results = {"protocol": proto, **evaluator.results(), "iterations": position.iteration,
                   "provenance": origin, "config_sha256": fingerprint}
        diagnostics = strategy.results()  # a method's own (e.g. MOS's task retrieval), or None
        if diagnostics is not None:
            results["strategy"] = diagnostics
        events({"event": "run_end", "iteration": position.iteration, "metrics": results["metrics"],
                **cost(events.elapsed, evaluator, position, device)})
    finally:
        events.close()

    if not main:
        return results
    write(run_dir / "results.json", json.dumps(results, indent=2))
    write_plots(results, evaluator, stream, run_dir)
    return results


def write_plots(results: dict, evaluator: Evaluator, stream, run_dir: Path) -> None:
    """accuracy_matrix.png (a token stream's loss_matrix.png) and stability_gap.png."""
    loss = "loss_matrix" in results  # a token stream: lower is better
    proto = results["protocol"]
    title = f"{proto['strategy']} on {stream.name} {stream.shape_name} ({'loss' if loss else proto['accuracy']})"
    if loss:
        plots.accuracy_matrix(results["loss_matrix"], run_dir / "loss_matrix.png", title, loss=True)
    else:
        plots.accuracy_matrix(results["accuracy_matrix"], run_dir / "accuracy_matrix.png", title)
    if evaluator.trace:
        plots.stability_gap(evaluator.trace, evaluator.ends, run_dir / "stability_gap.png", title, loss=loss,
                            held_out=evaluator.held_out_trace, names=[e.name for e in stream])
