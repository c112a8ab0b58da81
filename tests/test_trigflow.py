"""Float64 checks of the TrigFlow maths, the denoiser wrappers, samplers and the power-EMA."""
import math

import pytest
import torch

from rcm_core.config import ModelCfg
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.ema import PowerEMA, sigma_rel_to_gamma
from rcm_core.networks import build_network
from rcm_core.method.samplers import consistency_sample, teacher_sample
from rcm_core.method.timesteps import sample_p_D, sample_p_G, student_time_grid
from rcm_core.data.toy import ExactGMMVelocity, default_gmm
from rcm_core.method.trigflow import (add_noise, consistency_fn, expand_like, rf_to_trig, sigma_to_trig, trig_to_rf,
                               trig_to_sigma, velocity_target, x0_to_F)


def mlp(dtype="float64", num_classes=3, in_channels=4):
    torch.manual_seed(0)
    net = build_network(ModelCfg(kind="mlp", in_channels=in_channels, num_classes=num_classes, hidden=32, depth=2,
                                 dtype=dtype))
    for p in net.parameters():   # adaLN-zero starts as the zero function; make the test see a real function
        torch.nn.init.normal_(p, std=0.3)
    return net


def test_time_conversions_round_trip():
    t = torch.rand(1000, dtype=torch.float64) * (math.pi / 2 - 2e-6) + 1e-6
    assert torch.allclose(rf_to_trig(trig_to_rf(t)), t, atol=1e-12, rtol=0)
    assert torch.allclose(sigma_to_trig(trig_to_sigma(t)), t, atol=1e-12, rtol=0)
    s = trig_to_rf(t)
    assert torch.allclose(s, torch.tan(t) / (1 + torch.tan(t)), atol=1e-12)   # s = σ/(1+σ)
    assert rf_to_trig(torch.tensor(1.0)).item() == pytest.approx(math.pi / 2)


def test_velocity_and_x0_conversions():
    x0, eps = torch.randn(5, 3, 2, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 1.4 + 0.1
    x_t, F = add_noise(x0, eps, t), velocity_target(x0, eps, t)
    assert torch.allclose(consistency_fn(x_t, F, t), x0, atol=1e-12)      # f recovers x0 from the true F
    assert torch.allclose(x0_to_F(x_t, x0, t), F, atol=1e-10)


@pytest.mark.parametrize("param", ["rf_velocity", "edm_eps", "edm_x0", "trigflow"])
def test_boundary_condition_f_at_zero_is_identity(param):
    den = TrigFlowDenoiser(mlp(), param)
    x = torch.randn(4, 4, 1, 1, 1, dtype=torch.float64)
    t = torch.full((4,), 1e-12 if param in ("edm_x0", "edm_eps") else 0.0, dtype=torch.float64)
    assert torch.allclose(den.f(x, t, torch.tensor([0, 1, 2, 3])), x, atol=1e-6)


def test_rf_wrapper_recovers_exact_velocity():
    """A perfect RF velocity v = ε − x0 at x_raw = (1−s)x0 + sε gives the TrigFlow F = cos t·ε − sin t·x0."""
    class Oracle(torch.nn.Module):
        def __init__(self, x0, eps):
            super().__init__()
            self.x0, self.eps, self.w = x0, eps, torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x, timestep, cond):
            return self.eps - self.x0
    x0, eps = torch.randn(3, 2, 1, 1, 1, dtype=torch.float64), torch.randn(3, 2, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.2, 0.8, 1.5], dtype=torch.float64)
    den = TrigFlowDenoiser(Oracle(x0, eps), "rf_velocity")
    assert torch.allclose(den.F(add_noise(x0, eps, t), t, None), velocity_target(x0, eps, t), atol=1e-12)


