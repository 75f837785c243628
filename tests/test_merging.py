"""Continual merging: OPCM against a re-derivation of the official code's order of operations
(FusionBench `OPCMForCLIP.run`: the first model as is; then per leaf module the SVD of the
current merged task vector, a temporary λ_t = 1, the global rescale to the mean task-vector norm),
and continual task arithmetic and averaging against their closed forms, over 4 merges."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from strategies.merge_avg import MergeAverage
from strategies.merge_ta import MergeTaskArithmetic
from strategies.merging import project_out, split_rank
from strategies.opcm import OPCM


class Tiny(nn.Module):
    """Matrices of both orientations, a convolution, a norm, biases, and a per-task head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.wide = nn.Linear(7, 5)
        self.tall = nn.Linear(5, 9, bias=False)
        self.norm = nn.LayerNorm(9)
        self.head = nn.Linear(9, 4)


def rederived_opcm(theta0: dict, models: list[dict], linear: set[str], alpha: float) -> list[dict]:
    """The official loop, step by step (written from reading `opcm.py`, float64)."""
    def gnorm(a, b):
        return torch.cat([(a[k] - b[k]).reshape(-1) for k in a]).norm()

    merged = {k: v.clone() for k, v in models[0].items()}
    previous_lambda, norms, out = 1.0, [gnorm(models[0], theta0)], [dict(merged)]
    for model in models[1:]:
        norms.append(gnorm(model, theta0))
        avg = torch.stack(norms).mean()
        lambda_t = 1.0
        for k in merged:
            previous_tv, task_tv = merged[k] - theta0[k], model[k] - theta0[k]
            if k in linear:
                shape = task_tv.shape
                m, tau = previous_tv.reshape(shape[0], -1), task_tv.reshape(shape[0], -1)
                u, s, vh = torch.linalg.svd(m, full_matrices=True)
                v = vh.T
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tau @ v
                p.diagonal().fill_(0)
                p[:split, :split] = 0
                x = (u @ p @ v.T).reshape(shape)
            else:
                x = task_tv
            merged[k] = theta0[k] + (previous_lambda * previous_tv + x) / lambda_t
        norm = gnorm(merged, theta0)
        lambda_t *= float(norm / avg)
        merged = {k: theta0[k] + (merged[k] - theta0[k]) * (avg / norm) for k in merged}
        previous_lambda = lambda_t
        out.append(dict(merged))
    return out


def drive(strategy, models: list[dict]) -> list[dict]:
    """Merge `models` (merged-parameter dicts) one by one, as `after_experience` does."""
    strategy.base = {n: p.detach().clone() for n, p in strategy.merged_parameters().items()}
    outputs = []
    for model in models:
        tau = {n: model[n] - strategy.base[n] for n in strategy.base}
        strategy.merged = strategy.merge(tau)
        strategy.merges += 1
        outputs.append({n: v.clone() for n, v in strategy.merged.items()})
    return outputs


def fine_tuned(theta0: dict, count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta0.items()}
            for _ in range(count)]


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("conv", ["reshape", "skip"])
def test_opcm_matches_the_official_order_of_operations_over_4_merges(alpha, conv):
    torch.manual_seed(1)
    model = Tiny().double()
    opcm = OPCM(model, None, alpha=alpha, conv=conv)
    theta0 = {n: p.detach().clone() for n, p in opcm.merged_parameters().items()}
    assert "head.weight" not in theta0  # per-task heads are not merged
    linear = {"wide.weight", "tall.weight"} | ({"conv.weight"} if conv == "reshape" else set())
    assert opcm.matrices() == linear
    models = fine_tuned(theta0, 4)
    ours, reference = drive(opcm, models), rederived_opcm(theta0, models, linear, alpha)
    for step, (a, b) in enumerate(zip(ours, reference)):
        for k in theta0:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=f"merge {step + 1}, {k}")
    # the defining property: after every merge the merged task vector's norm is the mean task-vector norm
    norms = [torch.cat([(m[k] - theta0[k]).reshape(-1) for k in theta0]).norm() for m in models]
    for t, merged in enumerate(ours[1:], start=2):
        got = torch.cat([(merged[k] - theta0[k]).reshape(-1) for k in theta0]).norm()
        assert float(got) == pytest.approx(float(torch.stack(norms[:t]).mean()), rel=1e-9)
    torch.testing.assert_close(ours[0]["wide.weight"], models[0]["wide.weight"])  # the first merge is θ_1


