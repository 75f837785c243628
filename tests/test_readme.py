"""The README's "Writing a strategy" example (LwF) runs as written, and its distillation acts."""
from __future__ import annotations

import re
import sys

import yaml

from tests.conftest import ROOT, read_events, run_inprocess

SMALL = ["scenario.max_per_class=30", "scenario.max_per_class_eval=20", "scenario.base=4", "scenario.increment=3",
         "evaluation.every=0", "trainer.epochs=2", "logger.console=false"]


def example() -> tuple[str, dict]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a strategy"):]
    section = section[: section.index("\n## ", 5)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    return code, config


def test_the_readme_strategy_runs_and_its_distillation_changes_the_result(tmp_path, monkeypatch):
    code, config = example()
    assert len(code.splitlines()) <= 60  # one screen
    (tmp_path / "readme_lwf.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert config["_target_"] == "strategies.lwf.LwF"
    settings = [f"+strategy.{k}={v}" for k, v in config.items() if k != "_target_"]
    lwf = run_inprocess(SMALL + ["strategy=finetune", "strategy._target_=readme_lwf.LwF", *settings], tmp_path / "lwf")
    off = run_inprocess(SMALL + ["strategy=finetune", "strategy._target_=readme_lwf.LwF", "+strategy.alpha=0.0"], tmp_path / "off")
    plain = run_inprocess(SMALL + ["strategy=finetune"], tmp_path / "ft")
    # the README's "one screen" and its config file
    assert len(lwf["accuracy_matrix"]) == 3  # B4Inc3: classes 0-3, 4-6, 7-9
    assert off["accuracy_matrix"] == plain["accuracy_matrix"]  # alpha=0: exactly fine-tuning
    losses = {name: [(e["experience"], e["loss"]) for e in read_events(tmp_path / name) if e["event"] == "train"]
              for name in ("lwf", "ft")}
    first = [(x, loss) for x, loss in losses["lwf"] if x == 0]
    assert first and first == [(x, loss) for x, loss in losses["ft"] if x == 0]  # no teacher in the first experience
    later = [(a, b) for (x, a), (_, b) in zip(losses["lwf"], losses["ft"]) if x > 0]
    assert later and all(a != b for a, b in later)  # afterwards the distillation term is in every loss
    sys.modules.pop("readme_lwf", None)
