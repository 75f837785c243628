"""The whole run: determinism from one seed, and resuming a killed run to the same numbers."""
from __future__ import annotations

import json
import os
import signal

import pytest

from cl.errors import Interrupted
from cl.run import load_resume, run
from strategies.replay import ER
from tests.conftest import compose, read_events, read_results, run_inprocess
from tests.helpers import Crash

SMALL = [
    "scenario.max_per_class=30", "scenario.max_per_class_eval=20", "model.backbone.hidden=[32]",
    "trainer.epochs=2", "trainer.batch_size=10", "trainer.log_every=5",
]


def comparable(events):
    """Events without wall times, and without the marker a resumed run adds."""
    timed = ("t", "seconds", "wall_time", "eval_time", "matrix_eval_time", "eval_share", "evaluation_share",
             "peak_memory_mb")
    return [{k: v for k, v in e.items() if k not in timed}
            for e in events if e["event"] != "resume"]


def test_same_seed_same_results_and_different_seed_different_results(tmp_path):
    a = run_inprocess(SMALL + ["seed=1"], tmp_path / "a")
    b = run_inprocess(SMALL + ["seed=1"], tmp_path / "b")
    c = run_inprocess(SMALL + ["seed=2"], tmp_path / "c")
    assert (tmp_path / "a" / "results.json").read_text() == (tmp_path / "b" / "results.json").read_text()
    assert comparable(read_events(tmp_path / "a")) == comparable(read_events(tmp_path / "b"))
    assert a["accuracy_matrix"] != c["accuracy_matrix"]
    assert a["protocol"]["class_order"] != c["protocol"]["class_order"]


@pytest.mark.parametrize("strategy,crash_at", [("ER", 23), ("DERPP", 60), ("ERACE", 48)])
def test_killed_run_resumes_to_the_same_numbers(tmp_path, strategy, crash_at):
    """Killed mid-experience (after a mid checkpoint), at the very last step, and
    between checkpoints; the resumed run must end with the same results and the
    same event log as an uninterrupted one."""
    name = {"ER": "er", "DERPP": "derpp", "ERACE": "er_ace"}[strategy]
    overrides = SMALL + [f"strategy={name}", f"strategy._target_=tests.helpers.Crashing{strategy}",
                         "trainer.checkpoint_every=7", "scheduler=cosine"]
    assert_resumes_to_the_same_numbers(tmp_path, overrides, crash_at)


RESNET = ["model=resnet18_reduced", "model.backbone.nf=4"]
CNN = ["scenario.max_per_class=24", "scenario.max_per_class_eval=12",
       "trainer.epochs=2", "trainer.batch_size=8", "trainer.checkpoint_every=5", "optimizer=adam", "optimizer.lr=0.003",
       "evaluation.every=3", "trainer.log_every=1"]


@pytest.mark.parametrize("overrides,crash_at", [
    (RESNET + ["strategy=adab2n", "strategy.base._target_=tests.helpers.CrashingERACE", "strategy.base.mem_size=20",
      "strategy.kappa=0.4"], 17),
    (RESNET + ["strategy=dst", "strategy._target_=tests.helpers.CrashingDST", "strategy.update_every=4",
      "strategy.growth=momentum", "strategy.keep_best=false", "scenario.setting=task"], 22),
    (RESNET + ["strategy=clr", "strategy._target_=tests.helpers.CrashingCLR", "scenario.setting=task",
      "scenario.validation=0.25",
      "evaluation.every=6"], 19),  # CLR evaluates each task's own model: fewer evaluations keep the test short
    (["model=timm", "model.backbone.pretrained=false", "+model.backbone.img_size=28", "+model.backbone.patch_size=7",
      "+model.backbone.depth=2", "+model.backbone.embed_dim=48", "+model.backbone.num_heads=3", "strategy=mos",
      "strategy._target_=tests.helpers.CrashingMOS", "strategy.ca_epochs=2", "optimizer=sgd"], 21),
], ids=["adab2n", "dst", "clr", "mos"])
def test_killed_cnn_method_resumes_to_the_same_numbers(tmp_path, overrides, crash_at):
    """AdaB²N's η/t/k, DST's masks and union, CLR's per-task sets, MOS's adapters and class
    statistics survive a kill mid-task."""
    assert_resumes_to_the_same_numbers(tmp_path, CNN + overrides, crash_at)


