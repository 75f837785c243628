"""The evaluator: what is measured, on which data, and when.

- `initial()`: before any training, the full eval sets of all experiences, with
  the head grown to every class (the baseline b for FWT).
- Continual evaluation (`every > 0`), on a fixed seeded subset (`subset`
  samples) of each *seen* experience's eval split (`resample=true` re-draws it at
  every evaluation, as De Lange et al.'s code does), following their code:
  before the run's very first update (`pre_update=every`: also before each later
  experience's first update, on that experience alone; the others were just
  measured as the previous one ended); after update 1, 1+every, 1+2·every, … of
  each epoch (`period=epoch`; `period=global`: every `every`-th iteration of the
  run); and (ours, see below) at every epoch end (`at_epoch_end`). The engine calls `epoch_end`
  after the strategy's `after_epoch`, and for an experience's last epoch after
  `after_experience`, so an experience's last trace point scores the model that
  its accuracy-matrix row scores. Which iterations are evaluated depends only on
  the position in the run (and `every`), so a resumed run evaluates at the same ones.
- `end_of_experience(i)`: the full eval sets of all experiences, seen and
  unseen -> row i of the accuracy matrix.

The model runs in eval mode under `inference_mode`; every module's train/eval
state is restored afterwards (BatchNorm, dropout). Per-sample correctness comes
from the strategy's declared methods through the scorer of the stream's modality
(`scorer_for`): for classification, `predict`'s argmax, and the argmax within the
experience's classes for task-aware accuracy. Outside the task- and dataset-incremental settings, `predict` sees task label -1.

Instruction streams (`cl.evaluation.text`): continual evaluation is teacher-forced
exact match on `predict`'s logits; full evaluations score greedy generations (the
strategy's `generate`) with each task's metric; the retention probe, built from the
stream's prompts (`stream.retention`), records the base model's answers in
`initial()` and scores agreement with them at every experience end.

Each pass reports its batches to the run's logger (`RunLogger.progress`), so the
console shows a bar for a pass that takes more than a few seconds (`ConsoleLogger`).

`budget` caps the share of wall time spent in continual evaluation: when the
share exceeds it, the period doubles. The periods used are in results.json.

Deliberate differences from De Lange et al.'s code (github.com/Mattdl/ContinualEvaluation):
- `at_epoch_end=true` evaluates at each epoch's last update. Their plugin means to
  ("or last in experience") but its test reads Avalanche's per-epoch counter before
  the counter counts the current iteration, so it never fires; with their default
  period of 1 every update is evaluated anyway.
- Their last evaluation of an experience comes before `after_training_exp`; ours
  comes after `after_experience` (the same model for methods that leave the weights
  alone at a task end, the scored model for those that change them: LCIA's θ*,
  DST's and CLR's best epoch, MOS's aligned classifier and retrieval).
- `resample=false` (a fixed subset) is our default; their code re-draws the subset
  before every iteration (`resample=true`).
"""
from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor

from cl import distributed
from cl.errors import UserError
from cl.evaluation import metrics
from cl.runtime import autocast, eval_mode
from cl.stream import Batch, Stream, TensorData


def _array(typecode: str, saved) -> array:
    """An evaluator trace from a checkpoint (bytes; lists in older checkpoints)."""
    out = array(typecode)
    out.frombytes(saved) if isinstance(saved, bytes) else out.extend(saved)
    return out


