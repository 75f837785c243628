"""How instruction tasks are scored.

- **Teacher-forced scores**, one forward pass per batch, at every evaluation: per sample,
  `token_accuracy` (the share of response positions, answer tokens and eos, whose argmax is
  the reference token), `token_loss` (the mean cross-entropy of the response tokens) and
  `exact_tf` (1 when every response position is right). Continual evaluation records all
  three; the trace and its stability metrics use the declared `evaluation.continual_score`
  (token_accuracy by default: exact match of a whole 50-word answer is 0 at every step and
  measures nothing; token_loss makes them lower-is-better `loss_*` metrics).
- Full evaluations (the accuracy matrix): **generation**, greedy, then the task's
  metric on the decoded text: `exact` (exact match after stripping), `rouge_l`
  (ROUGE-L F1 over whitespace tokens, for free-form tasks) or `edit_similarity`
  (difflib's ratio, TRACE's Py150 metric). `evaluation.generate` says which entries are
  generated (all; diagonal_and_final: R[j][j] and the last row; final: the last row), the
  rest are teacher-forced only; batches are sorted by length, and the new tokens of a
  sample are the reference's length + 2, capped by the task's `max_new_tokens`.
- **Retention probe**: general prompts answered greedily by the model before any
  tuning; after each task the same prompts are answered again and scored against
  those base answers (ROUGE-L F1, and the exact-agreement rate). It measures how
  much pretrained behaviour survives, the forgetting HFT is about.
"""
from __future__ import annotations

import difflib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from cl.stream import TEXT_METRICS, Batch, RetentionPrompts

class _Whitespace:
    """rouge_score's default tokenizer drops every non-ASCII character; whitespace keeps every language."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.lower().split()


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace())


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def edit_similarity(prediction: str, reference: str) -> float:
    return difflib.SequenceMatcher(None, prediction, reference).ratio()


SCORERS = dict(zip(TEXT_METRICS, (exact_match, rouge_l, edit_similarity)))


def teacher_forced_scores(logits: Tensor, batch: Batch) -> tuple[float, float, float]:
    """Sums over the batch's samples of (exact match, token accuracy, mean token loss) of the
    response tokens under teacher forcing. `logits` are N×V, at the response positions
    (`batch.y != -100`) in row-major order: `predict(batch, keep=mask)`."""
    mask = batch.y != -100
    targets = batch.y[mask]
    rows = mask.nonzero()[:, 0]
    tokens = mask.sum(1).clamp(min=1)
    per_row = lambda values: torch.zeros(len(mask), dtype=values.dtype, device=values.device).index_add_(0, rows, values)  # noqa: E731
    right = (logits.argmax(-1) == targets).to(torch.float64)
    wrong = per_row(1 - right)
    exact = (wrong == 0).sum()
    accuracy = (per_row(right) / tokens).sum()
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (per_row(ce) / tokens).sum()
    return float(exact), float(accuracy), float(loss)


def generated_scores(strategy, batch: Batch, exp) -> float:
    """Sum of the experience's metric over greedy generations of the batch (at most the task's
    `max_new_tokens` new tokens, when it sets a cap)."""
    n = batch.extra["max_new_tokens"]
    if exp.max_new_tokens is not None:
        n = min(n, exp.max_new_tokens)
    outputs = strategy.generate(batch, n)
    score = SCORERS[exp.metric]
    return sum(score(o, a) for o, a in zip(outputs, batch.extra["answers"]))


class InstructionScorer:
    """The scorer of instruction streams: the teacher-forced scores on `predict`'s logits at every
    evaluation, and (`full`: an entry that generates) the task's metric on `generate`'s output."""

    task_aware = False
    primary = "accuracy"
    lower_is_better = False
    TEACHER_FORCED = ("exact_tf", "token_accuracy", "token_loss")

    def names(self, full: bool) -> tuple[str, ...]:
        return (("accuracy",) if full else ()) + self.TEACHER_FORCED

    def __call__(self, strategy, batch: Batch, exp, full: bool) -> tuple[float, ...]:
        forced = teacher_forced_scores(strategy.predict(batch, keep=batch.y != -100), batch)
        return ((generated_scores(strategy, batch, exp),) if full else ()) + forced


class RetentionProbe:
    """Agreement with the base model's own answers to general prompts."""

    def __init__(self, retention: RetentionPrompts):
        self.prompts = retention.prompts
        self.max_new_tokens = retention.max_new_tokens
        self.batch_size = retention.batch_size
        self.reference: list[str] | None = None
        self.agreement: list[float] = []
        self.exact: list[float] = []
        self.last: list[str] | None = None  # the latest answers, to read beside the base ones

    @property
    def num_batches(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    def answers(self, strategy, device, advance=lambda: None) -> list[str]:
        out: list[str] = []
        for batch in self.prompts.batches(self.batch_size):
            out += strategy.generate(batch.to(device), self.max_new_tokens)
            advance()
        return out

    def measure(self, strategy, device, advance=lambda: None) -> float | None:
        """The first call records the base answers; later ones score agreement with them.
        `advance` is called after each batch of prompts."""
        answers = self.answers(strategy, device, advance)
        if self.reference is None:
            self.reference = answers
            return None
        self.last = answers
        self.agreement.append(sum(map(rouge_l, answers, self.reference)) / len(answers))
        self.exact.append(sum(map(exact_match, answers, self.reference)) / len(answers))
        return self.agreement[-1]

    def results(self) -> dict:
        return {"prompts": len(self.prompts), "max_new_tokens": self.max_new_tokens,
                "reference": "greedy answers of the model before any training",
                "agreement": self.agreement, "exact_agreement": self.exact,
                "metric": "ROUGE-L F1 against the base answers, after each experience",
                "base_answers": self.reference, "last_answers": self.last}

    def state_dict(self) -> dict:
        return {"reference": self.reference, "agreement": self.agreement, "exact": self.exact, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.reference, self.agreement, self.exact = state["reference"], list(state["agreement"]), list(state["exact"])
        self.last = state.get("last")

