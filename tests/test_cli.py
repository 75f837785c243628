"""`python -m cl` end to end: every preset under debug=smoke on files in the real
formats, the default experiment, the run folder a user reads, and bad input."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from cl.errors import UserError
from tests.conftest import CONF, cli, read_events, read_results, run_inprocess

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
REFERENCES = Path(__file__).parent / "reference_results"


def float_path() -> dict:
    """What decides the float results on a CPU: the kernels torch picked and its thread count."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def check_reference(name: str, results: dict) -> None:
    """The regression guard for refactoring: `results.json` without `provenance` (and the config
    fingerprint, which holds the test's temporary paths) equals the stored reference exactly on the
    float path the reference was taken on; on another machine, the protocol, the iteration count and
    the evaluation sizes must still agree. CL_WRITE_REFERENCES=1 rewrites the references: do it only
    in a commit that says why the numbers changed."""
    path = REFERENCES / f"{name}.json"
    now = {k: v for k, v in results.items() if k not in ("provenance", "config_sha256")}
    if os.environ.get("CL_WRITE_REFERENCES"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"float_path": float_path(), "results": now}, indent=1, sort_keys=True) + "\n")
        return
    assert path.is_file(), f"no reference for {name}: run its test once with CL_WRITE_REFERENCES=1 and commit {path}"
    reference = json.loads(path.read_text())
    if reference["float_path"] == float_path():
        assert now == reference["results"], f"{name}: results.json differs from {path}"
    else:
        for key in ("protocol", "iterations", "eval_sizes"):
            assert now[key] == reference["results"][key], f"{name}: {key} differs from {path}"
RUN_FILES = ["config.yaml", "metrics.jsonl", "results.json", "checkpoints/last.pt"]


def assert_run_folder(run_dir: Path) -> dict:
    results = read_results(run_dir)
    matrix = "loss_matrix" if "loss_matrix" in results else "accuracy_matrix"  # token streams: a loss
    for f in RUN_FILES + [f"{matrix}.png"]:
        assert (run_dir / f).is_file(), f"{f} missing from {run_dir}"
    T = results["protocol"]["num_experiences"]
    assert len(results[matrix]) == T and all(len(r) == T for r in results[matrix])
    kinds = {e["event"] for e in read_events(run_dir)}
    assert {"run_start", "experience_start", "eval", "experience_end", "run_end"} <= kinds
    return results