def test_network_jvp_matches_central_differences():
    den = TrigFlowDenoiser(mlp(), "rf_velocity")
    x = torch.randn(4, 4, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7, 1.1, 1.4], dtype=torch.float64)
    x_dot, t_dot = torch.randn_like(x), torch.rand(4, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 0])
    _, jvp = torch.func.jvp(lambda a, b: den.F(a, b, cond), (x, t), (x_dot, t_dot))
    h = 1e-7   # the 1000·s time embedding is very curved: keep the step small (float64 allows it)
    fd = (den.F(x + h * x_dot, t + h * t_dot, cond) - den.F(x - h * x_dot, t - h * t_dot, cond)) / (2 * h)
    assert (jvp - fd).norm() / fd.norm() < 1e-6


def test_one_step_sample_equals_f_at_sigma_max():
    den = TrigFlowDenoiser(mlp(), "rf_velocity")
    z = torch.randn(6, 4, 1, 1, 1, dtype=torch.float64)
    cond = torch.arange(6) % 3
    out = consistency_sample(den, z, cond, steps=1, sigma_max=80.0, mid_t=[1.3])
    t0 = torch.full((6,), math.atan(80.0), dtype=torch.float64)
    assert torch.allclose(out, den.f(math.sin(math.atan(80.0)) * z, t0, cond), atol=1e-12)


class GaussianOracle(torch.nn.Module):
    """Native TrigFlow F of data x0 ~ N(0, s²·I): E[x0 | x_t] = cos t·s²/(cos²t·s² + sin²t)·x_t, F = (cos t·x_t − x̂0)
    / sin t, so f(x_t, t) = a(t)·x_t with a(t) = cos t·s²/(cos²t·s² + sin²t): a consistency function in closed form."""

    def __init__(self, s: float):
        super().__init__()
        self.s, self.anchor = s, torch.nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)

    def a(self, t):
        return torch.cos(t) * self.s ** 2 / (torch.cos(t) ** 2 * self.s ** 2 + torch.sin(t) ** 2)

    def forward(self, x, t, cond):
        t = expand_like(t.double(), x)
        return (torch.cos(t) * x - self.a(t) * x) / torch.sin(t)


