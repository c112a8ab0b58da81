"""Time distributions of rCM (rcm_method.md §1.3), returned as TrigFlow t in float64.

p_G (sCM times): log tan t ~ N(mean, std²), with tan t = √T·z for video latents of T frames (Wan).
p_D (DMD / critic / rollout times): u ~ U(0, 1), s = shift·u / (1 + (shift − 1)·u), t = arctan(s/(1 − s)).
dCM times: u ~ U[0, 1 − k·Δu], Δu = 1/N; s_j = 1 − (u + j·Δu) for j = 0..k, shifted and mapped to t as above
(official cm_type=dcm: N = 48, k = 1, shift 5).
"""
from __future__ import annotations

import math

import torch

from rcm_core.method.trigflow import HALF_PI, rf_to_trig

# Keep t away from the exact ends: sin t or cos t = 0 makes some parametrizations divide by zero.
T_MIN, T_MAX = 1e-4, HALF_PI - 1e-4


def shift_rf_time(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The shift-`shift` RF schedule s ↦ shift·s / (1 + (shift − 1)·s): more time near the noise end for shift > 1."""
    return shift * s / (1 + (shift - 1) * s)


def dcm_times(u: torch.Tensor, *, total_steps: int, skip: int, shift: float) -> torch.Tensor:
    """[k+1, B] decreasing TrigFlow times t_0 > … > t_k for u [B] in [0, 1 − k/N] (float64, clamped like p_D)."""
    j = torch.arange(skip + 1, dtype=torch.float64, device=u.device)[:, None]
    s = 1 - (u.double()[None] + j / total_steps)
    return rf_to_trig(shift_rf_time(s, shift)).clamp(T_MIN, T_MAX)


def sample_dcm_times(n: int, *, total_steps: int, skip: int, shift: float,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """dCM's time pairs (k+1 times per sample): u ~ U[0, 1 − k·Δu] with Δu = 1/N, then `dcm_times`."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device) * (1 - skip / total_steps)
    return dcm_times(u, total_steps=total_steps, skip=skip, shift=shift)


def sample_p_G(n: int, *, mean: float, std: float, frames: int = 1, frame_shift: bool = True,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    shift = 0.5 * math.log(frames) if frame_shift and frames > 1 else 0.0
    log_sigma = mean + shift + std * torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    return torch.atan(torch.exp(log_sigma)).clamp(T_MIN, T_MAX)


def sample_p_D(n: int, *, shift: float, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return rf_to_trig(shift_rf_time(u, shift)).clamp(T_MIN, T_MAX)


def teacher_time_grid(steps: int, *, shift: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """N+1 decreasing times from π/2 to 0, uniform in shifted RF time (Wan's sampling schedule)."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return rf_to_trig(shift_rf_time(u, shift))


def student_time_grid(steps: int, *, sigma_max: float, mid_t: list[float],
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[arctan σ_max, mid_t[0], …, mid_t[k−2], 0] for a k-step consistency sampler (rCM §4.2)."""
    if steps - 1 > len(mid_t):
        raise ValueError(f"a {steps}-step sampler needs {steps - 1} intermediate times; got mid_t={mid_t}")
    times = [math.atan(sigma_max), *mid_t[: steps - 1], 0.0]
    return torch.tensor(times, dtype=torch.float64, device=device)