def test_every_preset_is_tested():
    assert {"er_splitmnist", "finetune_cifar100", "er_cifar100", "derpp_cifar100", "adab2n_online_cifar100",
            "adab2n_derpp_cifar100", "adab2n_online_splitfmnist", "clr_cifar100", "clr_splitfmnist", "dst_cifar100",
            "dst_splitfmnist", "finetune_til_splitfmnist", "mos_cifar100", "mos_imagenet_r", "simplecil_cifar100",
            "finetune_smollm2", "hft_smollm2", "lora_smollm2", "lcia_smollm2", "replay_smollm2",
            "hft_trace", "lcia_trace", "seqlora_trace", "cpt_smollm2", "cpt_smollm2_replay", "cpt_smollm2_infinite",
            "cpt_smollm2_joint", "opcm_multidataset", "merge_ta_multidataset", "merge_avg_multidataset", "opcm_smollm2",
            "opcm_clip_vit_b32_8tasks"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end_under_smoke(preset, data_root, tmp_path, monkeypatch):
    """The preset's config as `python -m cl experiment=<preset> debug=smoke` composes it, run in
    this process (the command-line wrapper is tested below; its start-up would double the time)."""
    monkeypatch.setenv("CL_FMNIST_DIR", str(data_root / "fashion-mnist"))  # the test's files, not the system's
    monkeypatch.setenv("CL_TRACE_DIR", str(data_root / "TRACE"))
    out = tmp_path / "run"
    run_inprocess([f"experiment={preset}", "debug=smoke", f"data_dir={data_root}"], out)
    results = assert_run_folder(out)
    assert results["protocol"]["seed"] == 0
    check_reference(f"{preset}_smoke", results)


@pytest.mark.parametrize("scenario,extra", [
    ("split_imagenet_r", []),
    ("split_cub", ["scenario.increment=2"]),
    ("split_imagenet_subset", ["scenario.increment=2"]),
])
def test_image_folder_scenarios_read_a_png_tree(scenario, extra, data_root, tmp_path):
    out = tmp_path / "run"
    small = ["scenario.dataset.size=20", "scenario.train_transform.size=16", "scenario.eval_transform.resize=18",
             "scenario.eval_transform.size=16", "scenario.dataset.workers=0"]
    run_inprocess([f"scenario={scenario}", "model=resnet18_reduced", "strategy=er", "debug=smoke",
                   f"data_dir={data_root}", *small, *(extra or ["scenario.increment=3"])], out)
    results = assert_run_folder(out)
    assert results["protocol"]["dataset"] in ("imagenet_r", "cub", "imagenet_subset")


@pytest.mark.parametrize("scenario,extra", [
    ("split_mnist", []), ("split_fmnist", []), ("split_digits", []), ("split_cifar10", []),
    ("permuted_mnist", ["scenario.num_experiences=3"]), ("rotated_mnist", ["scenario.num_experiences=3"]),
    ("split_mnist5k", ["scenario.setting=task", "scenario.online=true", "scenario.batch_size=5"]),
    ("split_cifar100", ["scenario.pool=evaluation", "scenario.increment=25", "scenario.validation=0.25",
                        "evaluation.split=validation"]),
])
def test_scenarios_run_end_to_end(scenario, extra, data_root, tmp_path):
    out = tmp_path / "run"
    model = "resnet18_reduced" if "cifar" in scenario else "mlp"
    run_inprocess([f"scenario={scenario}", f"model={model}", "strategy=er", "debug=smoke", f"data_dir={data_root}",
                   "scenario.dataset.root=" + str(data_root / "fashion-mnist")
                   if scenario == "split_fmnist" else "seed=0", *extra], out)
    p = assert_run_folder(out)["protocol"]
    if "setting=task" in " ".join(extra):
        assert p["setting"] == "task" and p["accuracy"] == "task-aware" and p["online"] and p["batch_size"] == 5
    if "pool=evaluation" in " ".join(extra):
        assert min(p["class_order"]) >= 50 and p["shape"] == "B0Inc25" and p["evaluation"]["split"] == "validation"


@pytest.mark.slow  # two full default runs through the CLI (26 s); make test-slow, which CI runs
def test_default_experiment_er_beats_finetune(tmp_path):
    """`python -m cl` (ER on split MNIST, offline) and the same with finetune: ER must
    clearly forget less. This is the acceptance comparison of the foundation issue."""
    er = cli([f"hydra.run.dir={tmp_path / 'er'}"])
    ft = cli(["strategy=finetune", f"hydra.run.dir={tmp_path / 'ft'}"])
    assert er.returncode == 0 and ft.returncode == 0, er.stderr[-2000:] + ft.stderr[-2000:]
    r_er, r_ft = assert_run_folder(tmp_path / "er"), assert_run_folder(tmp_path / "ft")
    check_reference("default_experiment", r_er)
    acc_er = r_er["metrics"]["final_average_accuracy"]
    acc_ft = r_ft["metrics"]["final_average_accuracy"]
    print(f"default experiment: ER {acc_er:.4f} vs finetune {acc_ft:.4f}")
    last_ft = r_ft["accuracy_matrix"][-1]
    assert max(last_ft[:-1]) < 0.5 * last_ft[-1]  # finetune remembers the last experience, not the earlier ones
    assert acc_er > acc_ft + 0.3  # measured: ER 0.80, finetune 0.20
    assert r_er["protocol"]["scenario"] == "split_mnist_subset" and r_er["protocol"]["shape"] == "B0Inc2"
    assert "accuracy (%)" in er.stdout and "final_average_accuracy" in er.stdout


def test_wandb_logger_runs_offline_and_a_misconfigured_wandb_is_one_warning(tmp_path, caplog):
    ok = cli(["debug=smoke", "logger=wandb", f"hydra.run.dir={tmp_path / 'ok'}"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert list((tmp_path / "ok" / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    from cl.loggers import WandbLogger

    with caplog.at_level("WARNING", logger="cl"):
        bad = WandbLogger(mode="no_such_mode", dir=str(tmp_path))
    assert bad.run is None
    bad.log({"event": "train", "iteration": 1, "loss": 1.0, "experience": 0})  # a no-op, not an error
    assert [r.getMessage() for r in caplog.records if "wandb could not start" in r.getMessage()][0].endswith(
        "the run continues without it.")


# ---- bad input: one sentence naming the fix, exit status 2, no traceback ---------------------

def assert_one_sentence(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ")
    for n in needles:
        assert n in last, (n, last)


def test_unknown_strategy_lists_the_valid_ones():
    assert_one_sentence(cli(["strategy=nonsense"]), "Unknown strategy 'nonsense'", "er_ace", "derpp", "finetune")


def test_unknown_scenario_lists_the_valid_ones():
    assert_one_sentence(cli(["scenario=cifar1000"]), "Unknown scenario 'cifar1000'", "split_cifar100")


def test_increment_that_does_not_divide_the_classes():
    assert_one_sentence(cli(["scenario.increment=3", "debug=smoke"]), "does not divide", "scenario.increment=")


def test_missing_dataset_says_where_to_put_it(tmp_path):
    r = cli(["experiment=er_cifar100", "debug=smoke", f"data_dir={tmp_path}", "scenario.dataset.download=false"])
    assert_one_sentence(r, "cifar-100-python", "download=true")


def test_missing_dataset_with_download_on_and_no_network(tmp_path):
    r = cli(["experiment=er_cifar100", "debug=smoke", f"data_dir={tmp_path}"])
    assert_one_sentence(r, "downloading it failed")


def test_mos_preset_without_data_or_weights_names_both_within_seconds(tmp_path):
    import time

    start = time.time()
    r = cli(["experiment=mos_cifar100", f"data_dir={tmp_path}"])  # the real preset: ViT-B/16 from the hub
    assert_one_sentence(r, "cifar-100-python", "vit_base_patch16_224.augreg_in21k", "checkpoint_path")
    assert time.time() - start < 60


def test_clip_8tasks_preset_without_data_or_weights_names_both_within_seconds(tmp_path):
    import time

    start = time.time()
    r = cli(["experiment=opcm_clip_vit_b32_8tasks", f"data_dir={tmp_path}"])  # the real preset: CLIP ViT-B/32 from the hub
    assert_one_sentence(r, "clip_8tasks", "vit_base_patch32_clip_224.openai", "checkpoint_path")
    assert time.time() - start < 60


def test_trace_preset_without_data_or_model_names_both(tmp_path):
    r = cli(["experiment=hft_trace", f"data_dir={tmp_path}"], env={"CL_TRACE_DIR": str(tmp_path / "TRACE")})
    assert_one_sentence(r, "No train file under", "C-STANCE", "meta-llama/Llama-2-7b-chat-hf", "local folder")


def test_nan_loss_names_the_iteration_and_the_last_good_checkpoint(tmp_path):
    r = cli(["debug=smoke", "strategy._target_=tests.helpers.NaNLoss", "+strategy.at=4", "trainer.checkpoint_every=2",
             f"hydra.run.dir={tmp_path}"])
    assert_one_sentence(r, "iteration 4", "optimizer.lr", f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.pt'}")


def test_parameter_a_strategy_does_not_take(tmp_path):
    r = cli(["debug=smoke", "strategy=finetune", "+strategy.mem_size=10", f"hydra.run.dir={tmp_path}"])
    assert_one_sentence(r, "strategy.mem_size is not a parameter")


def test_non_positive_settings(tmp_path):
    """One through the command line (exit status 2, one sentence); the rest in-process (same UserError)."""
    assert_one_sentence(cli(["debug=smoke", "trainer.epochs=0", f"hydra.run.dir={tmp_path}"]),
                        "trainer.epochs must be a positive")
    for override, needle in (("trainer.batch_size=0", "trainer.batch_size must be a positive"),
                             ("optimizer.lr=0", "optimizer.lr must be positive"),
                             ("optimizer.lr=-0.1", "optimizer.lr must be positive"),
                             ("evaluation.subset=0", "evaluation.subset must be a positive"),
                             ("evaluation.batch_size=0", "evaluation.batch_size must be a positive"),
                             ("trainer.accumulate_grad_batches=-1", "trainer.accumulate_grad_batches must be a positive")):
        with pytest.raises(UserError, match=re.escape(needle)):
            run_inprocess(["debug=smoke", override], tmp_path / override)


def test_class_order_that_is_not_a_permutation(tmp_path):
    r = cli(["debug=smoke", "scenario.class_order=[0,1,2,3,4,5,6,7,8,8]", f"hydra.run.dir={tmp_path}"])
    assert_one_sentence(r, "scenario.class_order must be a permutation")


@pytest.mark.slow  # a run and three refused resumes through the CLI (12 s)
def test_resume_from_a_differing_config_or_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert cli(["debug=smoke", f"hydra.run.dir={out}"]).returncode == 0
    r = cli([f"resume={out}", "optimizer.lr=0.5", "trainer.batch_size=7"])
    assert_one_sentence(r, "differs from the run being resumed at optimizer.lr, trainer.batch_size")
    ckpt = out / "checkpoints" / "last.pt"
    blob = ckpt.read_bytes()
    for damaged in (blob[: len(blob) // 2], b"not a checkpoint at all"):
        ckpt.write_bytes(damaged)
        assert_one_sentence(cli([f"resume={out}"]), f"Checkpoint {ckpt} is corrupt or truncated", "delete it")


def test_run_folder_that_cannot_be_written():
    assert_one_sentence(cli(["debug=smoke", "hydra.run.dir=/proc/cl-run"]), "Cannot write the run folder /proc/cl-run",
                        "hydra.run.dir=")


def test_disk_full_while_writing_metrics(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    r = cli(["debug=smoke", f"hydra.run.dir={out}"])
    assert_one_sentence(r, "Cannot write", "metrics.jsonl", "No space left on device", f"resume={out}")


@pytest.mark.slow  # waits for wandb to give up (11 s)
def test_unreachable_wandb_is_one_warning_and_the_run_goes_on(tmp_path):
    """wandb online with a server that refuses connections: one warning line, the run completes."""
    r = cli(["debug=smoke", "logger=wandb", "logger.wandb.mode=online", "logger.wandb.init_timeout=5",
             f"hydra.run.dir={tmp_path}"],
            env={"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in (r.stderr + r.stdout).splitlines() if "wandb could not start" in line]
    assert len(warnings) == 1 and warnings[0].endswith("the run continues without it."), warnings
    assert_run_folder(tmp_path)