def _matrix(rows: list[list[float]]) -> torch.Tensor:
    """Accuracy rows as one float64 tensor for the checkpoint (exact; T² Python floats pickle slowly);
    an entry not measured (None: an instruction entry not generated) is stored as NaN."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)


def _rows(saved) -> list:
    if not isinstance(saved, torch.Tensor):
        return saved
    return [[None if v != v else v for v in row] for row in saved.tolist()]


def classification_scores(logits: Tensor, batch: Batch, classes: Tensor, task_aware: bool) -> tuple[int, int]:
    """Correct counts (task-agnostic, task-aware) from logits over the labels seen so far.
    A class the head does not have yet can never be predicted, so its samples count as wrong."""
    if logits.shape[1] == 0:
        return 0, 0
    y = batch.y
    correct = int((logits.argmax(1) == y).sum())
    if not task_aware:
        return correct, 0
    known = classes[classes < logits.shape[1]]
    if known.numel() == 0:
        return correct, 0
    pred_aware = known[logits[:, known].argmax(1)]
    return correct, int((pred_aware == y).sum())


class ClassificationScorer:
    """Correct counts from `predict`'s logits over the labels seen so far (`classification_scores`).

    A scorer (one per modality, `scorer_for`) declares `names(full)`, the per-sample sums its call
    returns for a batch, in that order; `primary`, the one the accuracy matrix and the trace hold;
    `lower_is_better` of the primary; and `task_aware` (whether a task-aware accuracy is among them)."""

    primary = "accuracy"
    lower_is_better = False

    def __init__(self, stream: Stream, device: torch.device):
        self.task_aware = stream.setting in ("class", "task", "dataset")
        self.classes = [torch.tensor(e.classes, device=device) for e in stream]

    def names(self, full: bool) -> tuple[str, ...]:
        return ("accuracy", "accuracy_task_aware") if self.task_aware else ("accuracy",)

    def __call__(self, strategy, batch: Batch, exp, full: bool) -> tuple:
        c, ca = classification_scores(strategy.predict(batch), batch, self.classes[exp.index], self.task_aware)
        return (c, ca) if self.task_aware else (c,)


def scorer_for(stream: Stream, device: torch.device):
    """The stream's modality picks how a batch is scored: (strategy, batch, experience, full) -> sums
    (`full`: a full evaluation entry that generates, for instruction streams)."""
    if stream.modality == "instruction":
        from cl.evaluation.text import InstructionScorer

        return InstructionScorer()
    if stream.modality == "tokens":
        from cl.evaluation.tokens import TokenLossScorer

        return TokenLossScorer()
    return ClassificationScorer(stream, device)


GENERATE = ("all", "diagonal_and_final", "final")
CONTINUAL_SCORES = ("token_accuracy", "token_loss", "exact")  # instruction streams, teacher-forced
LOSSES = ("loss", "token_loss")  # trace scores that are lower-is-better


@dataclass
class Evaluation:
    """`evaluation.*` in the config (see the module docstring and conf/evaluation/default.yaml)."""

    every: int = 0
    subset: int = 1000
    batch_size: int = 512
    split: str = "test"
    resample: bool = False
    at_epoch_end: bool = True
    pre_update: str = "first"
    period: str = "epoch"
    budget: float | None = None
    windows: tuple = (10, 100)
    lca_beta: int = 10
    # instruction streams: which accuracy-matrix entries are generated (the others are teacher-forced only),
    # and the teacher-forced score the continual trace and its stability metrics use
    generate: str = "all"
    continual_score: str = "token_accuracy"

    def __post_init__(self):
        for name, low in (("every", 0), ("subset", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a non-negative" if low == 0 else "a positive"
                raise UserError(f"evaluation.{name} must be {kind} integer, got {value!r}.")
        for name, allowed in (("split", ("test", "validation")), ("pre_update", ("first", "every")),
                              ("period", ("epoch", "global")), ("generate", GENERATE),
                              ("continual_score", CONTINUAL_SCORES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"evaluation.{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                                f"not {getattr(self, name)!r}.")
        if self.budget is not None and not 0 < self.budget < 1:
            raise UserError(f"evaluation.budget must be a fraction in (0, 1) or null, got {self.budget!r}.")
        self.windows = tuple(self.windows)


class Evaluator:
    def __init__(self, stream: Stream, strategy, settings: Evaluation | None = None,
                 log: Callable[[dict], None] = lambda event: None, seed: int = 0,
                 device: torch.device | str = "cpu", precision: str = "32"):
        self.settings = settings = settings or Evaluation()
        self.stream = stream
        self.strategy = strategy
        self.log = log
        self.every = settings.every  # doubled when evaluation exceeds its budget
        self.device = torch.device(device)
        self.precision = str(precision)
        self.data: list[TensorData] = [e.valid if settings.split == "validation" else e.eval for e in stream]
        if settings.split == "validation" and any(d is None for d in self.data):
            raise UserError("evaluation.split=validation needs a validation split: set scenario.validation=0.1 (a fraction).")
        # domains scored at every evaluation but never trained on (a token stream's original
        # distribution): indexed after the experiences in `data` and the trace
        self.held_out_names = list(stream.held_out)
        self.held_out = list(stream.held_out.values())
        self.data += self.held_out
        self.generator = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        self.subsets = [self._fixed_subset(d, seed, j) for j, d in enumerate(self.data)]
        if stream.modality == "instruction":  # full evaluations generate: batches of similar lengths
            self.data = [d.by_length() for d in self.data]
        self.sizes = [len(d) for d in self.data[: len(stream)]]
        self.score = scorer_for(stream, self.device)
        self.task_aware_available = self.score.task_aware
        self.probe = None
        if stream.retention is not None:
            from cl.evaluation.text import RetentionProbe

            self.probe = RetentionProbe(stream.retention)
        # results
        self.initial_row: list[float] | None = None
        self.initial_row_task_aware: list[float] | None = None
        self.rows: list[list[float]] = []
        self.rows_task_aware: list[list[float]] = []
        self.held_out_rows: list[list[float]] = []
        # every other score of each full evaluation, by name (instruction streams: the teacher-forced ones)
        self.other_rows: dict[str, list[list[float]]] = {}
        self.initial_other: dict[str, list[float]] = {}
        self.trace_iters = [array("q") for _ in self.data]
        self.trace_accs = [array("d") for _ in self.data]
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.periods: list[dict] = [{"from_iteration": 0, "every": self.every}]
        self.eval_seconds = 0.0  # continual evaluation only
        self.matrix_seconds = 0.0  # full evaluations (accuracy matrix, baseline)
        self.clock_offset = 0.0
        self.clock_start = time.perf_counter()

    def _fixed_subset(self, data: TensorData, seed: int, j: int) -> TensorData | None:
        if len(data) <= self.settings.subset:
            return None
        g = torch.Generator().manual_seed(int(seed) * 1000 + j)
        return data.subset(torch.randperm(len(data), generator=g)[: self.settings.subset].sort().values)

    # ---- measuring ----------------------------------------------------------------
    def autocast(self):
        """The run's precision (bf16/16 autocast) for evaluation as for training."""
        return autocast(self.device, self.precision)

    def progress(self, description: str, total: int):
        """A context yielding `advance(n=1)` for each batch: the run's logger shows slow passes."""
        progress = getattr(self.log, "progress", None)
        return progress(description, total) if progress is not None else nullcontext(lambda n=1: None)

    def num_batches(self, data: TensorData) -> int:
        """Batches this rank scores of `data` (every world-th one)."""
        n = -(-len(data) // self.settings.batch_size)
        return len(range(distributed.rank(), n, distributed.world()))

    def measure(self, j: int, data: TensorData, full: bool = False,
                advance: Callable[[], None] = lambda: None) -> dict[str, float]:
        """The scorer's per-sample means on `data` for the current model, by name (classification:
        `accuracy`, and `accuracy_task_aware` where tasks are known; `full`: a full evaluation).
        `j` is the experience whose data it is (or a held-out domain's index past the stream's).
        `advance` is called after each batch."""
        names = self.score.names(full)
        sums = [0.0] * len(names)
        exp = self.stream[j] if j < len(self.stream) else None
        # under DDP each rank scores every world-th batch; the sums are summed over ranks
        for batch in data.batches(self.settings.batch_size, start=distributed.rank(), step=distributed.world()):
            batch = batch.to(self.device, non_blocking=True)
            if self.stream.eval_transform is not None:
                batch.x = self.stream.eval_transform(batch.x)
            if not self.stream.task_aware:
                batch.t = torch.full_like(batch.t, -1)
            with self.autocast():
                sums = [a + b for a, b in zip(sums, self.score(self.strategy, batch, exp, full))]
            advance()
        n = max(len(data), 1)
        return {k: v / n for k, v in zip(names, distributed.all_sum(sums, self.device))}

    @property
    def trace_key(self) -> str:
        """The score the continual trace holds: the primary accuracy; an instruction stream's
        declared teacher-forced score (`continual_score`); a token stream's loss."""
        if self.stream.modality == "instruction":
            return {"exact": "exact_tf"}.get(self.settings.continual_score, self.settings.continual_score)
        return "accuracy_task_aware" if self.primary_is_task_aware else self.score.primary

    def generates(self, j: int, training_exp: int) -> bool:
        """Whether an instruction stream's full evaluation of experience j after experience
        `training_exp` (-1: the untrained model) generates (`evaluation.generate`)."""
        mode, last = self.settings.generate, len(self.stream) - 1
        return mode == "all" or training_exp == last or (mode == "diagonal_and_final" and j == training_exp)

    def _evaluate(self, which: list[int], full: bool, iteration: int, training_exp: int) -> list[dict]:
        """Scores of the experiences `which`, then of the held-out domains (never trained on)."""
        out, datas = [], []
        which = list(which) + [len(self.stream) + h for h in range(len(self.held_out))]
        for j in which:
            data = self.data[j]
            if not full:
                if self.settings.resample and len(data) > self.settings.subset:
                    data = data.subset(torch.randperm(len(data), generator=self.generator)[: self.settings.subset])
                elif self.subsets[j] is not None:
                    data = self.subsets[j]
            datas.append(data)
        what = ("continual evaluation" if not full else "evaluating the untrained model" if training_exp < 0
                else f"evaluating after experience {training_exp + 1}/{len(self.stream)}")
        if full and self.stream.modality == "instruction":  # generation passes are the slow ones: say which
            generating = sum(self.generates(j, training_exp) for j in which if j < len(self.stream))
            what += f" (generating {generating} of {len(self.stream)} tasks)"
        with eval_mode(self.strategy.model), self.progress(what, sum(map(self.num_batches, datas))) as advance:
            for j, data in zip(which, datas):
                generate = full and self.generates(j, training_exp)
                began = time.perf_counter()
                scores = self.measure(j, data, generate, advance)
                seconds = round(time.perf_counter() - began, 4)
                out.append(scores)
                where = ({"eval_experience": j} if j < len(self.stream)
                         else {"held_out": self.held_out_names[j - len(self.stream)]})
                extra = {"generated": generate} if full and self.stream.modality == "instruction" else {}
                self.log({"event": "eval", "iteration": iteration, "experience": training_exp, **where,
                          **scores, "n": len(data), "full": full, **extra, "seconds": seconds})
                if not full:
                    self.trace_iters[j].append(iteration)
                    self.trace_accs[j].append(scores[self.trace_key])
        return out

    def _continual(self, which: list[int], iteration: int, i: int) -> None:
        start = time.perf_counter()
        self._evaluate(which, False, iteration, i)
        self.eval_seconds += time.perf_counter() - start
        # wall-clock shares differ between ranks: rank 0 decides for all
        if self.settings.budget is not None and distributed.broadcast_object(self.eval_share > self.settings.budget):
            self.every *= 2
            self.periods.append({"from_iteration": iteration, "every": self.every})

    @property
    def eval_share(self) -> float:
        """Share of the run's wall time so far spent in continual evaluation."""
        wall = self.clock_offset + time.perf_counter() - self.clock_start
        return self.eval_seconds / wall if wall > 0 else 0.0

    # ---- when ----------------------------------------------------------------------
    def initial(self) -> None:
        """Accuracy before training, with the head grown to every class (GEM's b)."""
        start = time.perf_counter()
        with self.strategy.baseline():
            res = self._evaluate(list(range(len(self.stream))), True, 0, -1)
        self._retention(-1, 0)
        res = self._keep_held_out(res)
        self.initial_row = [r.get(self.score.primary) for r in res]
        self.initial_other = {k: [r.get(k) for r in res] for k in self._other_names(res)}
        self.initial_row_task_aware = [r["accuracy_task_aware"] for r in res] if self.task_aware_available else None
        self.matrix_seconds += time.perf_counter() - start

    def experience_start(self, i: int, iteration: int) -> None:
        self.starts.append(iteration)
        if self.every > 0 and (i == 0 or self.settings.pre_update == "every"):
            self._continual([i], iteration, i)

    def due(self, iteration: int, epoch_step: int) -> bool:
        """Whether the period asks for an evaluation after this update (`epoch_step`: the
        update's number within its epoch, from 1)."""
        if self.settings.period == "epoch":
            return (epoch_step - 1) % self.every == 0
        return iteration % self.every == 0

    def after_step(self, iteration: int, i: int, epoch_step: int, epoch_end: bool) -> None:
        """After an update; the epoch's last update is left to `epoch_end`."""
        if self.every > 0 and not epoch_end and self.due(iteration, epoch_step):
            self._continual(list(range(i + 1)), iteration, i)

    def epoch_end(self, iteration: int, i: int, epoch_step: int) -> None:
        """After the epoch's hooks (`after_epoch`, and `after_experience` for the last epoch):
        the epoch-end evaluation, or the period's if it falls on the epoch's last update."""
        if self.every > 0 and (self.settings.at_epoch_end or self.due(iteration, epoch_step)):
            self._continual(list(range(i + 1)), iteration, i)

    def end_of_experience(self, i: int, iteration: int) -> list[float]:
        start = time.perf_counter()
        self.ends.append(iteration)
        res = self._keep_held_out(self._evaluate(list(range(len(self.stream))), True, iteration, i))
        self.rows.append([r.get(self.score.primary) for r in res])
        for k in self._other_names(res):
            self.other_rows.setdefault(k, []).append([r.get(k) for r in res])
        self._retention(i, iteration)
        if self.task_aware_available:
            self.rows_task_aware.append([r["accuracy_task_aware"] for r in res])
        self.matrix_seconds += time.perf_counter() - start
        return self.rows[-1]

    def _other_names(self, res: list[dict]) -> list[str]:
        return sorted({k for r in res for k in r} - {self.score.primary, "accuracy_task_aware"})

    def _keep_held_out(self, res: list[dict]) -> list[dict]:
        """A full evaluation's results: the held-out domains' scores are kept in `held_out_rows`
        (one row per full evaluation, the untrained model's first), the experiences' returned."""
        T = len(self.stream)
        if self.held_out:
            self.held_out_rows.append([r[self.score.primary] for r in res[T:]])
        return res[:T]

    def _retention(self, i: int, iteration: int) -> None:
        """The retention probe of instruction streams: base answers first, then agreement with them."""
        probe = self.probe
        if probe is None:
            return
        with eval_mode(self.strategy.model), self.progress("retention probe", probe.num_batches) as advance:
            agreement = probe.measure(self.strategy, self.device, advance)
        if agreement is not None:
            self.log({"event": "retention", "iteration": iteration, "experience": i, "agreement": agreement,
                      "exact_agreement": probe.exact[-1]})

    # ---- results -------------------------------------------------------------------
    @property
    def primary_is_task_aware(self) -> bool:
        """Task-aware in the task setting, unless the strategy asks for its full-logit
        argmax (`task_aware_accuracy = False`, e.g. DST's official evaluation)."""
        return self.stream.task_aware and self.strategy.task_aware_accuracy

    @property
    def trace(self) -> dict[int, list[tuple[int, float]]]:
        """The continual trace of each experience: (iteration, score) of every evaluation."""
        T = len(self.stream)
        return {j: list(zip(its, accs)) for j, (its, accs) in enumerate(zip(self.trace_iters[:T], self.trace_accs[:T]))
                if its}

    @property
    def held_out_trace(self) -> dict[str, list[tuple[int, float]]]:
        T = len(self.stream)
        return {name: list(zip(self.trace_iters[T + h], self.trace_accs[T + h]))
                for h, name in enumerate(self.held_out_names)}

    def _summary(self, R, b) -> dict:
        # FWT needs predictions for unseen classes: undefined for a class-incremental head that grows.
        return metrics.summary(R, self.sizes, None if self.stream.setting == "class" else b) if R else {}

    def results(self) -> dict:
        if self.score.lower_is_better:
            return self._loss_results()
        aware = self.primary_is_task_aware
        primary = self.rows_task_aware if aware else self.rows
        b = self.initial_row_task_aware if aware else self.initial_row
        stability = metrics.loss_stability_summary if self.trace_key in LOSSES else metrics.stability_summary
        out = {
            "accuracy": "task-aware" if aware else "task-agnostic",
            "metrics": {**(self._generated_summary(primary, b) if self.stream.modality == "instruction"
                           else self._summary(primary, b)),
                        **stability(self.trace, self.starts, self.ends, self.settings.windows, self.settings.lca_beta)},
            "accuracy_matrix": primary,
            "eval_sizes": self.sizes,
            "initial_accuracy": b,
            "continual_evaluation": self._continual_settings(),
        }
        if self.stream.modality == "instruction":
            out.update(self._teacher_forced_results())
        self._add_retention(out)
        if self.task_aware_available:
            other = self.rows if aware else self.rows_task_aware
            name = "task_agnostic" if aware else "task_aware"
            out[f"accuracy_matrix_{name}"] = other
            out[f"metrics_{name}"] = self._summary(other, self.initial_row if aware else self.initial_row_task_aware)
        return out

    def _generated_summary(self, R, b) -> dict:
        """An instruction stream's matrix metrics from the generated entries (`evaluation.generate`):
        all of them when every entry is generated; with diagonal_and_final the final accuracies and
        BWT (R[T-1][j] - R[j][j]); with final, the final accuracies. The rest are null, and the
        teacher-forced matrix (always whole) has them."""
        if self.settings.generate == "all":
            return self._summary(R, b)
        out = dict.fromkeys(("final_average_accuracy", "final_accuracy", "average_incremental_accuracy",
                             "forgetting", "bwt", "fwt"))
        if R and None not in R[-1]:
            out["final_average_accuracy"] = metrics.final_average_accuracy(R)
            out["final_accuracy"] = metrics.final_accuracy(R, self.sizes)
            if self.settings.generate == "diagonal_and_final" and len(R) == len(self.stream):
                out["bwt"] = metrics.backward_transfer(R)
        return out

    def _teacher_forced_results(self) -> dict:
        """An instruction stream's teacher-forced matrices (every entry, one forward per batch) and
        the metrics of the declared continual score on its matrix."""
        key = self.trace_key
        R, b = self.other_rows.get(key, []), self.initial_other.get(key)
        summary = ((metrics.loss_summary if key in LOSSES else metrics.summary)(R, self.sizes, b)) if R else {}
        mode = self.settings.generate
        return {
            "generated_entries": {"all": "every entry (and the untrained model's row)",
                                  "diagonal_and_final": "R[j][j] and the last row; the others are null",
                                  "final": "the last row; the others are null"}[mode],
            "continual_score": self.settings.continual_score,
            "teacher_forced": {"score": key, "metrics": summary, "initial": b,
                               "matrices": {k: rows for k, rows in sorted(self.other_rows.items())}},
        }

    def _loss_results(self) -> dict:
        """results.json of a lower-is-better score (token streams): the loss matrix L[i][j] (mean
        cross-entropy per target token on domain j after experience i), its perplexities, the
        metrics named for a loss (`metrics.loss_summary`, `metrics.loss_stability_summary`) and the
        held-out domains' losses."""
        import math

        R, b = self.rows, self.initial_row
        out = {
            "score": f"{self.score.primary}: {self.score.description}",
            "metrics": {**(metrics.loss_summary(R, self.sizes, b) if R else {}),
                        **metrics.loss_stability_summary(self.trace, self.starts, self.ends, self.settings.windows,
                                                         self.settings.lca_beta)},
            "loss_matrix": R,
            "perplexity_matrix": [[math.exp(v) for v in row] for row in R],
            "eval_sizes": self.sizes,
            "initial_loss": b,
            "continual_evaluation": self._continual_settings(),
        }
        if self.held_out:
            rows = self.held_out_rows
            out["held_out"] = {name: {"initial_loss": rows[0][h] if rows else None,
                                      "loss_after_experience": [r[h] for r in rows[1:]],
                                      "trace": [list(p) for p in self.held_out_trace[name]]}
                               for h, name in enumerate(self.held_out_names)}
            if len(rows) > 1:
                out["metrics"]["held_out_loss_increase"] = sum(rows[-1]) / len(rows[-1]) - sum(rows[0]) / len(rows[0])
        self._add_retention(out)
        return out

    def _add_retention(self, out: dict) -> None:
        """The retention probe's answers and agreements, and its last agreement as a metric."""
        if self.probe is not None:
            out["retention"] = self.probe.results()
            if self.probe.agreement:
                out["metrics"]["retention"] = self.probe.agreement[-1]

    def _continual_settings(self) -> dict:
        return {
            "enabled": self.every > 0 or len(self.periods) > 1,
            "subset": self.settings.subset,
            "resample": self.settings.resample,
            "at_epoch_end": self.settings.at_epoch_end,
            "pre_update": self.settings.pre_update,
            "period": self.settings.period,
            "budget": self.settings.budget,
            "periods": self.periods,
            "evaluations": sum(len(t) for t in self.trace_iters[: len(self.stream)]),
            "experience_ends": self.ends,
        }

    def state_dict(self) -> dict:
        return {
            "initial_row": self.initial_row, "initial_row_task_aware": self.initial_row_task_aware,
            "rows": _matrix(self.rows), "rows_task_aware": _matrix(self.rows_task_aware),
            "held_out_rows": _matrix(self.held_out_rows),
            "other_rows": {k: _matrix(v) for k, v in self.other_rows.items()}, "initial_other": self.initial_other,
            # as bytes: pickling one object per evaluation made checkpoints of long streams slow
            "trace_iters": [t.tobytes() for t in self.trace_iters], "trace_accs": [t.tobytes() for t in self.trace_accs],
            "starts": self.starts, "ends": self.ends, "every": self.every, "periods": self.periods,
            "generator": self.generator.get_state(), "eval_seconds": self.eval_seconds,
            "matrix_seconds": self.matrix_seconds,
            "wall": self.clock_offset + time.perf_counter() - self.clock_start,
            "probe": self.probe.state_dict() if self.probe is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.initial_row, self.initial_row_task_aware = state["initial_row"], state["initial_row_task_aware"]
        self.rows = [list(r) for r in _rows(state["rows"])]
        self.rows_task_aware = [list(r) for r in _rows(state["rows_task_aware"])]
        self.held_out_rows = [list(r) for r in _rows(state.get("held_out_rows", []))]
        self.other_rows = {k: [list(r) for r in _rows(v)] for k, v in (state.get("other_rows") or {}).items()}
        self.initial_other = dict(state.get("initial_other") or {})
        self.trace_iters = [_array("q", t) for t in state["trace_iters"]]
        self.trace_accs = [_array("d", t) for t in state["trace_accs"]]
        self.starts, self.ends = list(state["starts"]), list(state["ends"])
        self.every, self.periods = state["every"], [dict(p) for p in state["periods"]]
        self.generator.set_state(state["generator"])
        self.eval_seconds, self.matrix_seconds = state["eval_seconds"], state["matrix_seconds"]
        self.clock_offset, self.clock_start = state["wall"], time.perf_counter()
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
