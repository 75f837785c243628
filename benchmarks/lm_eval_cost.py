"""The cost of evaluating an instruction stream with long answers, per `evaluation.generate` option.

A real offline instruction set with ~50-word answers: five tasks built from the Debian
manpages-dev pages (system calls and C library functions), each a different question whose
answer is the first 50 words of one section of a page:

    syscalls  "What does the system call X do?"        DESCRIPTION of man2 pages (438 usable)
    library   "What does the library function X do?"   DESCRIPTION of man3 pages (1267)
    returns   "What does X return?"                     RETURN VALUE of man2/man3 pages (512)
    errors    "Which errors can X report?"              ERRORS of man2/man3 pages (545)
    notes     "What should a programmer note about X?"  NOTES of man2/man3 pages (854)

(pages whose section has at least 50 words), so a task can hold up to ~420 training examples.
The tasks are written as JSONL files and read through the scenario's real loader (`path:` tasks).

The same run (fine-tuning SmolLM2-135M, `evaluation.every=0`) is made once per option of
`evaluation.generate` (all, diagonal_and_final, final; `--modes` picks). From each run's
metrics.jsonl it prints the full-evaluation seconds per task (summed over the accuracy-matrix
rows, generation and teacher forcing), the retention probe's seconds, and the share of the
training time the full evaluation takes. The evaluation's cost does not depend on the training
size, the training's does: the goal (under 10% with diagonal_and_final) is about a realistic
training set, hundreds of examples per task, not a handful.

    python benchmarks/lm_eval_cost.py [--train 32] [--test 12] [--modes all,diagonal_and_final,final]
                                      [--model smollm2|tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scenarios.corpora import man_to_text, package_files

ROOT = Path(__file__).resolve().parent.parent
# task: (man sections of manpages-dev, the page section that is the answer, the question)
TASKS = {"syscalls": (("man2",), "DESCRIPTION", "What does the system call {} do?"),
         "library": (("man3",), "DESCRIPTION", "What does the library function {} do?"),
         "returns": (("man2", "man3"), "RETURN VALUE", "What does {} return?"),
         "errors": (("man2", "man3"), "ERRORS", "Which errors can {} report?"),
         "notes": (("man2", "man3"), "NOTES", "What should a programmer note about {}?")}
MODES = ("all", "diagonal_and_final", "final")


def sections(text: str) -> dict[str, str]:
    """A rendered page's sections (unindented upper-case headings) and their text."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.strip() and not line[0].isspace() and line.strip().isupper()]
    return {lines[i].strip(): " ".join(lines[i + 1: (heads[k + 1] if k + 1 < len(heads) else len(lines))])
            for k, i in enumerate(heads)}


def write_tasks(folder: Path, per_task: int, words: int = 50) -> list[dict]:
    """Five JSONL tasks of 50-word answers; returns the scenario's task entries."""
    pages = {}
    for page in sorted(package_files("manpages-dev")):
        if page.name.endswith(".gz") and page.parent.name in ("man2", "man3"):
            roff = gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace")
            if not roff.lstrip().startswith(".so "):
                pages[page] = sections(man_to_text(roff))
    tasks = []
    for name, (dirs, heading, question) in TASKS.items():
        records = []
        for page, parts in pages.items():
            body = parts.get(heading, "").split()
            if page.parent.name in dirs and len(body) >= words:
                subject = page.name.removesuffix(".gz").rsplit(".", 1)[0] + f"({page.parent.name[3:]})"
                records.append({"instruction": question.format(subject) + f" Answer in about {words} words.",
                                "input": "", "output": " ".join(body[:words])})
        if len(records) < per_task:
            raise SystemExit(f"task {name} has only {len(records)} usable pages; lower --train")
        records = records[:per_task]
        task = folder / name
        task.mkdir(parents=True, exist_ok=True)
        half = per_task - ARGS.test
        for split, part in (("train", records[:half]), ("test", records[half:])):
            (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        tasks.append({"name": name, "path": str(task), "metric": "rouge_l"})
    return tasks


def run(mode: str, tasks: list[dict], out: Path) -> Path:
    folder = out / mode
    if (folder / "results.json").is_file():
        return folder
    spec = "[" + ",".join("{name: %s, path: '%s', metric: rouge_l}" % (t["name"], t["path"]) for t in tasks) + "]"
    args = ["experiment=finetune_smollm2", f"scenario.tasks={spec}", f"scenario.train_size={ARGS.train}",
            f"scenario.test_size={ARGS.test}", "scenario.max_length=256", "evaluation.every=0",
            f"evaluation.generate={mode}", "evaluation.batch_size=12", "logger.console=false", "trainer.batch_size=4",
            f"hydra.run.dir={folder}"] + (["debug=smoke"] if ARGS.model == "tiny" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cl", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {mode} run failed:\n{done.stderr[-3000:]}")
    return folder


def costs(folder: Path, names: list[str]) -> dict:
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    per_task = dict.fromkeys(names, 0.0)
    generated = dict.fromkeys(names, 0)
    for e in events:
        if e["event"] == "eval" and e.get("full") and "eval_experience" in e:
            per_task[names[e["eval_experience"]]] += e["seconds"]
            generated[names[e["eval_experience"]]] += bool(e.get("generated"))
    end = next(e for e in events if e["event"] == "run_end")
    full = sum(per_task.values())
    training = end["wall_time"] - end["eval_time"] - end["matrix_eval_time"]
    return {"per_task": per_task, "generated": generated, "full": full, "retention": end["matrix_eval_time"] - full,
            "training": training, "wall": end["wall_time"]}


def main() -> None:
    out = Path(ARGS.out or tempfile.mkdtemp(prefix="lm_eval_cost_"))
    tasks = write_tasks(out / "tasks", ARGS.train + ARGS.test)
    names = [t["name"] for t in tasks]
    print(f"5 tasks of 50-word answers from Debian man pages, {ARGS.train} train / {ARGS.test} test each; model "
          f"{ARGS.model}; runs in {out}")
    rows = {}
    for mode in ARGS.modes.split(","):
        rows[mode] = costs(run(mode, tasks, out), names)
    width = max(map(len, names)) + 2
    print(f"\nfull-evaluation seconds per task (all rows of the accuracy matrix; generated entries in brackets)")
    print(" " * 20 + "".join(f"{n:>{width + 6}}" for n in names))
    for mode, c in rows.items():
        print(f"{mode:<20}" + "".join(f"{c['per_task'][n]:>{width}.1f} [{c['generated'][n]}] " for n in names))
    print(f"\n{'option':<20}{'full eval s':>12}{'retention s':>13}{'training s':>12}{'full eval / training':>22}")
    for mode, c in rows.items():
        print(f"{mode:<20}{c['full']:>12.1f}{c['retention']:>13.1f}{c['training']:>12.1f}"
              f"{c['full'] / c['training']:>22.1%}")
    if "diagonal_and_final" in rows:
        share = rows["diagonal_and_final"]["full"] / rows["diagonal_and_final"]["training"]
        print(f"\ngoal: diagonal_and_final under 10% of training: {'met' if share < 0.10 else 'NOT met'} ({share:.1%}) "
              f"at {ARGS.train} training examples per task")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=32, help="training examples per task")
    ap.add_argument("--test", type=int, default=12, help="test examples per task")
    ap.add_argument("--modes", default=",".join(MODES), help="the evaluation.generate options to run, comma-separated")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--out", default=None, help="a folder for the tasks and runs (kept; finished runs are reused)")
    ARGS = ap.parse_args()
    main()