@pytest.mark.parametrize("mid", [1.3, 0.6])
def test_two_step_sample_known_answer(mid):
    """The 2-step sampler, by hand in float64 (rcm_method.md §4.1): x = sin t₀·z at t₀ = arctan σ_max, x̂0 = f(x, t₀),
    re-noise x = cos t_mid·x̂0 + sin t_mid·ε with the generator's first draw, then x̂0 = f(x, t_mid). Issue 29
    suspected the re-noising (or the time variable of sampler.mid_t) of the demo's weak 2-step row; it is exact."""
    oracle = GaussianOracle(0.8)
    den = TrigFlowDenoiser(oracle, "trigflow")
    z = torch.randn(5, 2, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = consistency_sample(den, z, None, steps=2, sigma_max=80.0, mid_t=[mid],
                             generator=torch.Generator().manual_seed(1))
    eps = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t0, t1 = torch.tensor(math.atan(80.0), dtype=torch.float64), torch.tensor(mid, dtype=torch.float64)
    x0_hat = oracle.a(t0) * math.sin(t0) * z
    want = oracle.a(t1) * (math.cos(mid) * x0_hat + math.sin(mid) * eps)
    assert torch.allclose(out, want, atol=1e-12, rtol=0)


def test_student_time_grid_and_bad_steps():
    grid = student_time_grid(3, sigma_max=80.0, mid_t=[1.3, 1.0, 0.6])
    assert grid.tolist() == pytest.approx([math.atan(80.0), 1.3, 1.0, 0.0])
    with pytest.raises(ValueError, match="intermediate times"):
        student_time_grid(5, sigma_max=80.0, mid_t=[1.3, 1.0, 0.6])


def test_time_distributions_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    t = sample_p_G(200_000, mean=-0.8, std=1.6, frames=1, generator=g)
    log_sigma = torch.log(torch.tan(t))
    assert log_sigma.mean().item() == pytest.approx(-0.8, abs=0.02) and log_sigma.std().item() == pytest.approx(1.6, abs=0.02)
    t = sample_p_G(200_000, mean=-0.8, std=1.6, frames=20, generator=g)   # √T shift (Wan): mean −0.8 + ln√20
    assert torch.log(torch.tan(t)).mean().item() == pytest.approx(-0.8 + 0.5 * math.log(20), abs=0.02)
    s = trig_to_rf(sample_p_D(200_000, shift=5.0, generator=g))
    u = s / (5 - 4 * s)                                                    # invert s = 5u/(1+4u): u is uniform
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and (u.min() >= 0) and (u.max() <= 1)


def test_power_ema_matches_closed_form():
    gamma = sigma_rel_to_gamma(0.05)
    assert gamma == pytest.approx(16.97, abs=0.01)            # EDM2 / rCM: σ_rel 0.05 ↔ γ ≈ 16.97
    assert sigma_rel_to_gamma(0.1) == pytest.approx(6.94, abs=0.01)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    module = torch.nn.ParameterList([p])
    ema = PowerEMA(module, sigma_rel=0.1)
    thetas = torch.randn(40, 3, dtype=torch.float64)
    for theta in thetas:
        p.data.copy_(theta)
        ema.update(module)
    n, g = len(thetas), ema.gamma
    i = torch.arange(1, n + 1, dtype=torch.float64)
    w = (i ** (g + 1) - (i - 1) ** (g + 1)) / n ** (g + 1)
    expected = (w[:, None] * thetas).sum(0)
    assert torch.allclose(ema.module[0].double(), expected.float().double(), atol=1e-6)


def test_teacher_sampler_on_exact_gmm_teacher_lands_on_modes():
    gmm = default_gmm()
    teacher = TrigFlowDenoiser(ExactGMMVelocity(gmm), "rf_velocity")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % gmm.num_classes
    z = torch.randn(400, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    x = teacher_sample(teacher, z, labels, steps=40, guidance=1.0, solver="heun")
    d = torch.cdist(x.reshape(400, 2), gmm.means)
    own = gmm.mode_class[d.argmin(1)] == labels
    assert own.float().mean() > 0.98 and (d.min(1).values < 4 * gmm.std).float().mean() > 0.95


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_sampler_started_midway_continues_the_solve_exactly(solver):
    """start_t (SDEdit, fashion_results --renoise-test): from the state a 12-step solve reaches at grid time k, the
    solve started there ends where the whole solve does (float64, the same operations: bit-equal), π/2 is the plain
    solve, and a start between grid times takes only the grid's times below it."""
    from rcm_core.method.timesteps import teacher_time_grid

    gmm = default_gmm()
    teacher = TrigFlowDenoiser(ExactGMMVelocity(gmm), "rf_velocity")
    z = torch.randn(64, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(64) % gmm.num_classes
    kw = dict(steps=12, guidance=2.0, shift=3.0, solver=solver)
    seen, real = [], teacher.F_guided

    def spy(x, t, cond, guidance):
        seen.append((float(t[0]), x.clone()))
        return real(x, t, cond, guidance)
    teacher.F_guided = spy
    whole = teacher_sample(teacher, z, labels, **kw)
    grid = teacher_time_grid(12, shift=3.0)
    k = 5
    # the state the solve reached at grid time k: the last call there (Heun's corrector at grid k comes first, at
    # the predicted state)
    x_k = [x for t, x in seen if t == float(grid[k])][-1]
    seen.clear()
    assert torch.equal(teacher_sample(teacher, x_k, labels, **kw, start_t=float(grid[k])), whole)
    assert len(seen) == (12 - k) * (1 if solver == "euler" else 2) - (solver == "heun")
    assert torch.equal(teacher_sample(teacher, z, labels, **kw, start_t=math.pi / 2), whole)
    seen.clear()
    mid = 0.5 * float(grid[k] + grid[k + 1])
    teacher_sample(teacher, x_k, labels, **kw, start_t=mid)
    assert [t for t, _ in seen][:: 1 if solver == "euler" else 2] == [mid, *map(float, grid[k + 1:-1])]
