"""HFT's defining properties: half of every block frozen (0.50 of block parameters on a
multi-head Llama), frozen tensors bit-identical after a task and without .grad, the
optimizer over trainable parameters only, and a per-task selection reproducible from
its seed."""
from __future__ import annotations

import pytest
import torch

from cl.models.causal_lm import CausalLM
from scenarios.instruction import instruction_stream
from strategies.hft import HFT, decoder_layers, draw_half
from tests.helpers import train_experience


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay would move any weight it saw


@pytest.fixture()
def stream():
    return instruction_stream([{"generator": "sentiment"}, {"generator": "arithmetic"}, {"generator": "uppercase"}],
                              tokenizer="tiny", train_size=8, test_size=2, retention={"prompts": []})


def make(stream, seed=0, **kw):
    torch.manual_seed(0)
    strategy = HFT(CausalLM("tiny"), adamw, seed=seed, **kw)
    strategy.setup(stream)
    return strategy


def test_half_of_the_block_parameters_are_frozen(stream):
    strategy = make(stream)
    for exp in stream:
        strategy.before_experience(exp)
        assert strategy.frozen_fraction[-1] == pytest.approx(0.5, abs=0.02)
        for layer, chosen in zip(decoder_layers(strategy.model), strategy.selections[-1]):
            assert len(chosen["attention"]) == 2 and len(chosen["norm"]) == 1
        counts = sorted(len(c["feed_forward"]) for c in strategy.selections[-1])
        assert counts == [1, 1, 2, 2]  # ⌊L/2⌋ of the 4 layers freeze 2 of gate/up/down, the others 1


def test_frozen_tensors_are_bit_identical_after_a_task_and_trainable_ones_moved(stream):
    strategy = make(stream)
    strategy.before_experience(stream[0])
    frozen = {id(p): p.detach().clone() for p in strategy.frozen}
    trainable = {id(p): p.detach().clone() for p in strategy.parameters_to_optimize()}
    train_experience(strategy, stream[0], steps=5)
    assert all(torch.equal(p, frozen[id(p)]) for p in strategy.frozen)
    moved = [not torch.equal(p, trainable[id(p)]) for p in strategy.model.parameters() if id(p) in trainable]
    assert all(moved)


def test_frozen_parameters_get_no_grad_and_the_optimizer_holds_only_trainable_ones(stream):
    strategy = make(stream)
    strategy.before_experience(stream[0])
    optimizer, _ = strategy.configure_optimizer(stream[0])
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in strategy.model.parameters() if p.requires_grad}
    assert not in_optimizer & {id(p) for p in strategy.frozen}
    strategy.training_step(next(stream[0].train.batches(4))).backward()
    assert all(p.grad is None for p in strategy.frozen)
    assert all(p.grad is not None for p in strategy.model.parameters() if p.requires_grad)


def test_the_selection_differs_between_tasks_and_is_reproducible_from_the_seed(stream):
    a, b, c = make(stream, seed=0), make(stream, seed=0), make(stream, seed=1)
    for s in (a, b, c):
        for exp in stream:
            s.before_experience(exp)
    assert a.selections == b.selections
    assert a.selections[0] != a.selections[1] != a.selections[2]
    assert a.selections != c.selections
    assert draw_half(4, 7) == draw_half(4, 7) and draw_half(4, 7) != draw_half(4, 8)
    # a new task unfreezes what it did not draw: only the current half is frozen
    s = make(stream)
    s.before_experience(stream[0])
    first = {id(p) for p in s.frozen}
    s.before_experience(stream[1])
    assert {id(p) for p in s.model.parameters() if not p.requires_grad} == {id(p) for p in s.frozen} != first


def test_a_moved_frozen_tensor_is_caught_at_the_task_end(stream):
    strategy = make(stream)
    strategy.before_experience(stream[0])
    with torch.no_grad():
        strategy.frozen[0].add_(1.0)
    with pytest.raises(RuntimeError, match="frozen tensors changed"):
        strategy.after_experience(stream[0])


def test_embed_policy_freeze_freezes_embeddings_and_head(stream):
    strategy = make(stream, embed_policy="freeze")
    strategy.before_experience(stream[0])
    lm = strategy.model.lm
    assert not lm.get_input_embeddings().weight.requires_grad and not lm.get_output_embeddings().weight.requires_grad
    default = make(stream)
    default.before_experience(stream[0])
    assert default.model.lm.get_input_embeddings().weight.requires_grad
