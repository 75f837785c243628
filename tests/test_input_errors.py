"""Bad input from the command line: exit status 2 and one sentence naming the key, the closest valid
key or the bad value (typos in any group and under any preset, wrong types, values that would train
on nothing, broken instruction records). Keys and values are refused before Hydra starts, so a
refused run leaves no folder behind."""
from __future__ import annotations

import json
import re

import pytest

from cl.checks import check_overrides
from cl.errors import UserError
from scenarios.instruction import load_task
from tests.conftest import CONF, cli

INSTRUCTION = ["debug=smoke", "scenario=instruction_suite", "model=tiny_llama", "strategy=finetune"]


def task(train: str) -> str:
    return f"scenario.tasks=[{{name: t, train: '{{d}}/{train}', test: '{{d}}/ok.jsonl'}}]"


# (arguments, refused before Hydra starts, words the one sentence must contain)
BAD_INPUTS = [
    (["trainer.epoch=2"], True, ["trainer.epoch is not a setting", "did you mean trainer.epochs?"]),
    (["strategy.mem_sise=10"], True, ["strategy.mem_sise is not a setting", "did you mean strategy.mem_size?"]),
    (["experiment=mos_cifar100", "strategy.ffn_nm=8"], True, ["strategy.ffn_nm", "did you mean strategy.ffn_num?"]),
    (["+trainer.epoch=2"], True, ["trainer.epoch is not a setting", "did you mean trainer.epochs?"]),
    (["+foo=1"], True, ["foo is not a setting"]),
    (["-m", "trainer.epoch=1,2"], True, ["trainer.epoch is not a setting", "did you mean trainer.epochs?"]),
    (["seed=1.5"], True, ["seed must be an integer", "got 1.5"]),
    (["seed=-1"], True, ["seed must be an integer", "4294967295", "got -1"]),
    (["debug=smoke", "+strategy.mem_sise=10"], False, ["strategy.mem_sise is not a parameter",
                                                       "did you mean strategy.mem_size?"]),
    (["debug=smoke", "scenario.validation=1.5"], False, ["scenario.validation must be a fraction in [0, 1)",
                                                         "got 1.5"]),
    (["debug=smoke", "scenario.validation=0.95"], False, ["Experience 0", "has no training samples",
                                                          "scenario.validation"]),
    (["debug=smoke", "scenario.base=20"], False, ["scenario.base=20 is more than the 10 classes",
                                                  "scenario.base from 0 to 10"]),
    (["debug=smoke", "scenario.class_order=[0,1,2,3,4,5,6,7,8,12]"], False,
     ["scenario.class_order must be a permutation", "12 is not a class", "9 missing"]),
    ([*INSTRUCTION, task("empty.json")], False, ["{d}/empty.json holds no records"]),
    ([*INSTRUCTION, task("null_output.json")], False, ["{d}/null_output.json record at index 1 has output: null",
                                                        "fields.output"]),
    ([*INSTRUCTION, task("bad_line2.jsonl")], False, ["{d}/bad_line2.jsonl line 2 is not valid JSON"]),
]


