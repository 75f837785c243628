"""Dynamic sparse training for continual learning (Yildirim et al., CPAL 2024).

Task-incremental parameter isolation with one sparse mask per task over every
conv and linear weight (the shared head included; biases and BN excluded; BN is
made `affine=False, track_running_stats=False`, as in the official models).

For task t, with U the union of the earlier masks and W∪ the union weights:

1. a fresh mask M_t, each entry of layer l drawn with probability d_l (`init=uniform`:
   d_l = d; `init=ERK`: d_l ∝ (Σ dims)/(Π dims), capped at 1, scaled to the global d),
   independently of U, so about d·|U| of it reuses frozen old weights
   (`mask_draw=exact`, kept from our earlier version, takes exactly round(d_l·n_l)
   entries per layer instead);
2. W ← W∪ ⊙ M_t (the first task starts from the random init ⊙ M_0; later tasks'
   new positions start at 0), a new optimizer;
3. every step: cross-entropy over the task's classes; gradients on U zeroed;
   optimizer step; W ← W ⊙ M_t;
4. every ΔT steps (`update_every`; the task's last step too when ΔT divides it), per
   layer: drop the ⌈r·nnz⌉ active weights of smallest |w| (r decays with a cosine
   from `drop_start`=0.5 to `drop_end`=0.005 over the task's optimizer steps, `plan.steps`) and grow as many
   inactive positions by `growth`: `random`, `unfired` (prefers positions never
   active during this task), `gradient` (RigL, top |∇L|) or `momentum` (top |m̂/√v̂|
   from Adam);
5. the weights and mask of the epoch with the best training accuracy (argmax over
   all classes' logits against the label) are kept;
6. merge: W∪ takes the task's weights where M_t, U ← U ∪ M_t, M_t is stored.

Evaluation of task j uses W∪ ⊙ M_j (the live weights for the task in training),
with logits restricted to the task's classes (`eval_logits=task`, the default) or
the official unrestricted argmax over all classes (`eval_logits=all`: the primary
accuracy is then the task-agnostic one). BN uses the test batch's statistics, as
in the official code. Forgetting is zero by construction.

Deviations from the official code:
- the default `eval_logits=task` (task-aware accuracy, the framework's primary
  accuracy in the task setting); `eval_logits=all` is the official measurement;
- drop and grow remove and add exactly the same number of weights (the official
  magnitude threshold can drop more when weights tie at 0; its random growth is
  a Bernoulli draw), so every layer keeps its mask size; just-dropped positions
  are not regrown in the same update (RigL's rule);
- r is the closed-form cosine (the official reads it from torch's
  `CosineAnnealingLR`, equal up to rounding); random draws come from seeded
  generators of their own (identical on every rank, the same after a resume);
- parameters outside the masks other than the head's bias (hidden biases of an
  MLP, say) train in the first task only; the official models have none.

A regrown position of an earlier task stays 0 while this task trains, as in the
official code, but evaluation (W∪ ⊙ M_t) sees its old value; the option
`revived=old` gives it the old value during training too.

The head's bias is shared and unmasked, as in the official code: a task's loss
reaches only its own classes' entries, so with weight decay 0 (the default) the
other entries never move. With `eval_logits=all` the later classes' entries do
move, so an old task's unrestricted argmax can change (the official measurement).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl import distributed
from cl.errors import UserError
from cl.stream import Batch
from cl.strategy import Strategy
from strategies.per_task import KeepBest, ParameterSet


def erk_densities(shapes: list[tuple[int, ...]], density: float) -> list[float]:
    """Erdős–Rényi-kernel densities: d_l = min(1, ε·Σdims_l/Πdims_l), with ε chosen so
    that Σ d_l·n_l = density·Σ n_l (layers that would exceed 1 are dense)."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        eps = budget / sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.add(max(over, key=lambda i: raw[i]))


def cosine_drop_rate(step: int, total: int, start: float = 0.5, end: float = 0.005) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


