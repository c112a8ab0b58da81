"""Samplers: the student's few-step consistency sampler and the teacher's PF-ODE solver (rCM §4).

Both take the noise (and per-step noises via a generator) from the caller, so paired comparisons
(same noise for student and teacher) are possible.
"""
from __future__ import annotations

from typing import Literal

import torch

from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.timesteps import student_time_grid, teacher_time_grid
from rcm_core.method.trigflow import add_noise, expand_like


@torch.no_grad()
def consistency_sample(student: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, *, steps: int,
                       sigma_max: float, mid_t: list[float],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic multistep consistency sampling: x̂0 = f(x, t_i), then re-noise to t_{i+1} with fresh ε.

    Starts from x = sin t₀·z at t₀ = arctan σ_max (RF x_raw = s₀·z, rcm_method.md §4.1).
    """
    times = student_time_grid(steps, sigma_max=sigma_max, mid_t=mid_t, device=noise.device)
    B = noise.shape[0]
    x = (torch.sin(times[0]) * noise.double()).to(noise.dtype)
    for i in range(steps):
        x0_hat = student.f(x, times[i].expand(B), cond)
        if i == steps - 1:
            return x0_hat.to(noise.dtype)
        eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x = add_noise(x0_hat, eps, times[i + 1].expand(B)).to(noise.dtype)
    raise ValueError(f"steps must be ≥ 1, got {steps}")


def _trig_step(x: torch.Tensor, F: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """x_{t'} = cos(t − t')·x_t − sin(t − t')·F: exact when the x0/ε predictions are constant (DDIM)."""
    d = expand_like((t - t_next).double(), x)
    return torch.cos(d) * x.double() - torch.sin(d) * F.double()


@torch.no_grad()
def teacher_sample(teacher: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, *, steps: int,
                   guidance: float, shift: float = 5.0, solver: Literal["euler", "heun"] = "euler",
                   start_t: float | None = None) -> torch.Tensor:
    """Solve the guided PF-ODE dx/dt = F_T from t = π/2 (x = z) to 0 on a shifted RF grid.

    `euler` is the first-order trigonometric (DDIM) step, `heun` adds Heun's corrector on all but the last
    step (2N − 1 network evaluations per sample, each doubled by guidance). `start_t`: `noise` is the state x_t at
    that time instead (e.g. a re-noised sample, SDEdit), solved on the N-step grid's times below it; at a grid time
    this continues an N-step solve exactly, and π/2 is the plain solve.
    """
    times = teacher_time_grid(steps, shift=shift, device=noise.device)
    if start_t is not None:
        times = torch.cat([times.new_tensor([start_t]), times[times < start_t]])
        steps = times.numel() - 1
    B = noise.shape[0]
    x = noise.double()
    for i in range(steps):
        t, t_next = times[i].expand(B), times[i + 1].expand(B)
        F = teacher.F_guided(x.to(noise.dtype), t, cond, guidance)
        x_next = _trig_step(x, F, t, t_next)
        if solver == "heun" and i < steps - 1:
            F_next = teacher.F_guided(x_next.to(noise.dtype), t_next, cond, guidance)
            x_next = _trig_step(x, 0.5 * (F + F_next), t, t_next)
        x = x_next
    return x.to(noise.dtype)


def teacher_nfe(steps: int, solver: str, guidance: float) -> int:
    per_eval = 1 if guidance == 1.0 else 2
    return per_eval * (steps if solver == "euler" else 2 * steps - 1)
