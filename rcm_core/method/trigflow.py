"""TrigFlow time maths (sCM, Lu & Song 2024; rCM §1.1), all in float64.

x_t = cos t·x0 + sin t·ε with t ∈ [0, π/2]; EDM σ = tan t; rectified-flow (RF) s = sin t / (sin t + cos t).
The consistency function is f(x_t, t) = cos t·x_t − sin t·F(x_t, t) (rcm_method.md §1.1).

    pytest tests/test_trigflow.py
"""
from __future__ import annotations

import math

import torch

HALF_PI = math.pi / 2


def _f64(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def sigma_to_trig(sigma: torch.Tensor | float) -> torch.Tensor:
    return torch.atan(_f64(sigma))


def trig_to_sigma(t: torch.Tensor | float) -> torch.Tensor:
    return torch.tan(_f64(t))


def rf_to_trig(s: torch.Tensor | float) -> torch.Tensor:
    """t = arctan(s / (1 − s)); atan2 keeps s = 1 exact (t = π/2)."""
    s = _f64(s)
    return torch.atan2(s, 1 - s)


def trig_to_rf(t: torch.Tensor | float) -> torch.Tensor:
    t = _f64(t)
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, 1, ...] to broadcast against x; per-frame times [B, T] (causal modes) → [B, 1, T, 1, 1]
    against a video latent [B, C, T, H, W]."""
    if t.dim() == 2 and x.dim() == 5:
        return t[:, None, :, None, None]
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos t·x0 + sin t·ε, in float64."""
    t = expand_like(_f64(t), x0)
    return torch.cos(t) * x0.double() + torch.sin(t) * eps.double()


def velocity_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx_t/dt = cos t·ε − sin t·x0 (the TrigFlow flow-matching target)."""
    t = expand_like(_f64(t), x0)
    return torch.cos(t) * eps.double() - torch.sin(t) * x0.double()


def consistency_fn(x_t: torch.Tensor, F: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f = cos t·x_t − sin t·F (Eq. 1 of sCM in TrigFlow form); f(x, 0) = x."""
    t = expand_like(_f64(t), x_t)
    return torch.cos(t) * x_t.double() - torch.sin(t) * F.double()


def x0_to_F(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F = (cos t·x_t − x̂0) / sin t (paper Eq. 3); undefined at t = 0."""
    t = expand_like(_f64(t), x_t)
    return (torch.cos(t) * x_t.double() - x0.double()) / torch.sin(t)