class DST(Strategy):
    def __init__(self, model, optimizer, scheduler=None, density: float = 0.2, init: str = "uniform",
                 growth: str = "random", update_every: int = 400, drop_start: float = 0.5, drop_end: float = 0.005,
                 eval_logits: str = "task", keep_best: bool = True, revived: str = "zero", mask_draw: str = "bernoulli",
                 seed: int = 0):
        super().__init__(model, optimizer, scheduler)
        if not 0 < density <= 1:
            raise UserError(f"strategy.density must be in (0, 1], got {density}.")
        choices = {"init": (init, ("uniform", "ERK")), "growth": (growth, ("random", "unfired", "gradient", "momentum")),
                   "eval_logits": (eval_logits, ("task", "all")), "revived": (revived, ("zero", "old")),
                   "mask_draw": (mask_draw, ("bernoulli", "exact"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise UserError(f"strategy.{key} must be one of {', '.join(allowed)}, not {value!r}.")
        if not isinstance(update_every, int) or update_every <= 0:
            raise UserError(f"strategy.update_every must be a positive integer, got {update_every!r}.")
        self.density, self.init, self.growth, self.update_every = density, init, growth, update_every
        self.drop_start, self.drop_end = drop_start, drop_end
        self.eval_logits, self.keep_best, self.revived, self.mask_draw = eval_logits, keep_best, revived, mask_draw
        self.seed = seed
        self.task_aware_accuracy = eval_logits == "task"
        self.masks: dict[int, list[Tensor]] = {}  # M_j of every finished task
        self.best = KeepBest()

    # ---- set-up ---------------------------------------------------------------------
    def setup(self, stream, context=None):
        super().setup(stream, context)
        if stream.setting != "task":
            raise UserError("strategy=dst is task-incremental (a task id picks the mask); set scenario.setting=task.")
        self.model.grow(stream.num_classes)  # one shared head over all classes
        for module in list(self.model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and (child.affine or child.track_running_stats):
                    setattr(module, name, type(child)(child.num_features, eps=child.eps, affine=False,
                                                      track_running_stats=False).to(self.device))
        layers = {n: m.weight for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        if not layers:
            raise UserError("strategy=dst found no conv or linear layer to sparsify.")
        self.weights = list(layers.values())
        self.weight_set = ParameterSet(layers)  # a finished task j's set is W∪ ⊙ M_j
        head_bias = getattr(self.model.head.fc, "bias", None) if hasattr(self.model, "head") else None
        masked = {id(w) for w in self.weights} | ({id(head_bias)} if head_bias is not None else set())
        self.others = [p for p in self.model.parameters() if id(p) not in masked]
        shapes = [tuple(w.shape) for w in self.weights]
        self.layer_density = erk_densities(shapes, self.density) if self.init == "ERK" else [self.density] * len(shapes)
        self.init_weights = [w.detach().clone() for w in self.weights]
        self.union_w = [torch.zeros_like(w) for w in self.weights]
        self.used = [torch.zeros_like(w, dtype=torch.bool) for w in self.weights]  # U

    def _draw_mask(self, task: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (task + 1))
        masks = []
        for w, d in zip(self.weights, self.layer_density):
            n = w.numel()
            if self.mask_draw == "bernoulli":  # each entry with probability d (official)
                m = torch.rand(n, generator=g) < d
            else:  # exactly round(d·n) entries
                m = torch.zeros(n, dtype=torch.bool)
                m[torch.randperm(n, generator=g)[: round(d * n)]] = True
            masks.append(m.view_as(w).to(w.device))
        return masks

    def before_experience(self, exp, plan=None):
        super().before_experience(exp, plan)
        t = exp.index
        self.mask = self._draw_mask(t)
        self.fired = [m.clone() for m in self.mask]
        self.reuse = [u & m for u, m in zip(self.used, self.mask)]  # earlier weights this task uses, frozen
        with torch.no_grad():
            for w, m, u, wu, w0 in zip(self.weights, self.mask, self.used, self.union_w, self.init_weights):
                w.copy_(torch.where(u, wu, w0 if t == 0 else torch.zeros_like(w)) * m)
        for p in self.others:
            p.requires_grad_(t == 0)
        self.step = 0
        self.total_steps = max(plan.steps, 1)  # optimizer steps of the task: the drop rate's cosine spans them
        self.correct = self.seen = 0
        self.best.reset()

    def parameters_to_optimize(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch: Batch) -> Tensor:
        classes = torch.tensor(sorted(self.experience.classes), device=batch.y.device)
        logits = self.forward(batch.x, batch.t)
        with torch.no_grad():  # for the best epoch: argmax over all classes against the label (official)
            self.correct += int((logits.argmax(1) == batch.y).sum())
            self.seen += len(batch.y)
        return F.cross_entropy(logits[:, classes], torch.searchsorted(classes, batch.y))

    def after_backward(self) -> None:
        for w, u in zip(self.weights, self.used):
            if w.grad is not None:
                w.grad.masked_fill_(u, 0.0)

    @torch.no_grad()
    def _apply_mask(self) -> None:
        for w, m, u, r, wu in zip(self.weights, self.mask, self.used, self.reuse, self.union_w):
            # reused earlier weights stay exactly as merged; a revived one (regrown into U) stays 0 (official)
            w.copy_(torch.where(r, wu, torch.where(u, torch.zeros_like(w), w)) * m)
            buf = self.optimizer.state.get(w, {}).get("momentum_buffer") if self.optimizer is not None else None
            if buf is not None:  # SGD momentum is masked too (official)
                buf.mul_(m)

    def after_optimizer_step(self) -> None:
        self._apply_mask()
        self.step += 1
        if self.step % self.update_every == 0:  # the task's last step included (official)
            self.update_topology()

    @torch.no_grad()
    def update_topology(self) -> None:
        rate = cosine_drop_rate(self.step, self.total_steps, self.drop_start, self.drop_end)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * (self.experience_index + 1) + self.step)
        for i, (w, m) in enumerate(zip(self.weights, self.mask)):
            flat_m = m.view(-1)
            active = flat_m.nonzero().squeeze(1)
            k = math.ceil(rate * active.numel())
            inactive = (~flat_m).nonzero().squeeze(1)
            k = min(k, inactive.numel())
            if k == 0:
                continue
            order = w.view(-1)[active].abs().argsort(stable=True)
            dropped = active[order[:k]]
            grown = inactive[self._grow_order(i, inactive, g)[:k]]
            flat_m[dropped] = False
            flat_m[grown] = True
            self.fired[i].view(-1)[grown] = True
        if self.revived == "old":
            self.reuse = [u & m for u, m in zip(self.used, self.mask)]
        else:
            self.reuse = [r & m for r, m in zip(self.reuse, self.mask)]
        self._apply_mask()

    def _grow_order(self, i: int, candidates: Tensor, g: torch.Generator) -> Tensor:
        """Candidates (inactive before the drop) ordered by growth preference."""
        w = self.weights[i]
        if self.growth == "random":
            return torch.randperm(candidates.numel(), generator=g).to(candidates.device)
        if self.growth == "unfired":
            rand = torch.rand(candidates.numel(), generator=g).to(candidates.device)
            unfired = ~self.fired[i].view(-1)[candidates]
            return torch.argsort(rand - unfired.float(), stable=True)  # never-fired first, random within each
        if self.growth == "gradient":
            if w.grad is None:
                return torch.randperm(candidates.numel(), generator=g).to(candidates.device)
            return w.grad.view(-1)[candidates].abs().argsort(descending=True, stable=True)
        state = self.optimizer.state.get(w, {})
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            raise UserError("strategy.growth=momentum needs Adam's moments; use optimizer=adam or another growth.")
        group = next(gr for gr in self.optimizer.param_groups if any(p is w for p in gr["params"]))
        step = float(state["step"])
        b1, b2 = group["betas"]
        m_hat = state["exp_avg"] / (1 - b1 ** step)
        v_hat = state["exp_avg_sq"] / (1 - b2 ** step)
        score = (m_hat / (v_hat.sqrt() + group["eps"])).abs()
        return score.view(-1)[candidates].argsort(descending=True, stable=True)

    def after_epoch(self, epoch: int) -> None:
        correct, seen = distributed.all_sum([self.correct, self.seen], self.device)  # DDP: every rank's share
        acc = correct / max(seen, 1)
        self.correct = self.seen = 0
        if self.keep_best:
            self.best.offer(acc, self._snapshot)

    def _snapshot(self) -> dict:
        return {"mask": [m.clone() for m in self.mask], "reuse": [r.clone() for r in self.reuse],
                "params": [p.detach().clone() for p in self.model.parameters()]}

    @torch.no_grad()
    def after_experience(self, exp):
        super().after_experience(exp)
        if self.keep_best and self.best.state is not None:
            best = self.best.state
            for p, v in zip(self.model.parameters(), best["params"]):
                p.copy_(v)
            self.mask, self.reuse = best["mask"], best["reuse"]
        self._apply_mask()
        for w, m, u, wu in zip(self.weights, self.mask, self.used, self.union_w):
            wu.copy_(torch.where(m & ~u, w, wu))  # the new weights; earlier ones keep their merged values
            u |= m
        self.masks[exp.index] = [m.clone() for m in self.mask]
        self.best.reset()

    # ---- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        tasks = batch.t.unique().tolist()
        if any(t < 0 for t in tasks):
            raise UserError("strategy=dst needs task ids at evaluation; set scenario.setting=task.")
        out = None
        with self.weight_set.swapped() as use:
            for t in tasks:  # a finished task (the one that just ended included): W∪ ⊙ M_t; else the live weights
                use(self.task_weights(t) if t in self.masks else None)
                rows = batch.t == t
                logits = self.model(batch.x[rows])
                if self.eval_logits == "task":
                    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                    keep[torch.tensor(self.stream[t].classes, device=logits.device)] = True
                    logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
                out = logits.new_zeros(len(batch), logits.shape[1]) if out is None else out
                out[rows] = logits
        return out

    def task_weights(self, t: int) -> dict[str, Tensor]:
        return {n: wu * m for n, wu, m in zip(self.weight_set.tensors, self.union_w, self.masks[t])}

    def baseline(self):
        """The head spans every class from `setup` on, so the untrained model is the live one:
        the evaluator's baseline needs no copy (`predict` restores the live weights)."""
        return nullcontext()

    # ---- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "masks": self.masks, "mask": self.mask, "fired": self.fired, "reuse": self.reuse,
                "union_w": self.union_w, "used": self.used, "init_weights": self.init_weights, "step": self.step,
                "correct": (self.correct, self.seen), "best": self.best.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dev = self.device
        self.masks = {int(k): [m.to(dev) for m in v] for k, v in state["masks"].items()}
        self.mask = [m.to(dev) for m in state["mask"]]
        self.fired = [m.to(dev) for m in state["fired"]]
        self.reuse = [m.to(dev) for m in state["reuse"]]
        for mine, saved in ((self.union_w, state["union_w"]), (self.used, state["used"]),
                            (self.init_weights, state["init_weights"])):
            for a, b in zip(mine, saved):
                a.copy_(b)
        self.step = state["step"]
        self.correct, self.seen = state["correct"]
        self.best.load_state_dict(state["best"], dev)
