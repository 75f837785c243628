"""Continual model merging: the protocol the merging strategies share (`merge_avg`, `merge_ta`,
`opcm`), and the merges' arithmetic as functions of tensors.

The protocol (`ContinualMerging`), FusionBench's continual setting (Tang et al. 2025):

- every experience fine-tunes a fresh copy of the pretrained weights θ₀ on that task alone:
  the merged parameters (the backbone: everything but a `Classifier`'s head) are reset to θ₀,
  and the task trains its own head (in the dataset setting, its rows of the growing head, with
  cross-entropy over its own classes only);
- at the experience end its task vector τ_t = θ_t − θ₀ is merged into the running merged
  model by the method's `merge(tau)`, and the task's head rows are kept as they are;
- evaluation (`predict`, `generate`) runs the merged weights with each task's own head, so the
  accuracy matrix's row t is the model after t merges, and the continual trace inside an
  experience is the deployed merged model's (it moves only at merges). Before the first merge
  the merged model is θ₀;
- memory: θ₀, the merged weights and the fine-tune being trained (the live model), never T
  models; the merge's own state is a few scalars. The merged weights are swapped into the
  live parameters for an evaluation (a pointer swap, no copy) and swapped back after.
- Each fine-tuned model's accuracy on its own task (before it is merged, the upper bound of
  merging) is recorded in `results.json` under `strategy.individual_accuracy` (instruction
  tasks: `individual_token_accuracy`, teacher-forced).

Batch norm (a difference from the papers' CLIP-ViT, which has only layer norm): fine-tuning
keeps every batch-norm layer in eval mode, so its running statistics stay θ₀'s in every
fine-tuned model and in the merged one (merging running variances has no meaning), while its
affine weights train and merge like any other non-matrix parameter.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cl.stream import Batch, Experience
from cl.strategy import Plan, Strategy
from strategies.passes import eval_batches


def global_norm(tensors) -> float:
    """One L2 norm over every tensor (FusionBench's task-vector norm: the whole flattened model)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def split_rank(s: Tensor, alpha: float) -> int:
    """How many leading singular directions OPCM protects: the count of leading singular values
    whose cumulative share of their sum (not of squares) stays at or below `alpha`. As in the
    official code (the first index whose share exceeds alpha), a count covering every value
    (alpha >= 1) or an all-zero spectrum protects none."""
    share = s.cumsum(0) / s.sum()
    r = int((share <= alpha).sum())
    return r if r < len(s) else 0


def project_out(merged_tv: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """OPCM's cleaned task vector of one matrix: τ in the singular bases (full U, V) of the merged
    task vector, P = Uᵀ τ V, loses every diagonal entry and the top-left r×r block (r =
    `split_rank`), and returns to weight space: U P Vᵀ. Computed in float32 at least."""
    dtype = torch.promote_types(tau.dtype, torch.float32)
    u, s, vh = torch.linalg.svd(merged_tv.to(dtype), full_matrices=True)
    r = split_rank(s, alpha)
    p = u.T @ tau.to(dtype) @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0
    return (u @ p @ vh).to(tau.dtype)


def matrix_view(module: nn.Module, conv: str) -> bool:
    """Whether `module`'s `weight` is a matrix OPCM projects: every `nn.Linear`, and with
    `conv="reshape"` every convolution, whose kernel (out, in/groups, k, k) is the matrix out ×
    (in/groups·k·k) it applies to each patch (im2col); `conv="skip"` leaves kernels unprojected,
    as the official code (written for CLIP-ViT, whose only convolution is the patch embedding)."""
    if isinstance(module, nn.Linear):
        return True
    return conv == "reshape" and isinstance(module, nn.modules.conv._ConvNd)


class ContinualMerging(Strategy):
    """The shared protocol; a method implements `merge(tau) -> merged` (dicts of tensors by name)
    and its `merge_state`."""

    conv = "skip"  # how `matrices` treats convolution kernels (OPCM's option; see `matrix_view`)

    def __init__(self, model: nn.Module, optimizer, scheduler=None):
        super().__init__(model, optimizer, scheduler)
        self.base: dict[str, Tensor] = {}  # θ₀
        self.merged: dict[str, Tensor] | None = None  # None until the first merge: θ₀
        self.merges = 0
        self.heads: dict[int, dict[str, Tensor]] = {}  # each task's head rows, as trained
        self.individual: list[float] = []  # each fine-tuned model on its own task, before merging

    # ---- what is merged ------------------------------------------------------------------
    def merged_parameters(self) -> dict[str, nn.Parameter]:
        """The live parameters the merge covers: all but a classifier's per-task head."""
        return {n: p for n, p in self.model.named_parameters() if not n.startswith("head.")}

    def matrices(self) -> set[str]:
        """Names of the merged weights that are matrices to OPCM (see `matrix_view`)."""
        merged = self.merged_parameters()
        return {f"{prefix}.weight" for prefix, module in self.model.named_modules()
                if f"{prefix}.weight" in merged and matrix_view(module, self.conv)}

    @contextmanager
    def merged_weights(self):
        """The merged weights in the live parameters for the block (θ₀ before any merge)."""
        values = self.merged if self.merged is not None else self.base
        params = self.merged_parameters()

        def swap():
            for n, p in params.items():
                p.data, values[n] = values[n], p.data

        swap()
        try:
            yield
        finally:
            swap()

    # ---- hooks --------------------------------------------------------------------------
    def setup(self, stream, context=None) -> None:
        super().setup(stream, context)
        self.base = {n: p.detach().clone() for n, p in self.merged_parameters().items()}
        self._norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def before_experience(self, exp: Experience, plan: Plan | None = None) -> None:
        super().before_experience(exp, plan)
        for n, p in self.merged_parameters().items():  # a fresh fine-tune of θ₀
            p.copy_(self.base[n])

    def _task_columns(self, exp: Experience) -> Tensor:
        return torch.as_tensor(exp.classes, device=self.device)  # labels are columns, contiguous per task

    def training_step(self, batch: Batch) -> Tensor:
        for m in self._norms:  # batch norm keeps θ₀'s statistics (module docstring)
            m.eval()
        return super().training_step(batch)  # the dataset setting: cross-entropy within the task's own head

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        self.individual.append(self._own_score(exp))
        if self.stream.modality == "classification":
            head = self.model.head.fc
            self.heads[exp.index] = {k: v[self._task_columns(exp)].clone() for k, v in head.state_dict().items()}
            for i, rows in self.heads.items():  # rows of earlier tasks as they were trained
                for k, v in head.state_dict().items():
                    v[self._task_columns(self.stream[i])] = rows[k]
        tau = {n: p.detach() - self.base[n] for n, p in self.merged_parameters().items()}
        self.merged = self.merge(tau)
        self.merges += 1

    def _own_score(self, exp: Experience) -> float:
        """The fine-tuned model (live weights, before merging) on its own task's eval split: accuracy
        through its own head, or an instruction task's teacher-forced token accuracy."""
        total = score = 0.0
        if self.stream.modality == "classification":
            cols = self._task_columns(exp)
            for batch in eval_batches(self, exp.eval, 256):
                score += int((cols[self.model(batch.x)[:, cols].argmax(1)] == batch.y).sum())
                total += len(batch.y)
        elif self.stream.modality == "instruction":
            from cl.evaluation.text import teacher_forced_scores

            for batch in eval_batches(self, exp.eval, 8):
                score += teacher_forced_scores(self.model(batch.x, batch.y != -100), batch)[1]
                total += len(batch.y)
        return score / total if total else float("nan")

    def predict(self, batch: Batch, keep: Tensor | None = None) -> Tensor:
        with self.merged_weights():
            return super().predict(batch, keep)

    def generate(self, batch: Batch, max_new_tokens: int) -> list[str]:
        with self.merged_weights():
            return super().generate(batch, max_new_tokens)

    def merge(self, tau: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    # ---- results and checkpoints ---------------------------------------------------------
    def merge_state(self) -> dict:
        return {}

    def load_merge_state(self, state: dict) -> None:
        pass

    def results(self) -> dict:
        what = "individual_token_accuracy" if self.stream.modality == "instruction" else "individual_accuracy"
        return {what: self.individual, "merges": self.merges,
                "merged_parameters": sum(p.numel() for p in self.merged_parameters().values()),
                "state_bytes": self.state_bytes()}

    def state_bytes(self) -> int:
        """Bytes of the merging state (θ₀, the merged weights, the method's own state): constant in T."""
        tensors = list(self.base.values()) + list((self.merged or {}).values())
        tensors += [v for v in self.merge_state().values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "base": self.base, "merged": self.merged, "merges": self.merges,
                "heads": self.heads, "individual": self.individual, "method": self.merge_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)  # the live model: the fine-tune in progress and the heads
        to = lambda d: None if d is None else {k: v.to(self.device) for k, v in d.items()}  # noqa: E731
        self.base, self.merged, self.merges = to(state["base"]), to(state["merged"]), state["merges"]
        self.heads = {i: to(rows) for i, rows in state["heads"].items()}
        self.individual = list(state["individual"])
        self.load_merge_state(state["method"])
