"""Present any raw network as a TrigFlow F-predictor (rCM §1.2, paper Eq. 3), with CFG folded in.

The wrapper maths runs in float64 (as rCM's `RectifiedFlow_TrigFlowWrapper` does); only the network call
is cast to the network's dtype. Every method is a pure function of (x_t, t), so `torch.func.jvp` can take
the total derivative through the preconditioning as well as through the network.

Parametrizations (`TeacherCfg.parametrization`):
- rf_velocity  Wan-style rectified flow: x_raw = x_t/(cos t+sin t), timestep k·s, v_raw = ε − x0;
               F = ((cos t − sin t)·x_t + v_raw)/(cos t + sin t) (rcm_method.md §1.2, simplified).
               k = `model.time_scale`: 1000 for Wan's released weights, 10 for teachers trained here (a
               sinusoid fed 1000·s leaves ripples in F(t) after a short training, which sCM's exact JVP
               differentiates; issue 18, experiments/bench/time_scale_study.py).
- edm_eps      EDM ε-predictor with σ_d = 1: input x_t (= c_in·x_σ), c_noise = ¼·ln σ; F = (ε̂ − sin t·x_t)/cos t.
- edm_x0       EDM-preconditioned denoiser (σ_d = 1): D = c_skip·x_σ + c_out·net(c_in·x_σ, c_noise) with
               c_skip = cos²t, c_out = sin t, c_in = cos t, so x̂0 = cos t·x_t + sin t·net and F = −net.
- trigflow     native TrigFlow network: F = net(x_t, t).

    pytest tests/test_denoiser.py
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rcm_core.method.trigflow import consistency_fn, expand_like

Parametrization = Literal["rf_velocity", "edm_eps", "edm_x0", "trigflow"]
RF_TIMESTEP_SCALE = 1000.0   # Wan's timestep input is 1000·s (rectified_flow_t_scaling_factor)


def network_time_scale(net: nn.Module) -> float:
    """k of the rf_velocity time input k·s: the network's `model.time_scale`, else Wan's 1000 (e.g. the analytic
    toy teacher, which reads its time input as 1000·s)."""
    return float(getattr(getattr(net, "cfg", None), "time_scale", RF_TIMESTEP_SCALE))


class TrigFlowDenoiser(nn.Module):
    """F_θ(x_t, t, cond) and f_θ(x_t, t, cond) around a raw network `net(x, timestep, cond)`."""

    def __init__(self, net: nn.Module, parametrization: Parametrization = "rf_velocity",
                 time_scale: float | None = None):
        super().__init__()
        self.net = net
        self.parametrization = parametrization
        self.time_scale = network_time_scale(net) if time_scale is None else float(time_scale)

    @property
    def net_dtype(self) -> torch.dtype:
        """The dtype the network computes in: its parameters' dtype, or under FSDP2 with fp32 masters the
        compute dtype recorded by rcm_core.parallel.sharding.shard_network."""
        return getattr(self.net, "compute_dtype", None) or next(self.net.parameters()).dtype

    def _raw_inputs(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, network timestep), both from float64 coefficients."""
        t = t.double()
        c, s = torch.cos(t), torch.sin(t)
        if self.parametrization == "rf_velocity":
            x_in = x_t.double() / expand_like(c + s, x_t)
            timestep = self.time_scale * s / (c + s)
        elif self.parametrization == "edm_eps" or self.parametrization == "edm_x0":
            x_in = x_t.double()                       # c_in·x_σ = cos t·(x_t / cos t) with σ_d = 1
            timestep = 0.25 * torch.log(torch.tan(t))
        else:
            x_in, timestep = x_t.double(), t
        # The time input stays float32 at least: the time path must be high precision (paper §4.2).
        return x_in.to(self.net_dtype), timestep.to(torch.promote_types(self.net_dtype, torch.float32))

    def _to_F(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x, out, t = x_t.double(), out.double(), expand_like(t.double(), x_t)
        c, s = torch.cos(t), torch.sin(t)
        if self.parametrization == "rf_velocity":
            return ((c - s) * x + out) / (c + s)
        if self.parametrization == "edm_eps":
            return (out - s * x) / c
        if self.parametrization == "edm_x0":
            return -out
        return out

    def F(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *,
          tf_context: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None, append: bool = False
          ) -> torch.Tensor:
        """TrigFlow velocity F(x_t, t) in float64; x_t [B, C, T, H, W], t [B] or, per latent frame, [B, T]
        (float64). A block-causal network also takes tf_context=(x_ctx, t_ctx), the teacher-forcing context in
        TrigFlow coordinates (t_ctx = 0: the clean video), or cache=/append= for one chunk (WanDiT.forward)."""
        x_in, timestep = self._raw_inputs(x_t, t)
        causal = {}
        if tf_context is not None:
            causal["tf_context"] = self._raw_inputs(*tf_context)
        if cache is not None or append:
            causal.update(cache=cache, append=append)
        return self._to_F(x_t, t, self.net(x_in, timestep, cond, **causal))

    def f(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **causal) -> torch.Tensor:
        """Consistency function f = cos t·x_t − sin t·F: the x̂0 estimate (`causal`: as for F)."""
        return consistency_fn(x_t, self.F(x_t, t, cond, **causal), t)

    def null_cond(self, batch_size: int, device: torch.device, like: torch.Tensor | None = None) -> torch.Tensor:
        """The CFG unconditional condition; a text context is zero-padded to `like`'s length (as Wan does)."""
        if like is not None and like.dim() == 3:
            return self.net.null_cond(batch_size, device, length=like.shape[1])
        return self.net.null_cond(batch_size, device)

    def F_guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 guidance: float, **causal) -> torch.Tensor:
        """F_T = F(∅) + w·(F(c) − F(∅)), one batched call (CFG folded into the teacher target). `causal` as for
        F; a KV cache then holds 2B rows (conditional, unconditional), so use it with one guidance throughout."""
        uncond = None if cond is None else self.null_cond(x_t.shape[0], x_t.device, like=cond)
        if guidance == 1.0 or uncond is None:          # unconditional models have nothing to guide with
            return self.F(x_t, t, cond, **causal)
        if causal.get("tf_context") is not None:
            causal["tf_context"] = tuple(torch.cat([c, c]) for c in causal["tf_context"])
        F_both = self.F(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(cond, uncond), **causal)
        F_c, F_u = F_both.chunk(2)
        return F_u + guidance * (F_c - F_u)

    def f_guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 guidance: float, **causal) -> torch.Tensor:
        """CFG in x0 space; f is affine in F, so this equals f of the guided F (rCM §3.2)."""
        return consistency_fn(x_t, self.F_guided(x_t, t, cond, guidance, **causal), t)


def _cat_cond(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    if cond.dim() > 1 and uncond.shape[1] != cond.shape[1]:
        raise ValueError(f"conditioning length {cond.shape[1]} differs from the null condition's "
                         f"{uncond.shape[1]}; pad text embeddings to one length")
    return torch.cat([cond, uncond.to(cond.dtype)])


def check_latents(x: torch.Tensor, model: TrigFlowDenoiser, name: str = "latent") -> None:
    """Fail early, with the expected shape, on a tensor that cannot be a latent batch for `model`."""
    cfg = model.net.cfg
    got = x.shape[1] if cfg.kind == "dit" else x[0].numel()
    if x.dim() != 5 or got != cfg.in_channels:
        what = "C" if cfg.kind == "dit" else "C·T·H·W"
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B, C, T, H, W] with "
                         f"{what} = model.in_channels = {cfg.in_channels}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} has dtype {x.dtype}; expected a floating-point tensor")
