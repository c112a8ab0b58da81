"""Float64 checks of the sCM tangent and loss, the DMD and critic losses, and the rollout (rcm_method.md §2–3)."""

import pytest
import torch

from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.losses import (consistency_objective, dmd_loss, fake_score_loss, normalize_tangent, read_metrics,
                                    scm_loss, scm_tangent_fd, rollout_draws, scm_tangent_g, scm_tangent_jvp,
                                    student_rollout)
from rcm_core.method.trigflow import add_noise
from test_trigflow import mlp

B = 4
COND = torch.tensor([0, 1, 2, 0])


@pytest.fixture()
def setup():
    torch.manual_seed(1)
    student = TrigFlowDenoiser(mlp(), "rf_velocity")
    teacher = TrigFlowDenoiser(mlp(), "rf_velocity")
    for p in teacher.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(B, 4, 1, 1, 1, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.2, 0.6, 1.0, 1.45], dtype=torch.float64)
    return student, teacher, x0, eps, t


def test_rearranged_tangent_at_r1_is_cos_t_times_total_derivative(setup):
    """g(r=1) = cos t · d/dt f_θ⁻(x_t, t) along dx/dt = F_T, the derivative taken by reverse-mode autograd."""
    student, teacher, x0, eps, t = setup
    x_t = add_noise(x0, eps, t)
    F_T = teacher.F_guided(x_t, t, COND, 2.0).detach()
    F_minus, T = scm_tangent_jvp(student, x_t, t, COND, F_T)
    g = scm_tangent_g(F_minus=F_minus, F_teacher=F_T, x_t=x_t, t=t, T=T, r=1.0)
    f_along = lambda tau: student.f(x_t + tau.reshape(B, 1, 1, 1, 1) * F_T, t + tau, COND)  # noqa: E731
    _, df_dt = torch.autograd.functional.jvp(f_along, torch.zeros(B, dtype=torch.float64),
                                             torch.ones(B, dtype=torch.float64))
    expected = torch.cos(t).reshape(B, 1, 1, 1, 1) * df_dt
    assert (g - expected).norm() / expected.norm() < 1e-10


def test_paper_and_code_warmup_variants(setup):
    student, teacher, x0, eps, t = setup
    x_t = add_noise(x0, eps, t)
    F_T = teacher.F(x_t, t, COND).detach()
    F_minus, T = scm_tangent_jvp(student, x_t, t, COND, F_T)
    kw = dict(F_minus=F_minus, F_teacher=F_T, x_t=x_t, t=t, T=T)
    assert torch.allclose(scm_tangent_g(**kw, r=1.0, variant="code"), scm_tangent_g(**kw, r=1.0, variant="paper"))
    code, paper = scm_tangent_g(**kw, r=0.3, variant="code"), scm_tangent_g(**kw, r=0.3, variant="paper")
    assert torch.allclose(code - paper, -(1 - 0.3) * T, atol=1e-12)     # paper also scales the JVP term by r


def test_finite_difference_tangent_approaches_jvp(setup):
    student, teacher, x0, eps, t = setup
    x_t = add_noise(x0, eps, t)
    F_T = teacher.F(x_t, t, COND).detach()
    _, T_jvp = scm_tangent_jvp(student, x_t, t, COND, F_T)
    errors = [(scm_tangent_fd(student, x_t, t, COND, F_T, h=h)[1] - T_jvp).norm() / T_jvp.norm()
              for h in (1e-4, 1e-5, 1e-6)]
    # a one-sided difference: first-order in h, so the error shrinks about tenfold per decade of h
    assert errors[2] < 1e-2 and errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


def test_gradient_of_consistency_objective_is_minus_two_scale_g_hat():
    F = torch.randn(B, 3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    g_hat = normalize_tangent(torch.randn(B, 3, 2, 1, 1, dtype=torch.float64), 0.1)
    loss = consistency_objective(F, g_hat, scale=100.0)
    (grad,) = torch.autograd.grad(loss, F)
    assert torch.allclose(grad, -2 * 100.0 * g_hat / B, atol=1e-12)
    assert loss.item() == pytest.approx(100.0 * (g_hat ** 2).sum().item() / B)


def test_normalized_tangent_is_per_sample():
    g = torch.randn(3, 4, 1, 1, 1, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 1e3]).reshape(3, 1, 1, 1, 1)
    norms = normalize_tangent(g, 0.1).flatten(1).norm(dim=1)
    expected = g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1)
    assert torch.allclose(norms, expected)


