"""Trainer options, each checked for correctness on the CPU: gradient accumulation,
bf16 autocast and torch.compile."""
from __future__ import annotations

import torch

from cl.strategy import Strategy
from tests.conftest import read_events, run_inprocess

SMALL = ["debug=smoke", "strategy=finetune", "scenario.max_per_class=30", "trainer.epochs=2", "trainer.log_every=1",
         "optimizer=sgd", "optimizer.lr=0.1"]


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["event"] == "train"]


def test_accumulating_two_half_batches_is_one_full_batch(tmp_path):
    """Batch 16 in one step, and batch 8 accumulated over 2 micro-batches: the same steps,
    including the shorter last step of each epoch (24 samples per experience: 16 + 8)."""
    full = run_inprocess(SMALL + ["trainer.batch_size=16"], tmp_path / "full")
    acc = run_inprocess(SMALL + ["trainer.batch_size=8", "trainer.accumulate_grad_batches=2"], tmp_path / "acc")
    assert full["iterations"] == acc["iterations"]
    assert torch.allclose(torch.tensor(losses(tmp_path / "acc")), torch.tensor(losses(tmp_path / "full")), rtol=1e-5)
    assert full["accuracy_matrix"] == acc["accuracy_matrix"]
    # and it is not a no-op: without accumulation, batch 8 takes other steps
    small = run_inprocess(SMALL + ["trainer.batch_size=8"], tmp_path / "small")
    assert small["iterations"] > full["iterations"]


class RecordDtype(Strategy):
    """Finetuning that records the dtype of the logits it trains and evaluates on, and
    whether the model it trains is compiled."""

    seen: set = set()
    compiled: bool = False

    def training_step(self, batch):
        logits = self.forward(batch.x, batch.t)
        RecordDtype.seen.add(("train", logits.dtype))
        RecordDtype.compiled = getattr(self.model, "_compiled_call_impl", None) is not None
        return torch.nn.functional.cross_entropy(logits, batch.y)

    def predict(self, batch):
        logits = super().predict(batch)
        RecordDtype.seen.add(("eval", logits.dtype))
        return logits


def test_bf16_autocast_trains_in_bf16_and_lands_near_float32(tmp_path):
    RecordDtype.seen = set()
    bf16 = run_inprocess(SMALL + ["trainer.batch_size=8", "trainer.precision=bf16",
                                  "strategy._target_=tests.test_trainer_options.RecordDtype"], tmp_path / "bf16")
    assert RecordDtype.seen == {("train", torch.bfloat16), ("eval", torch.bfloat16)}
    fp32 = run_inprocess(SMALL + ["trainer.batch_size=8"], tmp_path / "fp32")
    lb, lf = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert all(x == x for x in lb) and lb != lf  # finite, and really another precision
    assert abs(sum(lb) / len(lb) - sum(lf) / len(lf)) < 0.05 * sum(lf) / len(lf)
    assert abs(bf16["metrics"]["final_average_accuracy"] - fp32["metrics"]["final_average_accuracy"]) <= 0.2


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    args = SMALL + ["trainer.batch_size=8", "scenario.increment=5", "trainer.epochs=1"]  # 2 experiences: quick
    target = "strategy._target_=tests.test_trainer_options.RecordDtype"
    compiled = run_inprocess(args + ["trainer.compile=true", target], tmp_path / "compiled")
    assert RecordDtype.compiled
    eager = run_inprocess(args + [target], tmp_path / "eager")
    assert not RecordDtype.compiled
    assert torch.allclose(torch.tensor(losses(tmp_path / "compiled")), torch.tensor(losses(tmp_path / "eager")),
                          rtol=1e-4)
    assert compiled["accuracy_matrix"] == eager["accuracy_matrix"]