def test_projection_removes_the_protected_directions_and_the_diagonal():
    """Closed form: τ̃ = τ − U_r U_rᵀ τ V_r V_rᵀ − Σ_{i≥r} (u_iᵀ τ v_i) u_i v_iᵀ, for both orientations."""
    g = torch.Generator().manual_seed(0)
    for shape in [(6, 4), (4, 6), (5, 5)]:
        m, tau = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = split_rank(s, 0.5)
        assert 0 < r < len(s)
        ur, vr = u[:, :r], vh[:r].T
        expect = tau - ur @ ur.T @ tau @ vr @ vr.T
        for i in range(r, len(s)):
            expect -= (u[:, i] @ tau @ vh[i]) * torch.outer(u[:, i], vh[i])
        torch.testing.assert_close(project_out(m, tau, 0.5), expect)
        # what is left has no component along any of M's matched singular pairs
        cleaned = project_out(m, tau, 0.5)
        assert torch.allclose(torch.stack([u[:, i] @ cleaned @ vh[i] for i in range(len(s))]),
                              torch.zeros(len(s), dtype=torch.float64), atol=1e-12)


def test_split_rank_counts_the_leading_share_at_most_alpha_as_the_official_argmax():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, a) for a in (0.3, 0.4, 0.5, 0.7, 0.95)] == [0, 1, 1, 2, 3]
    assert split_rank(s, 1.0) == 0  # no share exceeds alpha: the official argmax of an all-false mask is 0
    assert split_rank(torch.zeros(3), 0.5) == 0


def test_task_arithmetic_and_averaging_match_their_closed_forms():
    torch.manual_seed(2)
    for cls, kwargs in ((MergeTaskArithmetic, {"scaling": 0.3}), (MergeAverage, {})):
        model = Tiny().double()
        strategy = cls(model, None, **kwargs)
        theta0 = {n: p.detach().clone() for n, p in strategy.merged_parameters().items()}
        models = fine_tuned(theta0, 4, seed=3)
        for t, merged in enumerate(drive(strategy, models), start=1):
            for k in theta0:
                taus = torch.stack([m[k] - theta0[k] for m in models[:t]])
                expect = theta0[k] + (0.3 * taus.sum(0) if cls is MergeTaskArithmetic else taus.mean(0))
                torch.testing.assert_close(merged[k], expect)


@pytest.mark.parametrize("cls", [OPCM, MergeTaskArithmetic, MergeAverage])
def test_merging_state_does_not_grow_with_the_number_of_tasks(cls):
    """θ₀, the merged weights and a few scalars: the same bytes after 2 merges as after 8 (the
    per-task heads are the model's, one per task by the setting's definition)."""
    def state_after(T: int) -> tuple[int, int]:
        torch.manual_seed(0)
        strategy = cls(Tiny().double(), None)
        theta0 = {n: p.detach().clone() for n, p in strategy.merged_parameters().items()}
        drive(strategy, fine_tuned(theta0, T))
        saved = strategy.state_dict()
        tensors = [*saved["base"].values(), *saved["merged"].values(),
                   *[v for v in saved["method"].values() if isinstance(v, torch.Tensor)]]
        scalars = [v for v in saved["method"].values() if not isinstance(v, torch.Tensor)]
        assert all(isinstance(v, float) for v in scalars)  # no list that grows with T
        return strategy.state_bytes(), sum(t.numel() * t.element_size() for t in tensors)

    two, eight = state_after(2), state_after(8)
    assert two == eight
    model_bytes = sum(p.numel() * p.element_size() for n, p in Tiny().double().named_parameters() if not n.startswith("head"))
    assert two[0] == 2 * model_bytes  # θ₀ and the merged weights, nothing per task


