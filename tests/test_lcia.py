"""LCIA: the dynamic-EMA β_t against hand computations (fallback included), θ* replacing
θ at a task's end, TF-IDF instruction grouping and routing, and the group LoRAs."""
from __future__ import annotations

import pytest
import torch

from cl.models.causal_lm import CausalLM
from scenarios.instruction import generate_examples, instruction_stream
from strategies.lcia import LCIA, DynamicEMA, InstructionGroups, pair_similarity
from tests.helpers import train_experience

SUITE = ["sentiment", "word_reversal", "number_to_word", "arithmetic", "uppercase"]


def param(values, grad):
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_beta_matches_a_hand_computation_with_the_fallback():
    w = param([0.0, 0.0], [1.0, 1.0])      # becomes β = 2(1+6)/(4·4) = 0.875
    v = param([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # becomes β = 2(1+6)/(2·4) = 1.75 -> fallback 0.01
    ema = DynamicEMA({"w": w, "v": v}, fallback=0.01)
    ema.update()  # first call: θ* = θ, no previous gradient -> fallback for both
    assert ema.fallbacks == 2 and torch.equal(ema.star["w"], w.detach())
    with torch.no_grad():
        w.copy_(torch.tensor([2.0, 2.0]))  # a = ‖θ − θ*‖₁ = 4
        v.copy_(torch.tensor([2.0 / 3, 2.0 / 3, 2.0 / 3]))  # a = 2
    w.grad = torch.tensor([3.0, 3.0], dtype=torch.float64)  # b = 6, c = ‖(3,3) − (1,1)‖₁ = 4
    v.grad = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)  # b = 6, c = 3
    assert ema.beta("w", w.detach(), w.grad)[0] == pytest.approx(0.875)
    assert ema.beta("v", v.detach(), v.grad) == (0.01, "at_least_one")  # 2·7 / (2·3) = 2.33 ∉ (0, 1)
    ema.update()
    assert torch.allclose(ema.star["w"], torch.tensor([1.75, 1.75], dtype=torch.float64))  # 0.125·0 + 0.875·2
    assert torch.allclose(ema.star["v"], torch.full((3,), 0.01 * 2 / 3, dtype=torch.float64))
    assert (ema.updates, ema.fallbacks) == (4, 3) and ema.fallback_rate == 0.75
    assert ema.reasons == {"no_previous_gradient": 2, "at_least_one": 1, "not_positive_or_undefined": 0}
    assert sum(ema.histogram) == 4
    # a zero gradient change: c = 0 -> β undefined -> fallback
    assert ema.beta("w", w.detach(), w.grad.clone())[1] == "not_positive_or_undefined"


def test_a_fixed_beta_is_the_fixed_ema_baseline():
    w = param([1.0], [1.0])
    ema = DynamicEMA({"w": w}, fixed_beta=0.5)
    ema.update()
    with torch.no_grad():
        w.fill_(3.0)
    ema.update()
    assert ema.star["w"].item() == pytest.approx(2.0) and ema.fallbacks == 0


def test_theta_star_replaces_theta_at_the_end():
    w = param([0.0], [1.0])
    ema = DynamicEMA({"w": w})
    ema.update()
    with torch.no_grad():
        w.fill_(1.0)
    ema.update()
    assert w.item() == 1.0 and ema.star["w"].item() == pytest.approx(0.01)
    ema.replace()
    assert w.item() == pytest.approx(0.01)


def suite_instructions(task):
    return sorted({ex[1] for ex in generate_examples(task, 20, 0)})


def test_grouping_the_suite_gives_shared_template_tasks_one_group():
    groups = InstructionGroups(tau=0.9)
    assigned = [groups.assign(suite_instructions(t)) for t in SUITE]
    assert assigned == [(0, True), (1, True), (0, False), (2, True), (0, False)]  # {1,3,5}, {2}, {4}
    assert pair_similarity("Answer with a single word.", "Answer with a single word.") == pytest.approx(1.0)
    # a lower threshold merges more; τ above the shared pairs' similarity merges nothing
    loose = InstructionGroups(tau=0.1)
    assert [loose.assign(["Answer with one word."])[0], loose.assign(["Answer in one word please."])[0]] == [0, 0]


def test_routing_sends_each_test_task_to_its_group_and_unknown_ones_to_the_newest():
    groups = InstructionGroups(tau=0.9)
    for t in SUITE:
        groups.assign(suite_instructions(t))
    assert [groups.route(suite_instructions(t)) for t in SUITE] == [0, 1, 0, 2, 0]
    unknown = ["Translate the sentence into French."]
    sims = groups.similarities(unknown)
    assert max(sims) < 0.9 and sims.index(max(sims)) == 1  # nearest: word reversal ("sentence")
    assert groups.route(unknown) == 2  # below τ: the newest group, not the nearest
    with pytest.warns(UserWarning, match="stop words"):  # an empty vocabulary is similarity 0, not a crash
        assert pair_similarity("the of and", "and then the") == 0.0


def test_lcia_trains_group_loras_with_dema_only_when_retraining_and_routes_at_test_time():
    torch.manual_seed(0)
    stream = instruction_stream([{"generator": t} for t in SUITE], tokenizer="tiny", train_size=8, test_size=4,
                                retention={"prompts": []})
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
    strategy = LCIA(CausalLM("tiny"), optimizer, lora={"r": 4, "alpha": 8})
    strategy.setup(stream)
    train_experience(strategy, stream[0], steps=3)
    params = dict(strategy.model.named_parameters())
    group0 = {k: p.detach().clone() for k, p in params.items() if ".group0." in k}
    assert group0 and not any(torch.all(p == 0) for k, p in group0.items() if "lora_B" in k)

    # task 2: a new group, initialised from the latest LoRA (group 0), DEMA off
    strategy.before_experience(stream[1])
    params = dict(strategy.model.named_parameters())
    assert strategy.ema is None and strategy.active == "group1"
    assert all(torch.equal(params[k.replace(".group0.", ".group1.")], v) for k, v in group0.items())
    assert all(p.requires_grad == (".group1." in k) for k, p in params.items())
    strategy.configure_optimizer(stream[1])
    strategy.after_experience(stream[1])

    # task 3 shares task 1's template: group 0 is retrained with DEMA, and θ* replaces θ at the end
    strategy.before_experience(stream[2])
    assert strategy.active == "group0" and strategy.ema is not None
    strategy.configure_optimizer(stream[2])
    strategy.model.train()
    for batch in list(stream[2].train.batches(4))[:2]:
        strategy.training_step(batch).backward()
        strategy.optimizer.step()
        strategy.after_optimizer_step()
        strategy.optimizer.zero_grad(set_to_none=True)
    star = {k: v.clone() for k, v in strategy.ema.star.items()}
    live = {k: p.detach().clone() for k, p in strategy.ema.params.items()}
    assert any(not torch.equal(star[k], live[k]) for k in star)  # the EMA lags the live weights
    strategy.after_experience(stream[2])
    assert all(torch.equal(p.detach(), star[k]) for k, p in strategy.ema.params.items())
    results = strategy.results()
    assert results["group_of_task"] == [0, 1, 0] and results["dema_on"] == [False, False, True]
    assert 0 <= results["fallback_rate"] <= 1 and sum(results["beta_histogram"]["counts"]) == 2 * len(star)

    # routing: each test set goes to its group's adapter
    routed = [strategy.route(next(stream[i].eval.batches(4))) for i in range(3)]
    assert routed == ["group0", "group1", "group0"]


def test_lcia_checkpoint_restores_groups_adapters_and_ema():
    torch.manual_seed(0)
    tasks = [{"generator": t} for t in ("sentiment", "arithmetic", "uppercase")]
    stream = instruction_stream(tasks, tokenizer="tiny", train_size=8, test_size=2, retention={"prompts": []})
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731

    def fresh():
        torch.manual_seed(0)
        s = LCIA(CausalLM("tiny"), optimizer, lora={"r": 4, "alpha": 8})
        s.setup(stream)
        return s

    a = fresh()
    for exp in stream:
        train_experience(a, exp, steps=2)
    b = fresh()
    b.load_state_dict(a.state_dict())
    assert b.groups.groups == a.groups.groups and b.active == a.active == "group0"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
