"""Discrete-time consistency distillation (dCM, distill.mode=dcm / dcm_dmd) against known answers.

The analytic case: data x0 ~ N(0, a²) per element (a_c with the label, a_u for the CFG null label). Its TrigFlow
PF-ODE velocity is exact, F(x, t) = cos t·sin t·(1 − a²)·x / v(t) with v(t) = a²cos²t + sin²t, and so is its
consistency function, f(x, t) = a·x/√v(t) (the flow keeps x/√v fixed). A student built as α·f then has
x̂0 = α·a·x/√v(t), so the dCM loss of one teacher Euler step and its gradient in α are closed-form scalars.

    pytest tests/test_dcm.py
"""
import math

import pytest
import torch
from torch import nn

from rcm_core.config import load_config
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import build_state, consistency_term, distill_step, is_student_phase, uses_dmd
from rcm_core.method.losses import dcm_loss, teacher_euler
from rcm_core.method.timesteps import T_MAX, T_MIN, dcm_times, sample_dcm_times

A_COND, A_NULL = 0.5, 1.5


def _v(a: float, t: torch.Tensor) -> torch.Tensor:
    return a ** 2 * torch.cos(t) ** 2 + torch.sin(t) ** 2


class GaussianTeacher(nn.Module):
    """Exact PF-ODE velocity of N(0, a²) data; label 1 = conditional (a_c), label 0 = null (a_u)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))   # gives the wrapper a dtype

    def null_cond(self, batch_size, device=None):
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def forward(self, x, t, cond):
        a = torch.where(cond == 1, A_COND, A_NULL).double().reshape(-1, *[1] * (x.dim() - 1))
        t = t.double().reshape(a.shape)
        return torch.cos(t) * torch.sin(t) * (1 - a ** 2) * x / (a ** 2 * torch.cos(t) ** 2 + torch.sin(t) ** 2)


class ScaledFlowMap(nn.Module):
    """F such that x̂0 = cos t·x − sin t·F = α·a_c·x/√v_c(t): the exact consistency function times α."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha, dtype=torch.float64))

    def null_cond(self, batch_size, device=None):
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def forward(self, x, t, cond):
        t = t.double().reshape(-1, *[1] * (x.dim() - 1))
        x0 = self.alpha * A_COND * x / torch.sqrt(_v(A_COND, t))
        return (torch.cos(t) * x - x0) / torch.sin(t)


