"""`python -m cl --help` is one short page; metrics.jsonl can be read while a run goes on;
slow evaluation passes show a progress bar, quick ones none."""
from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from cl.loggers import ConsoleLogger, JsonlLogger, RunLogger
from cl.loggers import console as console_module
from cl.loggers import jsonl as jsonl_module
from tests.conftest import CONF, cli, run_inprocess


def test_help_is_one_short_page_with_every_preset_and_the_common_overrides():
    out = cli(["--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    page = out.stdout
    lines = page.strip().splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines"
    assert not re.search(r"\bcli\b", page) and "powered by Hydra" not in page
    assert "_target_" not in page  # no config dump: `--cfg job` prints it
    assert "--cfg job" in page
    assert "python -m cl [group=option ...] [key=value ...]" in page
    for group in ("scenario", "model", "strategy", "optimizer", "scheduler", "evaluation", "logger", "debug"):
        assert re.search(rf"^{group}: \w", page, re.M), group
    # every preset has a line of its own, with a description, in the presets section
    presets = page.split("== Experiment presets")[1].split("==")[1]
    described = {m.group(1) for m in re.finditer(r"^ +(\w+) {2,}\S", presets, re.M)}
    files = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    assert files <= described, f"presets without a line in conf/hydra/help/cl.yaml: {sorted(files - described)}"
    for override in ("seed=", "trainer.epochs=", "optimizer.lr=", "debug=smoke", "evaluation.every=",
                     "resume=<run folder>", "-m ", "phase=tuning", "phase=evaluation tuning.from="):
        assert override in page, override
    assert "outputs/<name>/<stamp>" in page and "multirun/<name>/<stamp>/<job>" in page


class FakeClock:
    def __init__(self, step: float = 0.0):
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_is_flushed_every_few_seconds_without_closing(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(jsonl_module, "clock", clock)
    path = tmp_path / "metrics.jsonl"
    sink = JsonlLogger(path)
    events = RunLogger([sink])
    events({"event": "train", "iteration": 1})
    assert path.read_text() == ""  # buffered: less than flush_every (2 s) since the last flush
    clock.now += 2.5
    events.step()  # a training iteration later
    assert [e["iteration"] for e in lines(path)] == [1]
    events({"event": "eval", "iteration": 2})
    with events.progress("evaluating", 3) as advance:
        advance()
        assert len(lines(path)) == 1
        clock.now += 2.5
        advance()  # a long evaluation pass flushes too
        assert len(lines(path)) == 2
    events({"event": "run_end", "iteration": 2})  # always flushed
    assert lines(path)[-1]["event"] == "run_end"
    events.close()


from strategies.replay import ER  # noqa: E402


class PeekER(ER):
    """ER whose after_experience reads metrics.jsonl while the run goes on."""

    path = None
    seen: list = []

    def after_experience(self, exp):
        super().after_experience(exp)
        PeekER.seen.append([json.loads(line) for line in PeekER.path.read_text().splitlines()])  # whole lines


def test_a_running_run_has_its_events_in_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_module, "clock", FakeClock(step=1.0))  # every tick is due
    PeekER.path, PeekER.seen = tmp_path / "run" / "metrics.jsonl", []
    run_inprocess(["debug=smoke", "scenario.max_per_class=20", "evaluation.every=2",
                   "strategy._target_=tests.test_help_and_progress.PeekER"], tmp_path / "run")
    first = PeekER.seen[0]
    assert first and first[0]["event"] == "run_start"
    assert any(e["event"] == "eval" and not e["full"] and e["experience"] == 0 for e in first)
    assert any(e["event"] == "experience_end" and e["experience"] == 0 for e in PeekER.seen[1])


def console_logger(**kwargs):
    buf = io.StringIO()
    return ConsoleLogger(Console(file=buf, force_terminal=True, width=120), **kwargs), buf


@pytest.mark.parametrize("seconds_per_batch,shown", [(0.5, True), (0.01, False)])
def test_an_evaluation_pass_shows_a_bar_only_when_it_is_slow(monkeypatch, seconds_per_batch, shown):
    clock = FakeClock()
    monkeypatch.setattr(console_module, "clock", clock)
    sink, buf = console_logger()
    events = RunLogger([sink])
    with events.progress("evaluating after experience 3/5", 10) as advance:
        for _ in range(10):
            clock.now += seconds_per_batch
            advance()
    events.close()
    assert ("evaluating after experience 3/5" in buf.getvalue()) == shown


def test_the_evaluation_bar_sits_below_a_live_training_bar_and_goes_away(monkeypatch):
    sink, buf = console_logger(eval_delay=0.0)
    events = RunLogger([sink])
    events({"event": "experience_start", "experience": 0, "of": 2, "iteration": 0, "iterations": 4})
    with events.progress("continual evaluation", 2) as advance:
        advance()
        assert [t.description for t in sink.progress.tasks] == ["experience 1/2", "continual evaluation"]
        advance()
    assert [t.description for t in sink.progress.tasks] == ["experience 1/2"]
    events.close()


def test_the_evaluator_reports_its_batches_and_a_disabled_console_shows_nothing(tmp_path):
    from cl.evaluation import Evaluation, Evaluator
    from tests.test_evaluator import TableStrategy, stream

    for enabled in (True, False):
        sink, buf = console_logger(eval_delay=0.0, enabled=enabled)
        ev = Evaluator(stream(), TableStrategy(), Evaluation(every=0, batch_size=1), RunLogger([sink]))
        ev.initial()
        assert ("evaluating the untrained model" in buf.getvalue()) == enabled
        assert "12/12" in buf.getvalue() if enabled else buf.getvalue() == ""


def test_a_progress_display_that_fails_is_switched_off_and_the_pass_goes_on(caplog):
    class Broken:
        def log(self, event):
            pass

        def advance_pass(self, n=1):
            raise RuntimeError("terminal gone")

    events = RunLogger([Broken()])
    with events.progress("evaluating", 2) as advance:
        advance()
        advance()
    assert events.sinks == [] and "Broken failed (RuntimeError: terminal gone)" in caplog.text
