"""Continual instruction tuning: a stream of instruction tasks for causal LMs.

A task's examples come from one of three sources (a task entry in the config):

- `generator: <name>`: the built-in suite, generated offline from a seed (below);
- `path: <folder>` holding train/test files, or `train: <file>`, `test: <file>`:
  local JSON (a list of records) or JSONL, read through the field mapping
  `fields: {instruction: ..., input: ..., output: ...}` (TRACE: `{instruction: prompt,
  input: null, output: answer}`);
- `hub: <dataset name>` (+ `config`, `train_split`, `test_split`): an HF `datasets`
  dataset, for users with a network.

Each example becomes one user turn, `prompt_format` of its input and instruction
(by default the input, then the instruction as the last line, as CoIN writes
them), put through the tokenizer's chat template with the generation prompt; the
response is the output's tokens plus eos. Only response tokens carry loss.

The built-in suite (each generator draws distinct train and test items):

| task | instruction (the template LCIA groups by) | metric |
|---|---|---|
| sentiment | Answer with a single word. | exact |
| word_reversal | Reverse the order of the words in the sentence. | rouge_l |
| number_to_word | Answer with a single word. | exact |
| arithmetic | Compute the expression and reply with the number only. | exact |
| uppercase | Answer with a single word. | exact |
| category | Answer with a single word. | exact |
| sort_words | Sort the words in alphabetical order. | rouge_l |

In the default suite (the first five), tasks 1, 3 and 5 share their template; 2 and
4 have their own (LCIA groups {1,3,5}, {2}, {4} at τ = 0.9). For the two-phase protocol the tasks split into
two triples of the same shape (a word-level classification, a word-order task
scored by ROUGE-L, a single-word transformation; LCIA groups {1,3}, {2} in
each): tuning sentiment, word_reversal, number_to_word; evaluation category,
sort_words, uppercase.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch

from cl.errors import UserError
from cl.stream import TEXT_METRICS, Experience, RetentionPrompts, Stream, TokenData

SINGLE_WORD = "Answer with a single word."
POSITIVE = ["wonderful", "great", "delightful", "excellent", "friendly", "lovely", "superb", "pleasant", "brilliant",
            "charming", "tasty", "fantastic", "enjoyable", "amazing", "cozy", "generous"]
NEGATIVE = ["terrible", "awful", "rude", "boring", "dreadful", "bland", "horrible", "disappointing", "dirty", "noisy",
            "slow", "poor", "unpleasant", "cold", "stale", "broken"]
SUBJECTS = ["the food", "the service", "the room", "the staff", "the movie", "the music", "the book", "the coffee",
            "the hotel", "the show", "the game", "the trip"]
WORDS = ["apple", "river", "garden", "window", "planet", "silver", "forest", "candle", "yellow", "bridge", "winter",
         "market", "pencil", "island", "rocket", "thunder", "violet", "harbor", "meadow", "lantern", "castle", "desert",
         "falcon", "marble", "orange", "pepper", "ribbon", "shadow", "tunnel", "valley", "wagon", "zebra", "anchor",
         "button", "cotton", "dragon", "engine", "feather", "guitar", "hammer", "jacket", "kettle", "ladder", "mirror",
         "needle", "oyster", "pillow", "quartz", "saddle", "tomato", "velvet", "walnut", "basket", "cactus", "dollar"]
ANIMALS = ["cat", "dog", "horse", "tiger", "rabbit", "eagle", "shark", "zebra", "camel", "parrot", "wolf", "frog",
           "whale", "monkey", "goat", "owl"]
FOODS = ["bread", "cheese", "pasta", "banana", "soup", "rice", "cake", "pizza", "carrot", "butter", "salad", "cookie",
         "potato", "noodles", "grape", "honey"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def _sentiment(rng: random.Random):
    positive = rng.random() < 0.5
    words = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    a, b = rng.sample(SUBJECTS, 2)
    text = f"Review: {a} was {words[0]} and {b} was {words[1]}.\nIs this review positive or negative?"
    return text, SINGLE_WORD, "positive" if positive else "negative"


def _word_reversal(rng: random.Random):
    words = rng.sample(WORDS, rng.randint(3, 5))
    return " ".join(words), "Reverse the order of the words in the sentence.", " ".join(reversed(words))


def _number_to_word(rng: random.Random):
    n = rng.randint(0, 99)
    question = rng.choice(["Write the number {n} in English.", "How is {n} written in words?", "Spell out the number {n}."])
    return question.format(n=n), SINGLE_WORD, number_word(n)


def _arithmetic(rng: random.Random):
    a, b = rng.randint(0, 50), rng.randint(0, 49)
    op = rng.choice("+-")
    a, b = (a, b) if op == "+" or a >= b else (b, a)
    return f"{a} {op} {b}", "Compute the expression and reply with the number only.", str(a + b if op == "+" else a - b)


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word (2-3 syllables), so upper-casing is a skill, not a lookup."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def _uppercase(rng: random.Random):
    word = pseudo_word(rng)
    return f"Write the word '{word}' in upper case.", SINGLE_WORD, word.upper()


def _category(rng: random.Random):
    animals = rng.random() < 0.5
    items = rng.sample(ANIMALS if animals else FOODS, 3)
    return f"List: {', '.join(items)}.\nAre these animals or foods?", SINGLE_WORD, "animals" if animals else "foods"


def _sort_words(rng: random.Random):
    words = rng.sample(WORDS, rng.randint(3, 5))
    return " ".join(words), "Sort the words in alphabetical order.", " ".join(sorted(words))


GENERATORS = {"sentiment": (_sentiment, "exact"), "word_reversal": (_word_reversal, "rouge_l"),
              "number_to_word": (_number_to_word, "exact"), "arithmetic": (_arithmetic, "exact"),
              "uppercase": (_uppercase, "exact"), "category": (_category, "exact"),
              "sort_words": (_sort_words, "rouge_l")}

GENERAL_PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "Give me a synonym for happy.", "What is the largest planet in our solar system?",
    "How many days are in a week?", "Translate 'thank you' into Spanish.", "What do bees make?",
    "Write a short greeting for a friend.", "What is the opposite of cold?", "Name a fruit that is yellow.",
    "What is the chemical symbol for water?", "How many legs does a spider have?", "What color is the sky on a clear day?",
    "Suggest a name for a pet cat.", "What is 7 times 8?", "Which ocean is the largest?",
    "Describe the moon in one sentence.", "What language is spoken in Brazil?", "What is the freezing point of water?",
    "Name an animal that lives in the sea.", "What is the main ingredient of bread?", "Who painted the Mona Lisa?",
]


def generate_examples(name: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    """`n` distinct (input, instruction, output) examples of a built-in task."""
    if name not in GENERATORS:
        raise UserError(f"generator={name} is not a built-in task; choose one of {', '.join(GENERATORS)}.")
    make = GENERATORS[name][0]
    rng = random.Random(f"{name}:{seed}")
    seen, out = set(), []
    for _ in range(200 * n):
        ex = make(rng)
        if ex[0] not in seen:
            seen.add(ex[0])
            out.append(ex)
            if len(out) == n:
                return out
    return out  # the task has fewer distinct items than asked for


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """The records of a JSON list (or {"data": [...]}) or a JSONL file, each with where it is:
    `line n` (JSONL, lines counted from 1, blank lines included) or `record at index i` (JSON)."""
    if not path.is_file():
        raise UserError(f"Instruction file {path} does not exist; fix the task's path/train/test entry.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not valid JSON ({e.msg}); fix that line "
                                    "(JSONL holds one JSON object per line).") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix the file or convert it to "
                            "one record per line with .jsonl.") from None
        if isinstance(data, dict):  # {"data": [...]} or similar: the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            raise UserError(f"{path} holds no list of records; expected [{{...}}, ...] or one JSON object per line.")
        records = [(f"record at index {i}", r) for i, r in enumerate(data)]
    if not records:
        raise UserError(f"{path} holds no records; add examples to it (a task needs train and test examples).")
    return records


def _find_split(folder: Path, split: str) -> Path:
    names = {"train": ["train"], "test": ["test", "eval", "validation", "dev"]}[split]
    for name in names:
        for ext in (".jsonl", ".json"):
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    raise UserError(f"No {split} file under {folder}; expected {names[0]}.json or {names[0]}.jsonl there.")


def _mapped(records: list[tuple[str, dict]], fields: dict, where: str) -> list[tuple[str, str, str]]:
    """(input, instruction, output) of each record through `fields`. A field the mapping reads that is
    missing or null, an empty output and an empty prompt (input and instruction) are refused."""
    out = []
    for at, r in records:
        if not isinstance(r, dict):
            raise UserError(f"{where} {at} is not a JSON object ({type(r).__name__}); each record must be "
                            "{\"instruction\": ..., \"input\": ..., \"output\": ...} or the fields scenario.fields names.")

        def get(key):
            name = fields.get(key)
            if name is None:
                return ""
            if name not in r:
                raise UserError(f"{where} {at} has no field {name!r} (scenario fields.{key}); "
                                f"its fields are {sorted(r)[:8]}; set fields.{key} to one of them.")
            if r[name] is None:
                raise UserError(f"{where} {at} has {name}: null (scenario fields.{key}); give it a value or "
                                "remove the record.")
            return str(r[name])

        example = (get("input"), get("instruction"), get("output"))
        if not example[2].strip():
            raise UserError(f"{where} {at} has an empty {fields.get('output')!r} (scenario fields.output), so it "
                            "teaches nothing; give it an answer or remove the record.")
        if not (example[0] + example[1]).strip():
            named = " and ".join(repr(fields[k]) for k in ("input", "instruction") if fields.get(k))
            raise UserError(f"{where} {at} has an empty prompt ({named}); give it an instruction or remove the record.")
        out.append(example)
    return out


def _hub_records(task: dict, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise UserError("hub tasks need the datasets package: pip install datasets.") from None
    try:
        ds = datasets.load_dataset(task["hub"], task.get("config"), split=task.get(f"{split}_split", split))
    except Exception as e:  # noqa: BLE001 - offline, missing or private datasets all get one answer
        raise UserError(f"Could not load the hub dataset {task['hub']} ({type(e).__name__}); on an offline machine "
                        "download it elsewhere and point the task at local files with path: <folder>.") from None
    return [(f"record at index {i}", dict(r)) for i, r in enumerate(ds)]


def load_task(task: dict, fields: dict, seed: int, n_train: int | None, n_test: int | None):
    """(train examples, test examples, metric) of one task entry."""
    name = task.get("name") or task.get("generator") or task.get("hub") or Path(str(task.get("path", "task"))).name
    fields = {**fields, **(task.get("fields") or {})}
    if task.get("generator"):
        metric = task.get("metric") or GENERATORS.get(task["generator"], (None, "exact"))[1]
        n_train = n_train or task.get("train_size", 500)
        n_test = n_test or task.get("test_size", 100)
        examples = generate_examples(task["generator"], n_train + n_test, seed)
        train, test = examples[:n_train], examples[n_train:]
        if not test:
            raise UserError(f"Task {name} has only {len(examples)} distinct examples; lower its train size.")
    elif task.get("hub"):
        metric = task.get("metric", "exact")
        train = _mapped(_hub_records(task, "train"), fields, task["hub"])
        test = _mapped(_hub_records(task, "test"), fields, task["hub"])
    elif task.get("path") or task.get("train"):
        metric = task.get("metric", "exact")
        folder = Path(str(task["path"])).expanduser() if task.get("path") else None
        train_p = Path(str(task["train"])).expanduser() if task.get("train") else _find_split(folder, "train")
        test_p = Path(str(task["test"])).expanduser() if task.get("test") else _find_split(folder, "test")
        train = _mapped(_read_records(train_p), fields, str(train_p))
        test = _mapped(_read_records(test_p), fields, str(test_p))
    else:
        raise UserError(f"Task entry {dict(task)} names no source; give it generator:, path:, train:/test: or hub:.")
    rng = random.Random(seed)
    if n_train and len(train) > n_train:
        train = rng.sample(train, n_train)
    if n_test and len(test) > n_test:
        test = rng.sample(test, n_test)
    if metric not in TEXT_METRICS:
        raise UserError(f"Task {name} has metric {metric!r}; use one of {', '.join(TEXT_METRICS)}.")
    return name, train, test, metric


def tokenize(tokenizer, examples: Sequence[tuple[str, str, str]], prompt_format: str, max_length: int,
             system: str | None = None) -> TokenData:
    """Chat-template prompts plus response tokens (answer + eos); prompts are cut from
    the left if a sequence exceeds `max_length` (the template's end is kept)."""
    seqs, plens, answers, instructions = [], [], [], []
    eos = tokenizer.eos_token_id
    for inp, instruction, output in examples:
        text = prompt_format.format(input=inp, instruction=instruction).strip()
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        response = tokenizer(output, add_special_tokens=False)["input_ids"][: max_length // 2] + [eos]
        prompt = prompt[-(max_length - len(response)):]
        seqs.append(torch.tensor(prompt + response, dtype=torch.long))
        plens.append(len(prompt))
        answers.append(output)
        instructions.append(instruction.strip().splitlines()[-1] if instruction.strip() else text.splitlines()[-1])
    return TokenData(seqs, torch.tensor(plens), answers, instructions, tokenizer.pad_token_id)


def retention_prompts(tok, retention: dict | None, max_length: int = 256,
                      system: str | None = None) -> RetentionPrompts | None:
    """The retention probe's prompts (`retention`: size, prompts, max_new_tokens, batch_size; the
    24 built-in general prompts by default), or None when it lists none."""
    retention = dict(retention or {})
    prompts = retention.get("prompts", GENERAL_PROMPTS)
    if not prompts:
        return None
    examples = [("", p, "") for p in prompts[: retention.get("size") or len(prompts)]]
    return RetentionPrompts(tokenize(tok, examples, "{instruction}", max_length, system),
                            retention.get("max_new_tokens", 32), retention.get("batch_size", 16))


def instruction_stream(
    tasks: Sequence[dict],
    tokenizer: str = "tiny",
    cache_dir: str = "data/models",
    fields: dict | None = None,
    prompt_format: str = "{input}\n{instruction}",
    system: str | None = None,
    max_length: int = 256,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    name: str = "instructions",
    retention: dict | None = None,
    root: str | None = None,
    max_new_tokens: int | None = None,
) -> Stream:
    """One experience per task, in the order given; `tokenizer` is the model's
    `pretrained` (the same tokenizer the model decodes with); relative task paths
    are under `root`. `max_new_tokens` caps generation (a task entry's own
    `max_new_tokens` overrides it); by default a sample generates its reference's
    length + 2 tokens."""
    from cl.models.causal_lm import load_tokenizer

    if not tasks:
        raise UserError("scenario.tasks is empty; list at least one instruction task.")
    fields = dict(fields or {"instruction": "instruction", "input": "input", "output": "output"})
    if root is not None:  # relative task files live under root
        tasks = [{**t, **{k: str(Path(str(root)).expanduser() / str(t[k])) for k in ("path", "train", "test")
                          if t.get(k) and not Path(str(t[k])).expanduser().is_absolute()}} for t in map(dict, tasks)]
    loaded = [load_task(dict(task), fields, seed + 7919 * i, train_size, test_size) for i, task in enumerate(tasks)]
    tok = load_tokenizer(tokenizer, cache_dir)  # after the data, so missing data is named first
    if tok.chat_template is None:
        raise UserError(f"The tokenizer of {tokenizer} has no chat template; use an instruction-tuned model "
                        "or one whose tokenizer_config.json sets chat_template.")
    caps = [dict(task).get("max_new_tokens", max_new_tokens) for task in tasks]
    for cap in caps:
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise UserError(f"max_new_tokens must be a positive integer or null, got {cap!r}.")
    experiences, names = [], []
    for i, (task_name, train, test, metric) in enumerate(loaded):
        experiences.append(Experience(
            index=i, classes=[], task_label=i, name=task_name, metric=metric, max_new_tokens=caps[i],
            train=tokenize(tok, train, prompt_format, max_length, system).with_task(i),
            eval=tokenize(tok, test, prompt_format, max_length, system).with_task(i)))
        names.append(task_name)
    probe = retention_prompts(tok, retention, max_length, system)
    return Stream(
        experiences=experiences, setting="instruction", name=name, num_classes=0, input_shape=(max_length,),
        modality="instruction", retention=probe,
        info={"tasks": names, "metrics": [e.metric for e in experiences],
              "train_sizes": [len(e.train) for e in experiences], "test_sizes": [len(e.eval) for e in experiences],
              "tokenizer": tokenizer, "prompt_format": prompt_format,
              "max_new_tokens": caps,
              "score": "generated entries: greedy generation scored by each task's metric; every evaluation: "
                       "teacher-forced token accuracy, token loss and exact match of the response tokens"},
    )