def test_dcm_times_follow_the_shifted_rf_grid():
    """u ↦ s_j = 1 − (u + j/N) ↦ shift·s/(1 + (shift − 1)s) ↦ t = arctan(s/(1 − s)), checked by hand."""
    u = torch.tensor([0.0, 0.25, 1 - 2 / 48], dtype=torch.float64)
    times = dcm_times(u, total_steps=48, skip=2, shift=5.0)
    assert times.shape == (3, 3)
    for b, ub in enumerate(u.tolist()):
        for j in range(3):
            s = 1 - (ub + j / 48)
            s = 5 * s / (1 + 4 * s)
            want = min(max(math.atan2(s, 1 - s), T_MIN), T_MAX)     # clamped like p_D
            assert times[j, b].item() == pytest.approx(want, abs=1e-12), (b, j)
    assert times[-1, -1].item() == pytest.approx(1e-4)          # u at its largest ends on the clean end (clamped)
    drawn = sample_dcm_times(4096, total_steps=48, skip=1, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert (drawn[0] > drawn[1]).all()                        # always from the noisier to the cleaner time
    gap = drawn[0] - drawn[1]                                 # one grid step Δu = 1/48 apart: never wider than
    sweep = dcm_times(torch.linspace(0, 1 - 1 / 48, 100_001, dtype=torch.float64), total_steps=48, skip=1,
                      shift=5.0)                              # the widest such pair over all u
    assert 0 < gap.min() and gap.max() <= (sweep[0] - sweep[1]).max() + 1e-12


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_teacher_euler_is_one_guided_step(guidance):
    teacher = TrigFlowDenoiser(GaussianTeacher(), "trigflow")
    x = torch.randn(5, 2, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = torch.ones(5, dtype=torch.long)
    times = torch.tensor([[1.2] * 5, [1.1] * 5], dtype=torch.float64)
    got = teacher_euler(teacher, x, times, cond, guidance)
    t = torch.tensor(1.2, dtype=torch.float64)
    rate = lambda a: torch.cos(t) * torch.sin(t) * (1 - a ** 2) / _v(a, t)          # noqa: E731
    F = (rate(A_NULL) + guidance * (rate(A_COND) - rate(A_NULL))) * x
    torch.testing.assert_close(got, x - 0.1 * F, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_dcm_loss_and_gradient_match_the_closed_form(alpha):
    """Loss = scale·mean_b Σ(α·κ₀·x − α·κ₁·x₁)², κ_j = a/√v(t_j), x₁ = x − Δt·F_T(x, t₀); the gradient flows only
    through the prediction at t₀: ∂L/∂α = scale·mean_b Σ 2(α·κ₀·x − α·κ₁·x₁)·κ₀·x. A target carrying gradient (or
    taken from other weights) gives a different ∂L/∂α, so this fails if the stop-gradient is lost."""
    g = torch.Generator().manual_seed(2)
    B = 6
    x0 = A_COND * torch.randn(B, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    cond = torch.ones(B, dtype=torch.long)
    times = sample_dcm_times(B, total_steps=12, skip=1, shift=5.0, generator=g)
    teacher = TrigFlowDenoiser(GaussianTeacher(), "trigflow")
    student = TrigFlowDenoiser(ScaledFlowMap(alpha), "trigflow")
    out = dcm_loss(student, teacher, x0, cond, times=times, eps=eps, guidance=1.0, scale=100.0)
    out.loss.backward()

    t0, t1 = times[0].reshape(-1, 1, 1, 1, 1), times[1].reshape(-1, 1, 1, 1, 1)
    x = torch.cos(t0) * x0 + torch.sin(t0) * eps
    x1 = x - (t0 - t1) * torch.cos(t0) * torch.sin(t0) * (1 - A_COND ** 2) * x / _v(A_COND, t0)
    k0, k1 = A_COND / torch.sqrt(_v(A_COND, t0)), A_COND / torch.sqrt(_v(A_COND, t1))
    diff = alpha * k0 * x - alpha * k1 * x1
    want_loss = 100.0 * (diff ** 2).flatten(1).sum(1).mean()
    want_grad = 100.0 * (2 * diff * k0 * x).flatten(1).sum(1).mean()
    assert out.loss.item() == pytest.approx(want_loss.item(), rel=1e-10)
    assert student.net.alpha.grad.item() == pytest.approx(want_grad.item(), rel=1e-10)
    assert out.metrics["dcm_nan_samples"] == 0


def test_exact_flow_map_has_vanishing_dcm_loss():
    """With the exact consistency function as student the only error left is the teacher's Euler step:
    O(Δt²) per sample, so the loss (its square) falls ~16× when the grid is made 2× finer."""
    g = torch.Generator().manual_seed(3)
    x0 = A_COND * torch.randn(64, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    u = torch.rand(64, generator=g, dtype=torch.float64) * 0.9
    teacher = TrigFlowDenoiser(GaussianTeacher(), "trigflow")
    student = TrigFlowDenoiser(ScaledFlowMap(1.0), "trigflow")
    cond = torch.ones(64, dtype=torch.long)
    losses = [dcm_loss(student, teacher, x0, cond, times=dcm_times(u, total_steps=n, skip=1, shift=1.0), eps=eps,
                       guidance=1.0, scale=1.0).loss.item() for n in (100, 200)]
    assert losses[0] < 1e-4 and 12 < losses[0] / losses[1] < 20, losses


def test_nan_sample_is_zeroed_not_propagated():
    teacher = TrigFlowDenoiser(GaussianTeacher(), "trigflow")
    student = TrigFlowDenoiser(ScaledFlowMap(0.8), "trigflow")
    x0 = torch.ones(3, 2, 1, 1, 1, dtype=torch.float64)
    x0[1, 0] = float("nan")
    times = dcm_times(torch.full((3,), 0.3, dtype=torch.float64), total_steps=48, skip=1, shift=5.0)
    out = dcm_loss(student, teacher, x0, torch.ones(3, dtype=torch.long), times=times,
                   eps=torch.zeros_like(x0), guidance=1.0, scale=1.0)
    out.loss.backward()
    assert out.metrics["dcm_nan_samples"] == 1 and math.isfinite(out.loss.item())
    assert torch.isfinite(student.net.alpha.grad)


@pytest.mark.parametrize("mode,term,dmd", [("rcm", "scm", True), ("scm", "scm", False), ("dmd", None, True),
                                           ("dcm", "dcm", False), ("dcm_dmd", "dcm", True)])
def test_five_modes_from_one_config(tmp_path, mode, term, dmd):
    """Each mode names its consistency term and whether DMD (and a critic) runs; a warm-up H holds DMD back
    only when there is a consistency term to warm up with. Two real iterations of the toy run in each mode."""
    cfg = load_config("experiments/debug_cpu.yaml", [f"distill.mode={mode}", "distill.tangent_warmup=1",
                                                     "distill.student_update_freq=2", "model.hidden=16",
                                                     "model.depth=1", "data.batch_size=8",
                                                     f"train.run_dir={tmp_path}"])
    assert consistency_term(cfg.distill) == term and uses_dmd(cfg.distill) == dmd
    assert [is_student_phase(i, cfg.distill) for i in range(3)] == (
        [True, True, True] if not dmd else [True, True, False] if term else [True, False, True])
    from rcm_core.networks import build_network
    from rcm_core.run.loop import step_generator
    from rcm_core.data.latents import LatentBatch

    torch.manual_seed(0)
    state = build_state(cfg, TrigFlowDenoiser(build_network(cfg.model), "rf_velocity"))
    assert (state.fake is not None) == dmd
    batch = LatentBatch(latent=torch.randn(8, 2, 1, 1, 1), label=torch.arange(8) % 4)
    seen = set()
    for i in range(3):
        seen |= set(distill_step(state, batch, cfg, step_generator(0, 0, i, torch.device("cpu"))))
    assert ("dcm_loss" in seen) == (term == "dcm") and ("scm_loss" in seen) == (term == "scm")
    assert ("dmd_loss" in seen) == dmd and ("critic_loss" in seen) == dmd


@pytest.mark.parametrize("name,base", [("consistency", "demo.yaml"), ("consistency_fashion", "fashion_video.yaml")])
def test_consistency_sweeps_load(name, base):
    """The shipped sCM-vs-dCM (± DMD) sweeps: four trials, one per mode, on the toy and on moving Fashion-MNIST."""
    from pathlib import Path

    from workflows.sweep import count_trials, load_sweep

    repo = Path(__file__).resolve().parents[1]
    spec, cfg = load_sweep(repo / "experiments" / "sweeps" / f"{name}.yaml", ["train.steps=20"])
    assert spec.base == (repo / "experiments" / base).resolve() and count_trials(spec) == 4
    assert spec.search_space["distill.mode"] == ("grid", ["scm", "dcm", "rcm", "dcm_dmd"])
