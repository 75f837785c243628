"""AdaB²N: adaptive balance of batch normalisation (Lyu et al., NeurIPS 2023).

`setup` swaps every layer whose type is exactly `nn.BatchNorm2d` for an
`AdaB2NNorm` loaded from that layer's state. In train mode the layer

1. weights each sample's statistics by its task (when k > 0 finished tasks and
   the base method replays): c_j = exp(a_j) + n_j, ω_j = c_j / Σ_{j'≤k} c_j',
   w_i = ω_τ(i) / n_τ(i); μ = Σ w_i mean_hw(x_i), σ² = Σ w_i mean_hw((x_i-μ)²).
   Otherwise it uses the biased batch statistics;
2. normalises with them: γ(x-μ)/√(σ²+ε) + β;
3. updates the running statistics with the modified momentum η_t: κ=1 gives the
   BN momentum m; κ=0 the cumulative average 1/n, where n is the layer's
   num_batches_tracked, carried over from the replaced BN (so a BN trained before
   the swap continues its average rather than restarting it); otherwise η₁ = m^κ
   and η_t = η_{t-1} / (η_{t-1} + (1-m)^κ), an EMA with per-step decay (1-m)^κ;
   the running variance is the *biased* σ²;
4. leaves R = MSE(μ, μ_run) + MSE(σ², σ²_run) (running stats after the update)
   for the strategy, which adds λ·Σ_layers R to the loss from task t₀ on.

In eval mode it is ordinary BN with the running statistics.

Composition: `AdaB2N` wraps any strategy by configuration (the `base` node of
`conf/strategy/adab2n.yaml`, ER-ACE by default; DER++ and ER plug in the same way),
reading only what a replay strategy declares (`Replays` in strategies/buffer.py:
`joint_forward`, `replay_batches`); a base that does not replay gets neither the task
weighting nor the regulariser.
The per-sample task is the sample's experience label t (stream and buffer
samples both carry it); the official code derives it as y // classes_per_task,
which is the same thing when each task's labels are contiguous, and this also
holds for B{base}Inc{inc} streams with base ≠ inc.

Followed from the official code (the paper's text says less): the stream and
replay samples go through one concatenated forward (`joint_forward`, so one set
of statistics and one η step per training step; plain ER concatenates anyway);
the regulariser is added only in steps that replay; the task weights
are *not* renormalised when a task has no sample in the batch (Σ w_i < 1 then);
`a` has one entry per task of the stream and shares the network's lr and weight
decay. The presets also set what the official base methods (Mammoth's) assume: a
head over all classes from the first task (`model.fixed_head=true`) and, on
ER-ACE, er_ace_ada's mask (`strategy.base.mask=mammoth`, see strategies/replay.py).

Differences from the official code (lvyilin/AdaB2N):
- η, t and k are buffers, so they are in the `state_dict` and a resumed run
  continues exactly (the official `last_eta` is a plain attribute and is lost);
- outside the presets, the base strategy and model keep their own defaults (ER-ACE's
  `mask=present`, a head that grows with the classes seen).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.errors import UserError
from cl.strategy import Strategy
from strategies.buffer import Replays


class AdaB2NNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_tasks: int, kappa: float = 1.0, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        if not 0.0 <= kappa <= 1.0:
            raise UserError(f"strategy.kappa must be in [0, 1], got {kappa}.")
        self.kappa = float(kappa)
        self.a = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer("eta", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # t: train-mode forwards
        self.register_buffer("finished", torch.zeros((), dtype=torch.long))  # k: finished tasks
        self.task_ids: Tensor | None = None  # per-sample task of the next train forward (None: no weighting)
        self._t, self._k, self._eta, self._n = 0, 0, 0.0, 0  # host mirrors of the buffers (no device sync per forward)
        self.reg_sum: Tensor | None = None  # Σ R over the train forwards since the strategy reset it

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, num_tasks: int, kappa: float) -> "AdaB2NNorm":
        layer = cls(bn.num_features, num_tasks, kappa, bn.eps, bn.momentum if bn.momentum is not None else 0.1, bn.affine)
        layer.load_state_dict(bn.state_dict(), strict=False)
        return layer.to(bn.running_mean.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._t, self._k, self._eta = int(self.steps), int(self.finished), float(self.eta)
        self._n = int(self.num_batches_tracked)

    def finish_task(self) -> None:
        self._k += 1
        self.finished.fill_(self._k)

    def next_eta(self) -> float:
        """Advance t and the BN's num_batches_tracked n, and return η_t (κ = 0: 1/n)."""
        self._t += 1
        self._n += 1
        self.num_batches_tracked.fill_(self._n)
        m, t = self.momentum, self._t
        if self.kappa == 1.0:
            eta = m
        elif self.kappa == 0.0:
            eta = 1.0 / self._n  # continues the count of a BN trained before the swap
        elif t == 1:
            eta = m ** self.kappa
        else:
            eta = self._eta / (self._eta + (1.0 - m) ** self.kappa)
        self._eta = eta
        self.steps.fill_(t)
        self.eta.fill_(eta)
        return eta

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, biased σ²) per channel: task-weighted when k > 0 and task ids are set."""
        k = self._k
        if k == 0 or self.task_ids is None:
            mean = x.mean((0, 2, 3))
            return mean, (x - mean[None, :, None, None]).pow(2).mean((0, 2, 3))
        tau = self.task_ids.clamp(max=k)
        counts = torch.bincount(tau, minlength=k + 1)[: k + 1].to(x.dtype)
        c = self.a[: k + 1].exp().to(x.dtype) + counts
        omega = c / c.sum()
        w = omega[tau] / counts[tau]  # per-sample weight; Σ w = 1 - Σ_{absent j} ω_j (as the official code)
        mean = torch.einsum("n,nc->c", w, x.mean((2, 3)))
        var = torch.einsum("n,nc->c", w, (x - mean[None, :, None, None]).pow(2).mean((2, 3)))
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        out_dtype = x.dtype
        x = x.float()  # statistics in float32 under AMP
        mean, var = self.statistics(x)
        self.task_ids = None  # set again by the strategy before its next forward
        eta = self.next_eta()
        with torch.no_grad():
            self.running_mean.mul_(1 - eta).add_(mean.detach(), alpha=eta)
            self.running_var.mul_(1 - eta).add_(var.detach(), alpha=eta)
        # against the running stats after this update (copies: later forwards update the buffers in place)
        reg = F.mse_loss(mean, self.running_mean.clone()) + F.mse_loss(var, self.running_var.clone())
        self.reg_sum = reg if self.reg_sum is None else self.reg_sum + reg
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(out_dtype)


def swap_batchnorm(model: nn.Module, num_tasks: int, kappa: float) -> list[AdaB2NNorm]:
    """Replace every module of type exactly `nn.BatchNorm2d` in place; returns the new layers."""
    layers = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                layer = AdaB2NNorm.from_bn(child, num_tasks, kappa)
                setattr(module, child_name, layer)
                layers.append(layer)
    return layers


class AdaB2NMixin:
    """The AdaB²N hooks; `AdaB2N(...)` puts them in front of the base strategy's class."""

    kappa: float
    lam: float
    t0: int

    def setup(self, stream, context=None):
        super().setup(stream, context)
        self.norms = swap_batchnorm(self.model, len(stream), self.kappa) if self.norm == "adab2n" else []
        if self.norm == "adab2n" and not self.norms:
            raise UserError("strategy=adab2n found no BatchNorm2d layer in the model; use a CNN with batch norm "
                            "(e.g. model=resnet18_reduced).")

    @property
    def replays(self) -> bool:
        """Whether the base method replays (declares `Replays`)."""
        return isinstance(self, Replays)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        tasks = t if (self.replays and t is not None) else None
        for layer in self.norms:
            layer.task_ids = tasks
        return super().forward(x, t)

    def training_step(self, batch):
        for layer in self.norms:
            layer.reg_sum = None
        drawn = self.replay_batches if self.replays else 0
        loss = super().training_step(batch)
        replayed = self.replays and self.replay_batches > drawn
        if replayed and self.lam and self.experience_index >= self.t0:
            # λ·Σ_layers R, only in steps that replay (as the official code)
            regs = [layer.reg_sum for layer in self.norms if layer.reg_sum is not None]
            if regs:
                loss = loss + self.lam * torch.stack(regs).sum()
        return loss

    def after_experience(self, exp):
        super().after_experience(exp)
        for layer in self.norms:
            layer.finish_task()


