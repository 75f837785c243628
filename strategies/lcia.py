"""LCIA: Large Continual Instruction Assistant (Qiao et al., ICML 2025; code JingyangQiao/CoIN).

Two parts, as in the official code:

*Dynamic EMA* (`DynamicEMA`, the code's `ema_update`, right after `optimizer.step()`),
per trainable tensor θ with L1 norms over the whole tensor:

    a = ‖θ_t − θ*_{t−1}‖₁,  b = ‖g_t‖₁,  c = ‖g_t − g_{t−1}‖₁
    β_t = 2(1 + b) / (a·c),  and β_t = 0.01 if β_t ∉ (0, 1) or there is no g_{t−1}
    θ* ← (1 − β_t)·θ* + β_t·θ_t,  g_{t−1} ← g_t

θ* starts as a copy of θ at the first update; at the task's end θ ← θ* (the live
weights are never blended during training). On small tensors β_t is mostly out
of range, which makes DEMA a fixed EMA(0.99): the fallback rate and a histogram of
β_t are logged and in results.json. `fixed_beta` gives the fixed-EMA baseline.

*Instruction grouping* (the code's `LoRASelect.py`): all of a task's unique instructions
are compared with each group's stored ones by the mean, over all pairs, of the cosine of
TF-IDF vectors fit on that pair alone (sklearn, stop_words='english'; computed for all
pairs at once, equal to the official pair loop). If the best group reaches τ its LoRA is
retrained, from its latest weights, with DEMA on, and the new instructions join the
group; otherwise a new group gets a new LoRA initialised from the most recently trained
one, with DEMA off. At test time a test set (an experience's eval split, in continual
and full evaluations alike) is routed as a whole, as CoIN routes a test file: all its
unique instructions select its best group if that reaches τ, else the newest group.
A batch is placed in its test set by its instructions (the set holding all of them).
`max_instructions` caps the instructions used per task and per test set (off by default).

Deliberate differences from the official code:
- The official scripts run the selection and then hard-code what it prints (each task's
  starting checkpoint, its DEMA flag, the checkpoint a test file is evaluated with); here
  the selection drives them, with every group's LoRA an adapter of one model.
- A pair of instructions made only of stop words has similarity 0, with a warning
  (sklearn raises on the empty vocabulary).
- A batch whose instructions lie in several test sets that route to different groups
  cannot be placed in one; it is routed by its own instructions, with a warning (the
  official code evaluates one test file at a time); so does a batch from no test set. The
  retention probe's prompts (CoIN has no probe) are routed as one more test set.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from cl.errors import UserError
from cl.stream import Batch, Experience
from cl.strategy import Strategy
from strategies.lora_adapters import adapter_state, add_lora, load_adapter_state, lora_config

BETA_BINS = np.logspace(-8, 0, 17)  # histogram edges of β_t (the fallback 0.01 falls in its bin)


class DynamicEMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], fallback: float = 0.01, fixed_beta: float | None = None):
        self.params = params
        self.fallback = fallback
        self.fixed_beta = fixed_beta
        self.star: dict[str, torch.Tensor] = {}
        self.prev_grad: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.fallbacks = 0
        self.histogram = np.zeros(len(BETA_BINS) - 1, dtype=np.int64)
        self.reasons = {"no_previous_gradient": 0, "at_least_one": 0, "not_positive_or_undefined": 0}

    def beta(self, name: str, theta: torch.Tensor, grad: torch.Tensor) -> tuple[float, str | None]:
        """(β_t, why it is the fallback or None) for one tensor."""
        if self.fixed_beta is not None:
            return self.fixed_beta, None
        prev = self.prev_grad.get(name)
        if prev is None:
            return self.fallback, "no_previous_gradient"
        a = float((theta - self.star[name]).abs().sum())
        b = float(grad.abs().sum())
        c = float((grad - prev).abs().sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = float(np.float64(2 * (1 + b)) / np.float64(a * c))
        if not 0 < beta < 1:  # also inf and nan (a = 0 or c = 0)
            return self.fallback, "at_least_one" if 1 <= beta < float("inf") else "not_positive_or_undefined"
        return beta, None

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            if name not in self.star:
                self.star[name] = p.detach().clone()
            if p.grad is None:  # the official try/except: a missing gradient falls back too
                beta, reason, grad = self.fallback, "not_positive_or_undefined", None
            else:
                grad = p.grad.detach()
                beta, reason = self.beta(name, p.detach(), grad)
            self.star[name].mul_(1 - beta).add_(p.detach(), alpha=beta)
            if grad is not None:
                self.prev_grad[name] = grad.clone()
            self.updates += 1
            if reason is not None:
                self.fallbacks += 1
                self.reasons[reason] += 1
            self.histogram[min(max(np.searchsorted(BETA_BINS, beta, side="right") - 1, 0), len(self.histogram) - 1)] += 1

    @torch.no_grad()
    def replace(self) -> None:
        """θ ← θ* (the task's end)."""
        for name, p in self.params.items():
            if name in self.star:
                p.copy_(self.star[name])

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.updates if self.updates else 0.0

    def stats(self) -> dict:
        return {"updates": self.updates, "fallbacks": self.fallbacks, "fallback_rate": self.fallback_rate,
                "fallback_reasons": dict(self.reasons),
                "beta_histogram": {"edges": BETA_BINS.tolist(), "counts": self.histogram.tolist()}}


def set_similarity(current: list[str], stored: list[str]) -> float:
    """The mean, over all pairs (x, h), of the cosine of x's and h's TF-IDF vectors fit on that pair alone
    (sklearn defaults, English stop words): the official loop, for all pairs at once. Fit on two texts, a
    word in both has idf 1 and a word in one has idf 1 + ln(3/2), so with word counts c_x, c_h and S the
    words the pair shares, w = 1 + ln(3/2):
        cos = Σ_S c_x c_h / √((Σ_S c_x² + w²·Σ_¬S c_x²)·(Σ_S c_h² + w²·Σ_¬S c_h²))."""
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    try:  # the same analyzer as TfidfVectorizer(stop_words="english")
        counts = CountVectorizer(stop_words="english", dtype=np.float64).fit_transform(current + stored).tocsr()
    except ValueError:  # stop words only, everywhere: an empty vocabulary
        counts = sparse.csr_matrix((len(current) + len(stored), 1))
    x_all, h = counts[: len(current)], counts[len(current):]
    if (x_all.getnnz(1) == 0).any() and (h.getnnz(1) == 0).any():
        warnings.warn("an instruction pair is made only of stop words (sklearn cannot fit TF-IDF on it); its "
                      "similarity counts as 0.", stacklevel=2)
    w2 = (1 + np.log(1.5)) ** 2
    h_sq, h_on = h.multiply(h).tocsr(), (h > 0).astype(np.float64)
    h_norm = np.asarray(h_sq.sum(1)).ravel()
    total, step = 0.0, max(1, 2 ** 22 // len(stored))  # row blocks of about 4M pairs
    for lo in range(0, len(current), step):
        x = x_all[lo: lo + step]
        x_sq = x.multiply(x).tocsr()
        dot = (x @ h.T).toarray()
        nx = w2 * np.asarray(x_sq.sum(1)) - (w2 - 1) * (x_sq @ h_on.T).toarray()
        nh = w2 * h_norm[None, :] - (w2 - 1) * ((x > 0).astype(np.float64) @ h_sq.T).toarray()
        norm = np.sqrt(nx * nh)
        total += float(np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0).sum())
    return total / (len(current) * len(stored))


class InstructionGroups:
    def __init__(self, tau: float = 0.9):
        self.tau = tau
        self.groups: list[list[str]] = []

    def similarities(self, instructions: list[str]) -> list[float]:
        return [set_similarity(instructions, h) for h in self.groups]

    def assign(self, instructions: list[str]) -> tuple[int, bool]:
        """(group, is_new) for a training task; a matched group takes the unseen instructions."""
        sims = self.similarities(instructions)
        if sims and max(sims) >= self.tau:
            g = int(np.argmax(sims))
            self.groups[g] += [x for x in instructions if x not in self.groups[g]]
            return g, False
        self.groups.append(list(dict.fromkeys(instructions)))
        return len(self.groups) - 1, True

    def route(self, instructions: list[str]) -> int:
        sims = self.similarities(instructions)
        best = int(np.argmax(sims))
        return best if sims[best] >= self.tau else len(self.groups) - 1


class LCIA(Strategy):
    def __init__(self, model, optimizer, scheduler=None, lora: dict | None = None, tau: float = 0.9,
                 fallback: float = 0.01, fixed_beta: float | None = None, max_instructions: int | None = None,
                 seed: int = 0):
        super().__init__(model, optimizer, scheduler)
        if not 0 <= tau <= 1:
            raise UserError(f"strategy.tau must be in [0, 1], got {tau}.")
        if max_instructions is not None and (not isinstance(max_instructions, int) or max_instructions < 1):
            raise UserError("strategy.max_instructions must be a positive integer or null (all instructions), "
                            f"got {max_instructions!r}.")
        self.lora = lora_config(**(lora or {}))
        self.groups = InstructionGroups(tau)
        self.fallback, self.fixed_beta = fallback, fixed_beta
        self.max_instructions, self.seed = max_instructions, seed
        self.group_of_task: list[int] = []
        self.dema_on: list[bool] = []
        self.dema_stats: list[dict] = []
        self.ema: DynamicEMA | None = None
        self.active: str | None = None  # the adapter being trained
        self.latest: str | None = None  # the adapter trained most recently (a new group's initialisation)
        self.test_sets: list[frozenset[str]] = []  # the instructions of every test set, to place a batch in its set
        self._routes: dict[frozenset, int] = {}  # test set -> group, for the groups as they are

    @staticmethod
    def name(group: int) -> str:
        return f"group{group}"

    def instructions(self, unique) -> list[str]:
        """A set's unique instructions, sorted (a seeded sample of `max_instructions` if capped)."""
        unique = sorted(unique)
        if self.max_instructions is not None and len(unique) > self.max_instructions:
            unique = sorted(random.Random(self.seed).sample(unique, self.max_instructions))
        return unique

    def setup(self, stream, context=None) -> None:
        super().setup(stream, context)
        sets = [d for e in stream for d in (e.eval, e.valid) if d is not None]
        probe = stream.retention.prompts if stream.retention is not None else None
        self.test_sets = [frozenset(d.instructions) for d in sets + ([probe] if probe is not None else [])]

    def _new_adapter(self, group: int) -> None:
        from peft import PeftModel

        name = self.name(group)
        if isinstance(self.model.lm, PeftModel) and name in self.model.lm.peft_config:
            return
        add_lora(self.model, name, self.lora)
        self.model.to(self.device)

    def _copy_adapter(self, source: str, target: str) -> None:
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for key, p in params.items():
                if f".{target}." in key:
                    p.copy_(params[key.replace(f".{target}.", f".{source}.")])

    def _activate(self, name: str) -> None:
        self.model.lm.set_adapter(name)  # peft: the active adapter trains, the others are frozen
        for key, p in self.model.named_parameters():
            p.requires_grad_(f".{name}." in key and "lora_" in key)

    def before_experience(self, exp: Experience, plan=None) -> None:
        super().before_experience(exp, plan)
        instructions = self.instructions(exp.train.instruction_set)
        similarities = self.groups.similarities(instructions)  # to the groups as they were before this task
        group, new = self.groups.assign(instructions)
        if new:
            self._new_adapter(group)
            if self.latest is not None:  # initialised from the most recent checkpoint, as the scripts do
                self._copy_adapter(self.latest, self.name(group))
        self.active = self.name(group)
        self._activate(self.active)
        self.group_of_task = self.group_of_task[: exp.index] + [group]
        self.dema_on = self.dema_on[: exp.index] + [not new]
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        self.ema = DynamicEMA(params, self.fallback, self.fixed_beta) if not new else None
        self._routes.clear()
        self.log({"event": "lcia_group", "experience": exp.index, "group": group, "new_group": new,
                  "dema": not new, "similarities": similarities})

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def after_experience(self, exp: Experience) -> None:
        stats = {"experience": exp.index, "group": self.group_of_task[-1], "dema": self.ema is not None}
        if self.ema is not None:
            self.ema.replace()
            stats.update(self.ema.stats())
        self.dema_stats = self.dema_stats[: exp.index] + [stats]
        self.latest = self.active
        self.log({"event": "lcia_dema", **stats})

    # ---- inference: route each test set, as a whole, to a group ---------------------------------
    def route_set(self, instructions: frozenset) -> int:
        if instructions not in self._routes:
            self._routes[instructions] = self.groups.route(self.instructions(instructions))
        return self._routes[instructions]

    def route(self, batch: Batch) -> str | None:
        """The group of the test set the batch comes from: the set holding all the batch's instructions."""
        if not self.groups.groups:  # before the first task: the base model
            return None
        mine = frozenset(batch.extra["instructions"])
        groups = {self.route_set(s) for s in self.test_sets if mine <= s} or {self.route_set(mine)}
        if len(groups) > 1:
            warnings.warn("a batch's instructions belong to several test sets that route to different groups; "
                          "this batch is routed by its own instructions.", stacklevel=2)
            groups = {self.route_set(mine)}
        return self.name(groups.pop())

    def _routed(self, batch: Batch, call):
        target = self.route(batch)
        if target is None or target == self.active:
            return call()
        self.model.lm.set_adapter(target)
        try:
            return call()
        finally:
            self._activate(self.active)

    @torch.no_grad()
    def predict(self, batch: Batch, keep: torch.Tensor | None = None):
        return self._routed(batch, lambda: super(LCIA, self).predict(batch, keep))

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int) -> list[str]:
        return self._routed(batch, lambda: super(LCIA, self).generate(batch, max_new_tokens))

    # ---- results and checkpoints -----------------------------------------------------------
    def results(self) -> dict:
        trained = [s for s in self.dema_stats if s["dema"]]
        updates = sum(s["updates"] for s in trained)
        counts = np.sum([s["beta_histogram"]["counts"] for s in trained], axis=0).tolist() if trained else []
        return {"groups": self.groups.groups, "group_of_task": self.group_of_task, "tau": self.groups.tau,
                "dema_on": self.dema_on, "per_task": self.dema_stats,
                "fallback_rate": sum(s["fallbacks"] for s in trained) / updates if updates else None,
                "beta_histogram": {"edges": BETA_BINS.tolist(), "counts": counts}}

    def state_dict(self) -> dict:
        return {"adapters": adapter_state(self.model), "groups": self.groups.groups,
                "group_of_task": self.group_of_task, "dema_on": self.dema_on, "dema_stats": self.dema_stats,
                "active": self.active, "latest": self.latest,
                "ema": None if self.ema is None else {"star": self.ema.star, "prev_grad": self.ema.prev_grad,
                                                       "updates": self.ema.updates, "fallbacks": self.ema.fallbacks,
                                                       "histogram": self.ema.histogram.copy(),
                                                       "reasons": dict(self.ema.reasons)}}

    def load_state_dict(self, state: dict) -> None:
        self.groups.groups = [list(g) for g in state["groups"]]
        for g in range(len(self.groups.groups)):
            self._new_adapter(g)
        load_adapter_state(self.model, state["adapters"])
        self._routes.clear()
        self.group_of_task, self.dema_on = list(state["group_of_task"]), list(state["dema_on"])
        self.dema_stats, self.active, self.latest = list(state["dema_stats"]), state["active"], state["latest"]
        if self.active is not None:
            self._activate(self.active)
        self.ema = None
        if state["ema"] is not None:  # a checkpoint inside a DEMA experience
            params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
            self.ema = DynamicEMA(params, self.fallback, self.fixed_beta)
            self.ema.star = {k: v.to(self.device) for k, v in state["ema"]["star"].items()}
            self.ema.prev_grad = {k: v.to(self.device) for k, v in state["ema"]["prev_grad"].items()}
            self.ema.updates, self.ema.fallbacks = state["ema"]["updates"], state["ema"]["fallbacks"]
            self.ema.histogram = state["ema"]["histogram"].copy()
            self.ema.reasons = dict(state["ema"]["reasons"])