@pytest.fixture(scope="module")
def instruction_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("instructions")
    good = {"instruction": "Answer with a single word.", "input": "Is the sky blue?", "output": "yes"}
    (d / "ok.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    (d / "empty.json").write_text("[]")
    (d / "null_output.json").write_text(json.dumps([good, {**good, "output": None}]))
    (d / "bad_line2.jsonl").write_text(json.dumps(good) + "\n" + '{"instruction": "a", oops}\n')
    return d


def case_id(args: list[str]) -> str:
    file = re.search(r"train: '\{d\}/([\w.]+)'", args[-1])
    return f"train file {file.group(1)}" if file else " ".join(args)


@pytest.mark.parametrize("args,before_hydra,words", BAD_INPUTS, ids=[case_id(a[0]) for a in BAD_INPUTS])
def test_bad_input_is_one_sentence_with_exit_status_2(args, before_hydra, words, instruction_files, tmp_path):
    out = tmp_path / "x"
    args = [a.replace("{d}", str(instruction_files)) for a in args]
    r = cli([*args, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert lines[0].startswith("error: ")
    for w in words:
        assert w.replace("{d}", str(instruction_files)) in lines[0], (w, lines[0])
    if before_hydra:
        assert not out.exists()


@pytest.mark.slow  # composes every preset twice (10 s)
def test_typos_are_found_under_every_preset_and_valid_commands_pass():
    """In-process (the check composes the config without starting Hydra): every preset's own command passes,
    and a typo under it, in a sweep, in Optuna's syntax or in a nested group, is named with the closest key."""
    for preset in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        check_overrides([f"experiment={preset}"])
        with pytest.raises(UserError, match=re.escape("trainer.epoch is not a setting; did you mean trainer.epochs?")):
            check_overrides([f"experiment={preset}", "trainer.epoch=2"])
    check_overrides(["-m", "experiment=er_splitmnist,finetune_cifar100", "optimizer.lr=0.01,0.1", "seed=range(0,3)",
                     "hydra.sweep.dir=somewhere", "hydra/launcher=basic", "resume=anything"])
    check_overrides(["-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log,interval(0.001,0.1))",
                     "trainer.batch_size=tag(int,interval(16,64))", "strategy=adab2n", "strategy@strategy.base=derpp"])
    for argv, sentence in (
        (["-m", "hydra/sweeper=optuna", "optimizer.lr=interval(-1,0.1)"], "optimizer.lr must be positive, got -1.0."),
        (["strategy=adab2n", "strategy.base.mem_sise=8"], "did you mean strategy.base.mem_size?"),
        (["~trainer.epoch"], "trainer.epoch is not a setting; did you mean trainer.epochs?"),
        (["trainer.lr=0.1"], "trainer.lr is not a setting; did you mean optimizer.lr?"),
        (["seed=0,1", "seeds=2"], "seeds is not a setting; did you mean seed?"),
        (["trainer.epochs=[2,1.5]"], "trainer.epochs must be a positive integer or a list of them"),
        (["trainer.precision=64"], "trainer.precision must be one of 32, bf16, 16, not '64'."),
        (["evaluation.every=-1"], "evaluation.every must be a non-negative integer, got -1."),
        (["+evaluation.foo=1"], "evaluation.foo is not a setting; the settings of evaluation are every, subset"),
    ):
        with pytest.raises(UserError, match=re.escape(sentence)):
            check_overrides(argv)


def test_instruction_records_are_named_by_line_or_index(tmp_path):
    """JSONL lines count from 1 with blank lines included; a JSON list names the record's index."""
    fields = {"instruction": "instruction", "input": "input", "output": "output"}
    good = {"instruction": "Answer with a single word.", "input": "Is the sky blue?", "output": "yes"}
    (tmp_path / "test.jsonl").write_text(json.dumps(good))
    cases = [
        ("a.jsonl", f"{json.dumps(good)}\n\n{json.dumps({**good, 'output': None})}\n", "a.jsonl line 3 has output: null"),
        ("b.jsonl", f"\n{json.dumps(good)}\n{json.dumps({**good, 'output': ' '})}", "b.jsonl line 3 has an empty 'output'"),
        ("c.json", json.dumps([good, good, {**good, "input": "", "instruction": ""}]),
         "c.json record at index 2 has an empty prompt"),
        ("d.jsonl", f"{json.dumps(good)}\n[1, 2]\n", "d.jsonl line 2 is not a JSON object"),
        ("e.json", json.dumps({"data": [good, {**good, "instruction": None}]}), "e.json record at index 1 has instruction: null"),
    ]
    for name, text, sentence in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=re.escape(sentence)):
            load_task({"train": str(tmp_path / name), "test": str(tmp_path / "test.jsonl")}, fields, 0, None, None)
    # Alpaca-style records leave the input empty on purpose: still accepted
    (tmp_path / "alpaca.json").write_text(json.dumps([{**good, "input": ""}]))
    _, train, _, _ = load_task({"train": str(tmp_path / "alpaca.json"), "test": str(tmp_path / "test.jsonl")},
                               fields, 0, None, None)
    assert train == [("", "Answer with a single word.", "yes")]
