"""The losses of rCM (and of its dCM variant), each a small function returning `LossOut(loss, metrics)`.

- `scm_loss`: continuous-time consistency (sCM) with the JVP tangent, rcm_method.md §2.
- `dcm_loss`: discrete-time consistency (dCM, official cm_type=dcm, §3.8): k CFG-teacher Euler steps, no JVP.
- `dmd_loss`: the score-regularising DMD reverse-divergence term on a student rollout, §3.1–3.2.
- `fake_score_loss`: the critic's TrigFlow flow-matching loss on student samples, §3.4.

Reduction: each sample's loss is summed over (C, T, H, W) as in the official code; samples are then
averaged. The official runs use batch 1 per GPU with ranks averaged, which is this same reduction, and the
mean keeps learning rates independent of the batch size. `scale·Σ(F − sg F − ĝ)²` has value ≈ scale·‖ĝ‖².

    pytest tests/test_losses.py
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD

from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.trigflow import add_noise, consistency_fn, expand_like, velocity_target


@dataclass
class LossOut:
    """A loss and its metrics. The metrics are detached scalar tensors left where the loss is: reading one is a host
    sync that stalls the GPU mid-iteration until the CPU queues the next work, so the training step reads them
    all at once, after the backward (`read_metrics`)."""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


def read_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """`metrics` as floats, in order: the tensors in one host read per device, the numbers as they are."""
    keys_on: dict[torch.device, list[str]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            keys_on.setdefault(value.device, []).append(key)
    read = {}
    for keys in keys_on.values():
        values = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in keys]).tolist()
        read.update(zip(keys, values))
    return {key: read[key] if key in read else float(value) for key, value in metrics.items()}


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def _finite_rows(*xs: torch.Tensor) -> torch.Tensor:
    """[B] bool: True where every element of every x in that sample is finite."""
    ok = torch.ones(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        ok &= torch.isfinite(x.flatten(1)).all(1)
    return ok


# ----------------------------------------------------------------------------------------------------------
# sCM

def jvp(fn, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), its directional derivative along `tangents`) by forward-mode AD, without gradients.

    Dual tensors (`torch.autograd.forward_ad`), not `torch.func.jvp`: on torch 2.11 + CUDA, FSDP2's
    pre-forward all-gather fails inside the functorch transform ("Cannot access storage of TensorWrapper",
    docs/BENCHMARKS.md), while dual tensors run through the same sharded network with the tangent equal to
    the unsharded one (max error 0 on 2× H200, shared/reference/gpu_multi.md). Parameters are plain
    tensors here, so they carry no tangent; `kernels.attention` sees dual q/k/v and runs its fused
    primal+tangent pass once (no primal recomputation); CP's all-to-alls carry the tangents through their
    `jvp` rules. The same mechanism on one process, on CPU and under every mesh: one code path.

    Raises RuntimeError when the output carries no tangent at all: then something between the inputs and the
    output left forward-mode AD (a `.detach()`, a NumPy round trip, an op without a forward-mode rule), and
    returning zeros would train sCM on T = 0 without a word.
    """
    with torch.no_grad(), fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
    if tangent is None:
        raise RuntimeError(f"jvp: the output of {getattr(fn, '__qualname__', fn)} carries no tangent, so its "
                           "directional derivative was lost on the way (a .detach(), a NumPy round trip or an op "
                           "without a forward-mode rule between the inputs and the output); make the output depend "
                           "on the inputs through torch ops")
    return primal.detach(), tangent.detach()


def scm_tangent_jvp(student: TrigFlowDenoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    F_teacher: torch.Tensor, tf_context=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_θ⁻, T) with T = cos t·sin t·dF_θ⁻/dt along the teacher's PF-ODE.

    JVP rearrangement (sCM §5.1): tangents (ẋ, ṫ) = (cos t·sin t·F_T, cos t·sin t) keep T of order one. A
    teacher-forcing context (causal `tf_scm`) is a constant: it carries no tangent, so the JVP runs through the
    block-causal attention with zero tangents on the context half.
    """
    cs = torch.cos(t) * torch.sin(t)                                   # [B] float64
    x_dot = (expand_like(cs, x_t) * F_teacher).to(x_t.dtype)
    return jvp(lambda x, tt: student.F(x, tt, cond, **_ctx(tf_context)), (x_t, t), (x_dot, cs))


def _ctx(tf_context) -> dict:
    """Keyword arguments for a teacher-forcing context (Causal rCM), none without one (any network)."""
    return {} if tf_context is None else {"tf_context": tf_context}


def scm_tangent_fd(student: TrigFlowDenoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   F_teacher: torch.Tensor, h: float, tf_context=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-continuous tangent (paper §4.2, code fd_type=1): JVP in x only, ∂_tF by a difference.

    ∂_tF ≈ (cos h·F(x_t, t) − F(x_t, t − h)) / sin h.
    """
    cs = torch.cos(t) * torch.sin(t)
    x_dot = (expand_like(cs, x_t) * F_teacher).to(x_t.dtype)
    F_minus, jvp_x = jvp(lambda x: student.F(x, t, cond, **_ctx(tf_context)), (x_t,), (x_dot,))
    with torch.no_grad():
        F_back = student.F(x_t, t - h, cond, **_ctx(tf_context))
    dF_dt = (torch.cos(torch.tensor(h, dtype=torch.float64)) * F_minus - F_back) / torch.sin(
        torch.tensor(h, dtype=torch.float64))
    return F_minus.detach(), (jvp_x + expand_like(cs, x_t) * dF_dt).detach()


