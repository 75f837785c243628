"""LCIA: the dynamic-EMA β_t against hand computations (fallback included), θ* replacing
θ at a task's end (before the task's last continual evaluation), TF-IDF instruction grouping
over every instruction (against the official pair loop), routing per test set, and the group LoRAs."""
from __future__ import annotations

import pytest
import torch

from cl.models.causal_lm import CausalLM
from scenarios.instruction import generate_examples, instruction_stream
from strategies.lcia import LCIA, DynamicEMA, InstructionGroups, set_similarity
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
    assert set_similarity(["Answer with a single word."], ["Answer with a single word."]) == pytest.approx(1.0)
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
        assert set_similarity(["the of and"], ["and then the"]) == 0.0


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


# ---- routing per test set, every instruction, the swap before the last continual evaluation ----------------

SINGLE = "Answer with a single word."
REVERSE = "Reverse the order of the words in the sentence."
COMPUTE = "Compute the expression and reply with the number only."


def hand_stream(train: list[list[str]], test: list[list[str]]):
    """Experiences whose train and test sets carry the given instructions (one example each)."""
    from cl.models.causal_lm import load_tokenizer
    from cl.stream import Experience, Stream
    from scenarios.instruction import tokenize

    tok = load_tokenizer("tiny", "data/models")

    def data(instructions, task):
        return tokenize(tok, [(f"item {k}", x, "ok") for k, x in enumerate(instructions)], "{input}\n{instruction}",
                        64).with_task(task)

    exps = [Experience(index=i, classes=[], task_label=i, train=data(tr, i), eval=data(te, i), name=f"t{i}")
            for i, (tr, te) in enumerate(zip(train, test))]
    return Stream(experiences=exps, setting="instruction", name="hand", num_classes=0, input_shape=(64,))


def test_a_test_set_routes_as_a_whole_for_predict_and_generate():
    """CoIN routes a test file by all its instructions together: a test set mixing the templates of groups 0
    and 1 matches neither (mean similarity 0.5 < τ) and goes to the newest group, every batch of it, although
    each batch alone would match its own group."""
    torch.manual_seed(0)
    stream = hand_stream([[SINGLE], [REVERSE], [COMPUTE]], [[SINGLE, REVERSE], [COMPUTE], [COMPUTE]])
    strategy = LCIA(CausalLM("tiny"), lambda params: torch.optim.SGD(params, lr=0.0), lora={"r": 2, "alpha": 4})
    strategy.setup(stream)
    for exp in stream:
        strategy.before_experience(exp)
        strategy.after_experience(exp)
    assert strategy.groups.groups == [[SINGLE], [REVERSE], [COMPUTE]]
    batches = list(stream[0].eval.batches(1))
    assert [b.extra["instructions"] for b in batches] == [[SINGLE], [REVERSE]]  # one template per batch
    assert strategy.groups.route([SINGLE]) == 0 and strategy.groups.route([REVERSE]) == 1
    assert [strategy.route(b) for b in batches] == ["group2", "group2"]
    assert strategy.route(next(stream[1].eval.batches(1))) == "group2"

    strategy.active = "group1"  # the adapter trained last, so routing to group 2 must switch
    strategy._activate("group1")
    seen = []
    strategy.model.lm.register_forward_pre_hook(lambda module, args: seen.append(module.active_adapter))
    for batch in batches:
        strategy.predict(batch)
        strategy.generate(batch, 2)
    assert seen and set(seen) == {"group2"}
    assert strategy.model.lm.active_adapter == "group1"  # the trained adapter is back afterwards

    # a batch whose instructions are in two test sets that route differently cannot be placed: its own route
    strategy.test_sets.append(frozenset([REVERSE]))
    with pytest.warns(UserWarning, match="several test sets"):
        assert strategy.route(batches[1]) == "group1"
    assert strategy.route(batches[0]) == "group2"  # SINGLE is in one test set only


def test_grouping_uses_every_unique_instruction_unless_capped():
    many = [f"Describe item number {k} in detail." for k in range(100)]
    stream = hand_stream([many], [many[:2]])
    strategy = LCIA(CausalLM("tiny"), lambda params: torch.optim.SGD(params, lr=0.0), lora={"r": 2, "alpha": 4})
    strategy.setup(stream)
    strategy.before_experience(stream[0])
    assert sorted(strategy.groups.groups[0]) == sorted(many)  # all 100, not a sample of 64
    capped = LCIA(CausalLM("tiny"), lambda params: torch.optim.SGD(params, lr=0.0), lora={"r": 2, "alpha": 4},
                  max_instructions=10)
    capped.setup(stream)
    capped.before_experience(stream[0])
    assert len(capped.groups.groups[0]) == 10 and set(capped.groups.groups[0]) <= set(many)


def official_set_similarity(current, stored):
    """LoRASelect.py's loop: for every pair, a TfidfVectorizer(stop_words='english') fit on the two texts,
    the cosine of their rows; the mean over all pairs."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    sims = []
    for x in current:
        for h in stored:
            m = TfidfVectorizer(stop_words="english").fit_transform([x, h])
            sims.append(cosine_similarity(m[0:1], m[1:2])[0][0])
    return sum(sims) / len(sims)


def test_set_similarity_equals_the_official_pairwise_loop():
    import random

    words = ["answer", "word", "single", "reverse", "order", "sentence", "compute", "number", "question", "option",
             "letter", "image", "describe", "brief", "Answer", "numbers", "the", "with", "a", "of"]
    rng = random.Random(0)
    current = [" ".join(rng.choices(words, k=rng.randint(1, 9)) + [words[k % 14]]) + "." for k in range(23)]
    stored = [" ".join(rng.choices(words, k=rng.randint(0, 9)) + [words[k % 14]]) + "?" for k in range(17)]
    current += [SINGLE, SINGLE]  # a repeated instruction
    stored += [SINGLE]
    assert set_similarity(current, stored) == pytest.approx(official_set_similarity(current, stored), rel=1e-12)
    # a text of stop words only against one with content: an all-zero row, cosine 0 (no error in sklearn either)
    stop_only = ["The the of."]
    assert set_similarity(stop_only, [SINGLE]) == official_set_similarity(stop_only, [SINGLE]) == 0.0


def test_the_swap_to_theta_star_precedes_the_tasks_last_continual_evaluation(tmp_path):
    """Task 1 retrains task 0's group with DEMA; its θ ← θ* swap (the lcia_dema event, logged right after it)
    comes before the continual evaluation at the task's last iteration, so the trace shows the weights the
    accuracy matrix scores. Needs the engine to evaluate an experience's end after `after_experience`."""
    from tests.conftest import read_events, run_inprocess

    run_inprocess(["experiment=lcia_smollm2", "debug=smoke", "scenario.train_size=8", "trainer.batch_size=4",
                   "evaluation.every=1", "scenario.retention.size=1",
                   "scenario.tasks=[{generator: sentiment}, {generator: number_to_word}]"], tmp_path / "run")
    events = read_events(tmp_path / "run")
    swap = next(k for k, e in enumerate(events) if e["event"] == "lcia_dema" and e["experience"] == 1)
    assert events[swap]["dema"]
    end = next(e["iteration"] for e in events if e["event"] == "experience_end" and e["experience"] == 1)
    last = [k for k, e in enumerate(events)
            if e["event"] == "eval" and not e["full"] and e["experience"] == 1 and e["iteration"] == end]
    assert last and all(k > swap for k in last)