LM = ["debug=smoke", "scenario.train_size=10", "trainer.batch_size=4", "trainer.checkpoint_every=2",
      "trainer.log_every=1", "evaluation.every=2"]


@pytest.mark.parametrize("overrides,crash_at", [
    (["experiment=hft_smollm2", "strategy._target_=tests.helpers.CrashingHFT"], 9),
    (["experiment=lcia_smollm2", "strategy._target_=tests.helpers.CrashingLCIA"], 9),  # inside task 3: DEMA on
    (["experiment=replay_smollm2", "strategy._target_=tests.helpers.CrashingLMReplay", "strategy.per_task=3"], 11),
    (["experiment=lora_smollm2", "strategy._target_=tests.helpers.CrashingSeqLoRA"], 5),
], ids=["hft", "lcia", "lm_replay", "seqlora"])
def test_killed_instruction_tuning_run_resumes_to_the_same_numbers(tmp_path, overrides, crash_at):
    """HFT's selections, LCIA's groups, adapters and EMA state (θ*, g_{t-1}), and the replay
    memory survive a kill mid-task; generations and the retention probe come out the same."""
    assert_resumes_to_the_same_numbers(tmp_path, LM + overrides, crash_at)


CPT = ["debug=smoke", "trainer.checkpoint_every=3", "trainer.log_every=1", "evaluation.every=2"]


@pytest.mark.parametrize("overrides,crash_at", [
    (["experiment=cpt_smollm2_replay", "strategy._target_=tests.helpers.CrashingTokenReplay", "strategy.fraction=0.3"], 11),
    (["experiment=cpt_smollm2_infinite", "strategy._target_=tests.helpers.CrashingFinetune"], 8),
], ids=["replay", "infinite_schedule"])
def test_killed_continual_pre_training_run_resumes_to_the_same_numbers(tmp_path, data_root, overrides, crash_at):
    """Continual pre-training killed mid-experience: the replay counters and generator, the
    schedule's position across experiences and the token-stream trace (with the held-out
    domain) come out the same."""
    assert_resumes_to_the_same_numbers(tmp_path, CPT + [f"data_dir={data_root}"] + overrides, crash_at)


def test_killed_merging_run_resumes_to_the_same_numbers(tmp_path, data_root, monkeypatch):
    """OPCM killed inside the second dataset, after one merge: θ₀, the merged weights, λ and the
    norms' running sum, the earlier heads and the individual scores come out the same."""
    monkeypatch.setenv("CL_FMNIST_DIR", str(data_root / "fashion-mnist"))
    overrides = ["experiment=opcm_multidataset", "debug=smoke", "strategy._target_=tests.helpers.CrashingOPCM",
                 "trainer.batch_size=16", "trainer.checkpoint_every=2", "trainer.log_every=1", "evaluation.every=2"]
    assert_resumes_to_the_same_numbers(tmp_path, overrides, 8)


def assert_resumes_to_the_same_numbers(tmp_path, overrides, crash_at):
    try:
        Crash.crash_at = None
        reference = run_inprocess(overrides, tmp_path / "ref")
        Crash.crash_at = crash_at
        with pytest.raises(KeyboardInterrupt):
            run_inprocess(overrides, tmp_path / "killed")
    finally:
        Crash.crash_at = None
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "last.pt").exists() and not (killed / "results.json").exists()
    cfg, state = load_resume(compose(overrides), killed, [])
    assert state["position"]["iteration"] < crash_at
    resumed = run(cfg, killed, resume_state=state, console=False)
    assert resumed == reference
    assert json.loads((killed / "results.json").read_text()) == read_results(tmp_path / "ref")
    assert comparable(read_events(killed)) == comparable(read_events(tmp_path / "ref"))