def scm_tangent_g(*, F_minus: torch.Tensor, F_teacher: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  T: torch.Tensor, r: float, variant: Literal["code", "paper"] = "code") -> torch.Tensor:
    """g = −cos t·√(1 − r²sin²t)·(F⁻ − F_T) − (r·cos t·sin t·x_t + T)   (official code, §2.1 step 5).

    `paper` multiplies the JVP term by r too (Algorithm 1; rCM issue #18). At r = 1 both equal
    cos t·df_θ⁻/dt with df/dt = −cos t(F⁻ − F_T) − sin t(x_t + dF⁻/dt) (paper Eq. 5).
    """
    tt = expand_like(t.double(), x_t)
    c, s = torch.cos(tt), torch.sin(tt)
    first = -c * torch.sqrt(1 - (r * s) ** 2) * (F_minus.double() - F_teacher.double())
    if variant == "code":
        return first - (r * c * s * x_t.double() + T.double())
    return first - r * (c * s * x_t.double() + T.double())


def normalize_tangent(g: torch.Tensor, c: float) -> torch.Tensor:
    """ĝ = g / (‖g‖₂ + c), per sample over all of (C, T, H, W), in float64 (sCM tangent normalisation)."""
    g = g.double()
    norm = g.flatten(1).norm(dim=1)
    return g / expand_like(norm + c, g)