def test_nan_samples_are_masked_and_counted(setup):
    student, teacher, x0, eps, t = setup
    x0 = x0.clone()
    x0[2, 1] = float("nan")
    out = scm_loss(student, teacher, x0, COND, t=t, eps=eps, guidance=2.0, r=1.0, scale=100.0)
    assert out.metrics["scm_nan_samples"] == 1.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_metrics_stay_on_the_device_without_a_graph_until_read_at_once(setup):
    """Every loss's metrics are detached tensors (a metric holding the graph would keep its activations alive
    until the step reads it), and `read_metrics` gives them back as floats in their order, numbers untouched."""
    student, teacher, x0, eps, t = setup
    fake = TrigFlowDenoiser(mlp(), "rf_velocity")
    x0_hat = x0.clone().requires_grad_(True)
    outs = [scm_loss(student, teacher, x0, COND, t=t, eps=eps, guidance=2.0, r=1.0, scale=100.0),
            dmd_loss(x0_hat, fake, teacher, COND, t=t, eps=eps, guidance=3.0, scale=0.5),
            fake_score_loss(fake, x0_hat, COND, t=t, eps=eps)]
    for out in outs:
        assert out.metrics and all(isinstance(v, torch.Tensor) and not v.requires_grad and v.numel() == 1
                                   for v in out.metrics.values()), out.metrics
        assert out.loss.requires_grad
    metrics = {**outs[0].metrics, "rollout_steps": 3.0, **outs[1].metrics}
    read = read_metrics(metrics)
    assert list(read) == list(metrics) and all(type(v) is float for v in read.values())
    assert read == {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
    assert read["scm_loss"] == outs[0].loss.item() and read["rollout_steps"] == 3.0


def test_dmd_gradient_is_normalised_score_difference(setup):
    student, teacher, x0, eps, t = setup
    fake = TrigFlowDenoiser(mlp(), "rf_velocity")
    x0_hat = x0.clone().requires_grad_(True)
    out = dmd_loss(x0_hat, fake, teacher, COND, t=t, eps=eps, guidance=3.0, scale=0.5)
    (grad,) = torch.autograd.grad(out.loss, x0_hat)
    x_D = add_noise(x0, eps, t)
    x_fake, x_real = fake.f(x_D, t, COND), teacher.f_guided(x_D, t, COND, 3.0)
    w = (x0 - x_real).abs().flatten(1).mean(1).reshape(B, 1, 1, 1, 1)
    assert torch.allclose(grad, 2 * 0.5 * (x_fake - x_real) / w / B, atol=1e-10)


def test_rollout_only_last_step_has_gradient_and_times_decrease(setup):
    student, _, x0, _, _ = setup
    seen = []

    def times_fn(n):
        t = torch.rand(n, dtype=torch.float64) * 1.5
        seen.append(t)
        return t
    renoise = rollout_draws(x0.shape, 3, times_fn=times_fn, generator=None, device=x0.device, dtype=x0.dtype)
    x0_hat = student_rollout(student, torch.randn_like(x0), COND, renoise=renoise)
    assert x0_hat.requires_grad and len(seen) == 2
    # the graph holds exactly one student call: one MLP input projection in the backward graph
    calls = sum(1 for _ in _walk(x0_hat.grad_fn) if type(_).__name__ == "AddmmBackward0")
    single = sum(1 for _ in _walk(student.f(x0, torch.ones(B, dtype=torch.float64), COND).grad_fn)
                 if type(_).__name__ == "AddmmBackward0")
    assert calls == single


def _walk(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return
    seen.add(fn)
    yield fn
    for nxt, _ in fn.next_functions:
        yield from _walk(nxt, seen)


def test_jvp_refuses_an_output_without_a_tangent():
    """A function whose output left forward-mode AD (here a .detach()) must not pass for a zero tangent: sCM would
    train on T = 0. A real dependence gives the exact derivative, float64: d(sin x)/dx · v = cos x · v."""
    from rcm_core.method.losses import jvp

    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    v = torch.full_like(x, 0.5)
    with pytest.raises(RuntimeError, match="carries no tangent"):
        jvp(lambda x_: torch.sin(x_).detach() * 2, (x,), (v,))
    primal, tangent = jvp(torch.sin, (x,), (v,))
    assert torch.equal(primal, torch.sin(x)) and torch.allclose(tangent, torch.cos(x) * v, rtol=0, atol=1e-15)