class SignalAtER(ER):
    """ER that sends itself SIGTERM after optimizer step `SignalAtER.at` (set by the test): the
    engine stops after the next step, the way a SLURM preemption arrives."""

    at: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def after_optimizer_step(self):
        super().after_optimizer_step()
        self.steps += 1
        if self.steps == SignalAtER.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stop_at", [6, 12], ids=["first-epoch-end", "experience-end"])
def test_stopped_at_an_epoch_end_resumes_to_the_same_numbers(tmp_path, stop_at):
    """A stop at an epoch's last step checkpoints after `after_epoch` (and, at the last epoch,
    before `after_experience`); the epoch-end evaluation then happens exactly once, after
    those hooks, whether the run was stopped there or not. SMALL: 6 steps per epoch, 2 epochs."""
    overrides = SMALL + ["strategy._target_=tests.test_engine.SignalAtER", "evaluation.every=4"]
    reference = run_inprocess(overrides, tmp_path / "ref")
    try:
        SignalAtER.at = stop_at - 1  # the signal arrives during step stop_at - 1; the engine stops after the next
        with pytest.raises(Interrupted):
            run_inprocess(overrides, tmp_path / "stopped")
    finally:
        SignalAtER.at = None
    cfg, state = load_resume(compose(overrides), tmp_path / "stopped", [])
    assert state["position"]["iteration"] == stop_at and state["position"]["phase"] == "mid"
    assert run(cfg, tmp_path / "stopped", resume_state=state, console=False) == reference
    assert comparable(read_events(tmp_path / "stopped")) == comparable(read_events(tmp_path / "ref"))


@pytest.mark.parametrize("setting", ["class", "task"])
def test_last_trace_point_of_an_experience_is_the_model_the_matrix_scores(tmp_path, setting):
    """A strategy that changes its model in `after_experience` (here: the table of predictions)
    is traced after that hook at the experience's last iteration, so the trace's last point
    equals the accuracy matrix's row (the subset is the whole eval split here)."""
    from cl import checkpoint, engine
    from cl.evaluation import Evaluation, Evaluator
    from cl.loggers import RunLogger
    from tests.test_evaluator import TableStrategy, stream

    s, strategy = stream(setting), TableStrategy()
    ev = Evaluator(s, strategy, Evaluation(every=1, subset=1000))
    engine.train(s, strategy, ev, RunLogger([]), engine.Trainer(epochs=2, batch_size=2),
                 checkpoint.Checkpointer(tmp_path), seed=0)
    res = ev.results()
    for i, end in enumerate(res["continual_evaluation"]["experience_ends"]):
        for j in range(i + 1):
            last = [a for it, a in ev.trace[j] if it <= end][-1]
            assert last == res["accuracy_matrix"][i][j], (i, j)


def test_resume_with_a_different_config_lists_the_keys(tmp_path):
    from cl.errors import UserError

    run_inprocess(SMALL, tmp_path / "r")
    with pytest.raises(UserError, match="optimizer.lr"):
        load_resume(compose(SMALL + ["optimizer.lr=0.5"]), tmp_path / "r", ["optimizer.lr"])
    with pytest.raises(UserError, match="no config.yaml"):
        load_resume(compose(SMALL), tmp_path / "nothing", [])


def test_epochs_per_experience(tmp_path):
    """trainer.epochs as a list trains experience i for epochs[i] epochs (TRACE's recipe)."""
    results = run_inprocess(["experiment=finetune_smollm2", "debug=smoke", "scenario.train_size=8",
                             "trainer.batch_size=4", "trainer.epochs=[1,3,1,2,1]"], tmp_path / "run")
    assert results["iterations"] == 2 * (1 + 3 + 1 + 2 + 1)
    assert results["protocol"]["epochs"] == [1, 3, 1, 2, 1]
    from cl.engine import Trainer
    from cl.errors import UserError

    with pytest.raises(UserError, match="a list of them"):
        Trainer(epochs=[1, 0])
    with pytest.raises(UserError, match="one per experience"):
        Trainer(epochs=[1]).epochs_at(1)