def AdaB2N(model, optimizer, scheduler=None, base=None, kappa: float = 0.1, lam: float = 0.1, t0: int = 0,
           norm: str = "adab2n") -> Strategy:
    """The `base` strategy (a `functools.partial` of a Strategy class, as Hydra builds it
    from a node with `_partial_: true`) with the AdaB²N hooks in front of its own.
    `norm="bn"` keeps ordinary batch norm: the base method alone, for the ablation."""
    if norm not in ("adab2n", "bn"):
        raise UserError(f"strategy.norm must be adab2n or bn, not {norm!r}.")
    base_cls = getattr(base, "func", None)
    if not (isinstance(base_cls, type) and issubclass(base_cls, Strategy)):
        raise UserError("strategy.base must be a strategy config with _partial_: true (e.g. the ER-ACE config); "
                        "see conf/strategy/adab2n.yaml.")
    cls = type(f"AdaB2N{base_cls.__name__}", (AdaB2NMixin, base_cls), {})
    options = dict(base.keywords)
    if norm == "adab2n" and issubclass(base_cls, Replays):
        options["joint_forward"] = True  # stream and replay samples in one forward (one set of statistics)
    strategy = cls(model=model, optimizer=optimizer, scheduler=scheduler, *base.args, **options)
    strategy.kappa, strategy.lam, strategy.t0, strategy.norm = float(kappa), float(lam), int(t0), norm
    return strategy