PEAK_SCRIPT = """
import sys, torch
from torch import nn
from strategies.{module} import {cls}

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # 2.1M parameters, 8.4 MB
strategy = {cls}(model, None)
strategy.base = {{n: p.detach().clone() for n, p in strategy.merged_parameters().items()}}
model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
start = rss("VmRSS:")
with torch.no_grad():
    for t in range(int(sys.argv[1])):  # what after_experience does after a fine-tune from theta0
        for n, p in strategy.merged_parameters().items():
            p.copy_(strategy.base[n]).add_(0.01 * torch.randn_like(p))
        tau = {{n: p.detach() - strategy.base[n] for n, p in strategy.merged_parameters().items()}}
        strategy.merged = strategy.merge(tau)
        strategy.merges += 1
print(rss("VmHWM:") - start, model_mb)
"""


@pytest.mark.parametrize("module,cls", [("opcm", "OPCM"), ("merge_ta", "MergeTaskArithmetic"), ("merge_avg", "MergeAverage")])
def test_merging_peak_memory_does_not_grow_with_the_number_of_tasks(module, cls):
    """The process's peak resident memory (VmHWM, reset after setup) over 2 and over 8 merges of an
    8.4 MB model: the same within a quarter of a model, where keeping every task's model would add
    six models at T=8. In a fresh interpreter, with glibc's mmap threshold fixed at 64 KiB so that
    every tensor's memory goes back to the system when freed and the resident set follows the live
    tensors (glibc's default threshold adapts, and the heap then keeps freed tensors resident)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    root = Path(__file__).resolve().parents[1]
    script = PEAK_SCRIPT.format(module=module, cls=cls)

    def peak(T: int) -> tuple[float, float]:
        out = subprocess.run([sys.executable, "-c", script, str(T)], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
                             timeout=120)
        assert out.returncode == 0, out.stderr
        grown, model_mb = map(float, out.stdout.split())
        return grown, model_mb

    (two, model_mb), (eight, _) = peak(2), peak(8)
    assert two < 8 * model_mb  # the merge's temporaries (and the SVD's library code paged in): a few models, not T
    assert eight - two < 0.25 * model_mb, (two, eight, model_mb)


def test_opcm_on_a_timm_vit_projects_every_attention_and_mlp_matrix():
    """The papers' backbone family: on timm's ViT every Linear (qkv, attention proj, fc1, fc2) is
    projected; the patch embedding (a stride-p convolution) only with conv=reshape; a merge runs
    on the real shapes and keeps the merged norm at the mean task-vector norm."""
    from cl.models.classifier import Classifier
    from cl.models.timm_backbone import TimmBackbone

    torch.manual_seed(0)
    vit = Classifier(TimmBackbone("vit_tiny_patch16_224", input_shape=(3, 32, 32), img_size=32, depth=2), (3, 32, 32))
    linears = {f"{n}.weight" for n, m in vit.named_modules() if isinstance(m, nn.Linear) and not n.startswith("head")}
    assert {"backbone.model.blocks.1.attn.qkv.weight", "backbone.model.blocks.1.mlp.fc2.weight"} <= linears
    assert OPCM(vit, None, conv="skip").matrices() == linears
    strategy = OPCM(vit, None)
    assert strategy.matrices() == linears | {"backbone.model.patch_embed.proj.weight"}
    theta0 = {n: p.detach().clone() for n, p in strategy.merged_parameters().items()}
    models = fine_tuned(theta0, 2)
    merged = drive(strategy, models)[-1]
    norms = [torch.cat([(m[k] - theta0[k]).reshape(-1) for k in theta0]).norm() for m in models]
    merged_norm = torch.cat([(merged[k] - theta0[k]).reshape(-1) for k in theta0]).norm()
    torch.testing.assert_close(merged_norm, torch.stack(norms).mean(), rtol=1e-4, atol=0)
