"""MOS: model surgery for pre-trained-model-based class-incremental learning
(Sun et al., AAAI 2025).

A frozen ViT with one AdaptFormer adapter set (`cl.models.vit_adapter`), trained
across all tasks (never re-initialised), and a linear head over the seen classes.

Task t trains the adapters and the head with cross-entropy (old classes' logits
masked) plus `reg`·L_reg, L_reg = CE(M Mᵀ / `reg_temperature`, identity) with M the
stored class means of all earlier classes stacked on the batch's features
(un-normalised). After every optimizer step with t ≥ 1 the adapter is merged
toward the mean of the earlier tasks' adapters: A ← (1-α)A + α·mean_{k<t} A_k
(prefix sums of the snapshots as taken). When task t ends:

- the adapter is snapshotted as A_t;
- each new class gets a Gaussian (mean, full covariance + 1e-4·I, or diagonal with
  `covariance=diagonal`, the official `variance`) of its features under the live adapter;
- for t ≥ 1 the head is re-aligned on samples from the Gaussians: `ca_epochs`
  epochs of 5·batch samples per class, SGD `ca_lr` with momentum 0.9, weight
  decay `ca_weight_decay` (the run's optimizer weight decay, as the official
  code), cosine schedule;
- the new classes' prototypes are computed with the *first* task's adapter A₀
  (train images, eval transform) for the cosine classifier z₀ = cos(f_{A₀}(x), p_c).

Inference, self-refined retrieval: the initial task of a sample is the task of
argmax z₀; then at most `max_rounds` (4) head evaluations z = head(f_{A_t̂}(x)),
each moving t̂ to the task of argmax z and stopping when it stays; the output is
softmax(z) + softmax((t+1)·z₀) (`ensemble=true`). While a task trains (continual
evaluation, which the official code does not have), its classes have no prototype
yet, so predictions use the head on the live adapter's features.

Diagnostics (`results()`, in results.json under `strategy`): task-retrieval accuracy,
the share of the finished experiences' eval-split samples whose own task the initial
guess (argmax z₀) finds, and after refinement (argmax z), with the final adapters and
prototypes. They come from a pass of their own at the run's end, so `predict` counts
nothing and the evaluator's order of calls cannot change them (under `merge=paper`
`predict` changes nothing at all; `merge=official` rewrites adapters, as below).

`merge=official` is the official code's merge: besides the post-step merge, every
forward (train and eval) merges the whole adapter set in use before each block
(block l computes with l+1 merges, 12 per forward), by rebinding `.data` as the
official code does, so a training step's gradients use the values each block used.
The merged values stay: training forwards leave the live adapter merged, the class
statistics keep merging it (class by class in batches of 3·batch size, as the
official loop), and evaluations rewrite the stored A_k (k ≥ 1).

Deliberate differences from the official code:

- `merge=paper` is the default: the merge runs once after each optimizer step only,
  stored adapters never change, and the A₀ prototypes of tasks ≥ 1 are computed
  with dropout off (the official code computes them right after the alignment,
  which leaves the model in train mode). `merge=official` is the official behaviour.
- `retrieval=lazy` is the default: only the adapters the refinement visits are
  computed, batched by the current guess; predictions equal the official
  all-adapters pass (`retrieval=eager`) under `merge=paper`. `merge=official`
  needs `retrieval=eager`, since there the result depends on the order of evaluation.
- With `merge=official`, every evaluation forward at a task's end rewrites the
  stored adapters, so their values follow our evaluator's forwards (its batch size,
  the continual-evaluation subsets at the task's last trace point, and every
  experience, seen or not, of the accuracy matrix), not the official test loop's
  (batches of the training batch size over the seen classes). Continual evaluation
  during a task merges a copy of the live adapter, so it does not change training.
- The head's learning rate is its own setting (`head_lr`); the official code fixes
  it at 0.1 × the adapters' lr (the presets set it so).
- The alignment draws its Gaussian samples and shuffles from a generator seeded by
  the run seed and the task (same distribution; reproducible on resume); the
  official code uses the global random state.
- The official `multi-centroid` class statistics (KMeans) are not offered.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from cl import distributed
from cl.errors import UserError
from cl.models.vit_adapter import ADAPTER_KEYS, AdapterViT
from cl.stream import Batch
from cl.strategy import Strategy
from strategies.passes import eval_batches
from strategies.prototypes import class_features, class_means, grow_rows


def sample_class_features(means: Tensor, covs: Tensor, per_class: int, generator: torch.Generator,
                          diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """`per_class` samples from N(μ_c, Σ_c) for every class c (row of `means`), with labels."""
    feats, labels = [], []
    for c, mu in enumerate(means):
        z = torch.randn(per_class, mu.numel(), generator=generator).to(mu.device)
        if diagonal:
            x = mu + z * covs[c].sqrt()
        else:
            x = mu + z @ torch.linalg.cholesky(covs[c]).T
        feats.append(x)
        labels.append(torch.full((per_class,), c, dtype=torch.long, device=mu.device))
    return torch.cat(feats), torch.cat(labels)


class MOS(Strategy):
    def __init__(self, model, optimizer, scheduler=None, ffn_num: int = 16, adapter_scale: float = 0.1,
                 adapter_dropout: float = 0.1, alpha: float = 0.1, reg: float = 0.1, reg_temperature: float = 0.8,
                 head_lr: float = 0.003, merge: str = "paper", retrieval: str = "lazy", max_rounds: int = 4,
                 ensemble: bool = True, covariance: str = "full", ca_epochs: int = 30, ca_lr: float = 0.005,
                 ca_weight_decay: float = 5e-4, ca_per_class: int | None = None, batch_size: int | None = None,
                 eval_batch_size: int = 256, seed: int = 0):
        super().__init__(model, optimizer, scheduler)
        for key, value, allowed in (("merge", merge, ("paper", "official")), ("retrieval", retrieval, ("lazy", "eager")),
                                    ("covariance", covariance, ("full", "diagonal"))):
            if value not in allowed:
                raise UserError(f"strategy.{key} must be one of {', '.join(allowed)}, not {value!r}.")
        if merge == "official" and retrieval == "lazy":
            raise UserError("strategy.merge=official rewrites adapters during evaluation, so its result depends on "
                            "evaluating every adapter in order; set strategy.retrieval=eager.")
        if merge == "official" and distributed.world() > 1:
            raise UserError("strategy.merge=official rewrites the stored adapters in every evaluation forward, and "
                            "under torchrun each process evaluates other batches, so the processes' adapters would "
                            "drift apart; run it in one process, or use strategy.merge=paper.")
        self.ffn_num, self.adapter_scale, self.adapter_dropout = ffn_num, adapter_scale, adapter_dropout
        self.alpha, self.reg, self.reg_temperature, self.head_lr = alpha, reg, reg_temperature, head_lr
        self.merge, self.retrieval, self.max_rounds, self.ensemble = merge, retrieval, max_rounds, ensemble
        self.covariance, self.ca_epochs, self.ca_lr = covariance, ca_epochs, ca_lr
        self.ca_weight_decay = ca_weight_decay  # the run's optimizer weight decay (the config interpolates it)
        self.ca_per_class_option, self.batch_size_option = ca_per_class, batch_size
        self.eval_batch_size, self.seed = eval_batch_size, seed
        self.adapters: list[dict[str, Tensor]] = []  # A_0 .. A_{t-1} (A_t once task t ends)
        self.prefix: list[dict[str, Tensor]] = []  # prefix[k] = A_0 + .. + A_k, of the snapshots as taken

    @property
    def batch_size(self) -> int:
        """The official code's `batch_size` (its training batch): the engine's unless set."""
        return self.batch_size_option or self.plan.batch_size

    @property
    def ca_per_class(self) -> int:
        return self.ca_per_class_option or 5 * self.batch_size

    # ---- set-up ---------------------------------------------------------------------
    def setup(self, stream, context=None):
        super().setup(stream, context)
        backbone = getattr(self.model, "backbone", None)
        vit = getattr(backbone, "model", backbone)
        try:
            self.net = AdapterViT(vit, self.ffn_num, self.adapter_scale, self.adapter_dropout).to(self.device)
        except TypeError as e:
            raise UserError(f"strategy=mos needs a timm ViT backbone (model=timm with a vit_* name): {e}.") from None
        self.net.describe = getattr(backbone, "describe", None)
        self.model.backbone = self.net
        dim = self.net.num_features
        self.task_of = torch.zeros(0, dtype=torch.long, device=self.device)
        self.prototypes = torch.zeros(0, dim, device=self.device)
        self.means = torch.zeros(0, dim, device=self.device)
        shape = (0, dim) if self.covariance == "diagonal" else (0, dim, dim)
        self.covs = torch.zeros(shape, device=self.device)

    def before_experience(self, exp, plan=None):
        super().before_experience(exp, plan)
        n = max(exp.classes) + 1
        if len(self.task_of) < n:
            grown = torch.full((n,), -1, dtype=torch.long, device=self.device)
            grown[: len(self.task_of)] = self.task_of
            self.task_of = grown
        self.task_of[torch.tensor(exp.classes, device=self.device)] = exp.index

    def parameters_to_optimize(self):
        return [{"params": list(self.net.adapter.parameters())},
                {"params": list(self.model.head.parameters()), "lr": self.head_lr}]

    # ---- adapters -----------------------------------------------------------------------
    def current(self) -> dict[str, Tensor]:
        return self.net.adapter.tensors()

    def adapter(self, k: int) -> dict[str, Tensor]:
        """A_k: a stored snapshot, or the live adapter for the task in training."""
        return self.adapters[k] if 0 <= k < len(self.adapters) else self.current()

    @torch.no_grad()
    def _merge_into(self, target: dict[str, Tensor], k: int) -> None:
        """target ← (1-α)·target + α·(A_0 + .. + A_{k-1})/k, every block's adapter. As the
        official code, each tensor's `.data` is rebound to new values, never written in place:
        inside a forward the earlier blocks' saved views keep the values those blocks used,
        so backward sees them. The mean comes from the prefix sums of the snapshots as they
        were taken (as the official code), whether or not stored adapters were rewritten."""
        for n in ADAPTER_KEYS:
            target[n].data = (1 - self.alpha) * target[n].data + self.alpha * self.prefix[k - 1][n] / k

    def features(self, x: Tensor, k: int, adapter: dict[str, Tensor] | None = None) -> Tensor:
        """f_{A_k}(x). With `merge=official` and k ≥ 1, the whole adapter set in use is merged
        before each block's adapter runs (the official per-block call: 12 merges per forward,
        block l computing with l+1 of them); the merged values stay, so a training forward
        leaves the live adapter merged 12 times and an evaluation rewrites the stored A_k."""
        adapter = self.adapter(k) if adapter is None else adapter
        hook = (lambda i: self._merge_into(adapter, k)) if self.merge == "official" and k >= 1 else None
        return self.net.features(x, adapter, hook)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.model.head(self.features(x, self.experience_index, self.current()))

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Batch) -> Tensor:
        f = self.features(batch.x, self.experience_index, self.current())
        logits = self.model.head(f)
        old = self.task_of[: logits.shape[1]] < self.experience_index
        logits = logits.masked_fill(old, torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits, batch.y)
        if self.reg:
            m = torch.cat([self.means.to(f.dtype), f]) if len(self.means) else f
            sim = m @ m.T / self.reg_temperature
            loss = loss + self.reg * F.cross_entropy(sim, torch.arange(len(m), device=m.device))
        return loss

    def after_optimizer_step(self) -> None:
        t = self.experience_index
        if t >= 1:
            self._merge_into(self.current(), t)

    def after_experience(self, exp):
        super().after_experience(exp)
        snap = self.net.adapter.snapshot()
        self.adapters.append(snap)
        self.prefix.append(snap if not self.prefix else {n: self.prefix[-1][n] + snap[n] for n in ADAPTER_KEYS})
        classes = sorted(exp.classes)
        t = exp.index
        # class statistics from the live adapter (= A_t). With merge=official every forward keeps merging it, so
        # the forwards follow the official loop: class by class, in batches of 3 × batch size
        live = lambda x: self.features(x, t, self.current())  # noqa: E731
        if self.merge == "official":
            parts = [class_features(self, exp.train.subset((exp.train.y == c).nonzero().squeeze(1)), live,
                                    3 * self.batch_size) for c in classes]
            feats, labels = (torch.cat(p) for p in zip(*parts))
        else:
            feats, labels = class_features(self, exp.train, live, self.eval_batch_size)
        self._store_statistics(classes, feats, labels)
        if t >= 1 and self.ca_epochs > 0:
            self.align_classifier()
        # prototypes of the new classes with the first task's adapter A_0 (the official code computes them
        # after the alignment, which leaves the model in train mode: adapter dropout on; merge=official keeps that)
        quirk = self.merge == "official" and t >= 1
        feats0, labels0 = class_features(self, exp.train, lambda x: self.features(x, 0), self.eval_batch_size,
                                         train_mode=quirk)
        self.prototypes = grow_rows(self.prototypes, max(classes) + 1)
        self.prototypes[classes] = class_means(feats0, labels0, classes)

    def _store_statistics(self, classes: list[int], feats: Tensor, labels: Tensor) -> None:
        """Per new class: the mean (for L_reg and the Gaussian) and the covariance
        (unbiased, + 1e-4·I as the official code; or the diagonal variance)."""
        n = max(classes) + 1
        dim = feats.shape[1]
        self.means = grow_rows(self.means, n)
        self.covs = grow_rows(self.covs, n)
        eye = torch.eye(dim, device=self.device)
        for c in classes:
            fc = feats[labels == c]
            self.means[c] = fc.mean(0)
            if self.covariance == "diagonal":
                self.covs[c] = fc.var(0) + 1e-4
            else:
                self.covs[c] = torch.cov(fc.T) + 1e-4 * eye

    def align_classifier(self) -> None:
        """Re-train the head on features sampled from every seen class's Gaussian."""
        head = self.model.head
        n = head.out_features
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 17 * self.experience_index)
        opt = torch.optim.SGD(head.parameters(), lr=self.ca_lr, momentum=0.9, weight_decay=self.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.ca_epochs)
        with torch.enable_grad():
            for _ in range(self.ca_epochs):
                x, y = sample_class_features(self.means[:n], self.covs[:n], self.ca_per_class, g,
                                             self.covariance == "diagonal")
                order = torch.randperm(len(y), generator=g).to(self.device)
                for idx in order.split(self.ca_per_class):
                    loss = F.cross_entropy(head(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                sched.step()

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        if len(self.adapters) <= self.experience_index or len(self.adapters) == 0:
            # mid-task, no prototypes yet: the head on the live adapter's features. merge=official merges a copy
            # (the official code never evaluates mid-task, so measuring must not change the adapter it trains)
            live = {n: v.detach().clone() for n, v in self.current().items()}
            return self.model.head(self.features(batch.x, self.experience_index, live))
        z0, _, z, _ = self.retrieve(batch.x)
        if not self.ensemble:
            return z.softmax(1)
        return z.softmax(1) + (len(self.adapters) * z0).softmax(1)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """Self-refined retrieval over the stored adapters: (z₀, the initial task guess, the
        last z of each sample, the refinement rounds run)."""
        seen = min(self.model.head.out_features, len(self.prototypes))  # classes with a prototype
        if self.retrieval == "eager":
            feats = [self.features(x, k) for k in range(len(self.adapters))]  # all adapters, in order (official)
            f0 = feats[0]
            get = lambda k, rows: feats[k][rows]  # noqa: E731
        else:
            f0 = self.features(x, 0)
            cache: dict[int, tuple[Tensor, Tensor]] = {0: (torch.arange(len(x), device=x.device), f0)}
            get = lambda k, rows: self._lazy(cache, x, k, rows)  # noqa: E731
        z0 = F.normalize(f0, dim=1) @ F.normalize(self.prototypes[:seen], dim=1).T
        guess = self.task_of[:seen][z0.argmax(1)]
        return (z0, guess, *self.refine(guess, get, len(x), seen))

    def refine(self, guess: Tensor, get, n: int, seen: int) -> tuple[Tensor, int]:
        """At most `max_rounds` head evaluations per sample: (the last z of each, the rounds run)."""
        z = None
        active = torch.ones(n, dtype=torch.bool, device=guess.device)
        guess = guess.clone()
        rounds = 0
        for _ in range(self.max_rounds):
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            rounds += 1
            for k in guess[rows].unique().tolist():
                sel = rows[guess[rows] == k]
                zk = self.model.head(get(k, sel))[:, :seen]
                if z is None:
                    z = zk.new_zeros(n, seen)
                z[sel] = zk
            new = self.task_of[:seen][z[rows].argmax(1)]
            stay = new == guess[rows]
            active[rows[stay]] = False
            guess[rows] = new
        return z, rounds

    @torch.no_grad()
    def results(self) -> dict:
        """Task-retrieval diagnostics: over the eval (test) split of every finished experience,
        with the adapters and prototypes as they are when called (at the run's end), the share of
        samples whose own task the initial guess (the task of argmax z₀) finds, and after refinement
        (the task of argmax z). A pass of its own (each rank a share of the batches under torchrun);
        with `merge=official` it runs on copies of the stored adapters, which stay unchanged."""
        total = initial = refined = 0
        stored = self.adapters
        if self.merge == "official":  # its forwards rewrite the adapters they use
            self.adapters = [{n: v.clone() for n, v in a.items()} for a in stored]
        try:
            for exp in self.stream.experiences[: len(stored)]:
                for batch in eval_batches(self, exp.eval, self.eval_batch_size, shard=True):
                    _, guess, z, _ = self.retrieve(batch.x)
                    truth = self.task_of[batch.y]
                    total += len(batch.y)
                    initial += int((guess == truth).sum())
                    refined += int((self.task_of[z.argmax(1)] == truth).sum())
        finally:
            self.adapters = stored
        total, initial, refined = distributed.all_sum([total, initial, refined], self.device)  # DDP: every share
        n = max(total, 1)
        return {"task_retrieval_initial": initial / n, "task_retrieval_refined": refined / n,
                "retrieval_samples": int(total)}

    def _lazy(self, cache: dict, x: Tensor, k: int, rows: Tensor) -> Tensor:
        """f_{A_k}(x[rows]), computing only the rows not computed before."""
        have_rows, have = cache.get(k, (rows.new_zeros(0), None))
        missing = rows[~torch.isin(rows, have_rows)]
        if missing.numel():
            f = self.features(x[missing], k)
            have_rows = torch.cat([have_rows, missing])
            have = f if have is None else torch.cat([have, f])
            cache[k] = (have_rows, have)
        pos = torch.searchsorted(have_rows.sort().values, rows)
        order = have_rows.argsort()
        return have[order][pos]

    # ---- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "adapters": self.adapters, "prefix": self.prefix,
                "task_of": self.task_of, "prototypes": self.prototypes, "means": self.means, "covs": self.covs}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        dev = self.device
        self.adapters = [{n: v.to(dev) for n, v in a.items()} for a in state["adapters"]]
        self.prefix = [{n: v.to(dev) for n, v in a.items()} for a in state["prefix"]]
        for key in ("task_of", "prototypes", "means", "covs"):
            setattr(self, key, state[key].to(dev))