def consistency_objective(F_theta: torch.Tensor, g_hat: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·mean_b Σ(F_θ − sg(F_θ) − ĝ)²: value scale·‖ĝ‖², gradient −2·scale·ĝ/B w.r.t. F_θ."""
    diff = F_theta.double() - F_theta.detach().double() - g_hat
    return scale * _per_sample_sum(diff ** 2).mean()


def scm_loss(student: TrigFlowDenoiser, teacher: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor, *,
             t: torch.Tensor, eps: torch.Tensor, guidance: float, r: float, scale: float,
             tangent: Literal["jvp", "finite_difference"] = "jvp", fd_step: float = 1e-4,
             variant: Literal["code", "paper"] = "code", norm_c: float = 0.1,
             student_grad: TrigFlowDenoiser | None = None, tf_context=None, teacher_context=None) -> LossOut:
    """L_sCM = scale·Σ(F_θ − sg(F_θ) − ĝ)², its gradient pushes F_θ toward +ĝ (rCM §2.1).

    `student_grad` is the module to differentiate (e.g. a data-parallel wrapper); the JVP always runs on
    the plain `student` under no_grad, since PyTorch cannot JVP through DDP/FSDP wrappers. `tf_context`
    (x_ctx, t_ctx): teacher-forcing sCM of Causal rCM (`tf_scm`), the student's context; the teacher sees
    `teacher_context` (default the same; the clean video when the student trains with a noisy context).
    """
    ctx = _ctx(tf_context)
    teacher_ctx = _ctx(tf_context if teacher_context is None else teacher_context)
    x_t = add_noise(x0, eps, t).to(x0.dtype)
    finite_in = _finite_rows(x_t)                 # a non-finite input must not poison the batch's gradient
    x_t = torch.where(expand_like(finite_in, x_t), x_t, torch.zeros_like(x_t))
    with torch.no_grad():
        F_T = teacher.F_guided(x_t, t, cond, guidance, **teacher_ctx)
    if tangent == "jvp":
        F_minus, T = scm_tangent_jvp(student, x_t, t, cond, F_T, tf_context)
    else:
        F_minus, T = scm_tangent_fd(student, x_t, t, cond, F_T, fd_step, tf_context)
    g = scm_tangent_g(F_minus=F_minus, F_teacher=F_T, x_t=x_t, t=t, T=T, r=r, variant=variant)
    F_theta = (student_grad or student).F(x_t, t, cond, **ctx)
    ok = finite_in & _finite_rows(g, F_theta)       # NaN guard (§2.1 step 6): zero the sample's loss
    g = torch.where(expand_like(ok, g), g, torch.zeros_like(g))
    F_theta = torch.where(expand_like(ok, F_theta), F_theta, torch.zeros_like(F_theta))
    g_hat = normalize_tangent(g, norm_c)
    loss = consistency_objective(F_theta, g_hat, scale)
    metrics = {"scm_loss": loss.detach(), "scm_g_norm": g.flatten(1).norm(dim=1).mean(),
               "scm_nan_samples": (~ok).sum()}
    return LossOut(loss, metrics)


# ----------------------------------------------------------------------------------------------------------
# dCM

def teacher_euler(teacher: TrigFlowDenoiser, x: torch.Tensor, times: torch.Tensor, cond: torch.Tensor,
                  guidance: float, tf_context=None) -> torch.Tensor:
    """Euler steps of the CFG teacher's PF-ODE dx/dt = F_T along `times` [k+1, B] (decreasing), in float64:
    x ← x − (t_j − t_{j+1})·F_T(x, t_j)."""
    x = x.double()
    for j in range(times.shape[0] - 1):
        F_T = teacher.F_guided(x, times[j], cond, guidance, **_ctx(tf_context))
        x = x - expand_like(times[j] - times[j + 1], x) * F_T
    return x


def dcm_loss(student: TrigFlowDenoiser, teacher: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor, *,
             times: torch.Tensor, eps: torch.Tensor, guidance: float, scale: float,
             student_grad: TrigFlowDenoiser | None = None, tf_context=None, teacher_context=None) -> LossOut:
    """L_dCM = scale·Σ(f_θ(x_t₀, t₀) − sg f_θ(x̂_t_k, t_k))², x̂_t_k from k CFG-teacher Euler steps (§3.8).

    `times` [k+1, B] from `timesteps.sample_dcm_times`. The target is the student's own x̂0 at the cleaner
    time, computed without gradient with the online weights (not the EMA; rCM issue #30). Forward passes only,
    so any attention kernel works; `student_grad` is the module to differentiate (a data-parallel wrapper).
    `tf_context`: teacher-forcing dCM of Causal rCM (`tf_dcm`), the context of the student's two calls; the
    teacher's Euler steps see `teacher_context` (default the same).
    """
    ctx = _ctx(tf_context)
    t0, tk = times[0], times[-1]
    x_t = add_noise(x0, eps, t0).to(x0.dtype)
    finite_in = _finite_rows(x_t)
    x_t = torch.where(expand_like(finite_in, x_t), x_t, torch.zeros_like(x_t))
    with torch.no_grad():
        x_k = teacher_euler(teacher, x_t, times, cond, guidance,
                            tf_context if teacher_context is None else teacher_context).to(x0.dtype)
        target = student.f(x_k, tk, cond, **ctx)
    x0_pred = (student_grad or student).f(x_t, t0, cond, **ctx)
    ok = finite_in & _finite_rows(target, x0_pred)            # NaN guard as in sCM: zero the sample's loss
    x0_pred = torch.where(expand_like(ok, x0_pred), x0_pred, torch.zeros_like(x0_pred))
    target = torch.where(expand_like(ok, target), target, torch.zeros_like(target))
    loss = scale * _per_sample_sum((x0_pred.double() - target.double()) ** 2).mean()
    return LossOut(loss, {"dcm_loss": loss.detach(), "dcm_nan_samples": (~ok).sum(), "dcm_dt": (t0 - tk).mean()})


# ----------------------------------------------------------------------------------------------------------
# DMD: rollout, generator loss, critic loss

def rollout_draws(shape: torch.Size | tuple[int, ...], steps: int, *, times_fn,
                  generator: torch.Generator | None, device: torch.device | str,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The random draws of an N-step rollout, (t̂_n, ε_n) for each of its N − 1 re-noisings, in the order the
    rollout uses them. Drawn up front for the whole batch, so a batch split into micro-batches (gradient
    accumulation) rolls out with exactly the draws the whole batch would have had."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    B = shape[0]
    return [(times_fn(B), torch.randn(shape, generator=generator, device=device, dtype=dtype))
            for _ in range(steps - 1)]


def student_rollout(student: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, *,
                    renoise: list[tuple[torch.Tensor, torch.Tensor]],
                    grad_module: TrigFlowDenoiser | None = None, last_grad: bool = True) -> torch.Tensor:
    """x̂0 from an N-step student rollout with decreasing random times (rCM §3.1), N = len(renoise) + 1.

    t_1 = π/2; t_n = min(t̂_n, t_{n−1}) with t̂_n ~ p_D; fresh noise at each re-noising (`renoise`, from
    `rollout_draws`); only the last student call carries a gradient (through `grad_module` if given).
    """
    B = noise.shape[0]
    t = torch.full((B,), torch.pi / 2, dtype=torch.float64, device=noise.device)
    x = noise
    for n in range(len(renoise) + 1):
        if n == len(renoise):
            if last_grad and torch.is_grad_enabled():
                return (grad_module or student).f(x, t, cond)
            with torch.no_grad():
                return student.f(x, t, cond)
        with torch.no_grad():
            x0_hat = student.f(x, t, cond)
        t_hat, eps = renoise[n]
        t = torch.minimum(t_hat, t)
        x = add_noise(x0_hat, eps, t).to(noise.dtype)
    raise AssertionError("unreachable")


def dmd_loss(x0_hat: torch.Tensor, fake: TrigFlowDenoiser, teacher: TrigFlowDenoiser, cond: torch.Tensor, *,
             t: torch.Tensor, eps: torch.Tensor, guidance: float, weight_min: float = 1e-5,
             scale: float = 1.0) -> LossOut:
    """L_DMD = scale·Σ(x̂0 − sg(x̂0 − (x0_fake − x0_real)/w))², w = mean|x̂0 − x0_real| (rCM §3.2, DMD2)."""
    x_D = add_noise(x0_hat.detach(), eps, t).to(eps.dtype)
    with torch.no_grad():
        x0_fake = fake.f(x_D, t, cond)                                 # no CFG for the fake score
        x0_real = teacher.f_guided(x_D, t, cond, guidance)
        w = (x0_hat.detach().double() - x0_real).abs().flatten(1).mean(1).clamp_min(weight_min)
        grad = (x0_fake - x0_real) / expand_like(w, x0_real)
        target = x0_hat.detach().double() - grad
    ok = _finite_rows(grad, x0_hat)
    per_sample = _per_sample_sum((x0_hat.double() - target) ** 2)
    per_sample = torch.where(ok, per_sample, torch.zeros_like(per_sample))
    loss = scale * per_sample.mean()
    return LossOut(loss, {"dmd_loss": loss.detach(), "dmd_nan_samples": (~ok).sum(), "dmd_weight": w.mean()})


def fake_score_loss(fake_grad: TrigFlowDenoiser, x0_hat: torch.Tensor, cond: torch.Tensor, *,
                    t: torch.Tensor, eps: torch.Tensor) -> LossOut:
    """Critic: Σ‖F_fake(x_D, t) − (cos t·ε − sin t·x̂0)‖², TrigFlow flow matching on student samples (§3.4)."""
    x0_hat = x0_hat.detach()
    x_D = add_noise(x0_hat, eps, t).to(eps.dtype)
    F_fake = fake_grad.F(x_D, t, cond)
    per_sample = _per_sample_sum((F_fake - velocity_target(x0_hat, eps, t)) ** 2)
    ok = torch.isfinite(per_sample)
    loss = torch.where(ok, per_sample, torch.zeros_like(per_sample)).mean()
    return LossOut(loss, {"critic_loss": loss.detach(), "critic_nan_samples": (~ok).sum()})


def flow_matching_loss(model: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor, *,
                       t: torch.Tensor, eps: torch.Tensor, tf_context=None) -> LossOut:
    """Teacher training in TrigFlow form: ‖F(x_t, t) − (cos t·ε − sin t·x0)‖², equal to RF's ‖v − (ε − x0)‖²
    up to the per-time weight (cos t + sin t)². t is [B] or, per latent frame, [B, T] (diffusion forcing);
    `tf_context`: the teacher-forcing context of Causal rCM's `tf`."""
    x_t = add_noise(x0, eps, t).to(x0.dtype)
    F = model.F(x_t, t, cond, **_ctx(tf_context))
    loss = _per_sample_sum((F - velocity_target(x0, eps, t)) ** 2).mean()
    return LossOut(loss, {"fm_loss": loss.detach()})


__all__ = [
    "LossOut",
    "consistency_fn",
    "dcm_loss",
    "dmd_loss",
    "fake_score_loss",
    "flow_matching_loss",
    "normalize_tangent",
    "read_metrics",
    "scm_loss",
    "scm_tangent_fd",
    "scm_tangent_g",
    "scm_tangent_jvp",
    "rollout_draws",
    "student_rollout",
    "teacher_euler",
]
