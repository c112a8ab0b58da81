"""Building blocks shared by the networks: sinusoidal time embedding, fp32-computed norms, 3D RoPE, patchify.

Everything here is written for forward-mode AD (`torch.func.jvp`): no in-place ops on inputs, no `.item()`,
no data-dependent Python control flow. Norms and the time path compute in at least float32 (float64 stays
float64), following Wan2.1 and rCM §2.4 ("high-precision time").

    .venv/bin/python -m pytest tests/test_networks.py -q
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 compute in fp32, float64 stays float64 (for the float64 JVP tests)."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off for the time path, whose derivative sCM needs in full precision (paper §4.2)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Time embedding

def sinusoidal_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] → [B, dim] as [cos(t·ω_j), sin(t·ω_j)], ω_j = max_period^(−j/half), j < half (Wan's order).

    Computed in the dtype of `timestep`; the op order follows diffusers' `Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)` so float32 results agree bit for bit with the reference.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding width must be even, got freq_dim={dim}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=timestep.dtype, device=timestep.device)
    omega = torch.exp(exponent / half)
    angles = timestep[:, None] * omega[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Linear(nn.Linear):
    """nn.Linear whose forward-mode JVP costs two matmuls, as it should, not three.

    Under `torch.autograd.forward_ad` PyTorch differentiates `x @ Wᵀ` by its product rule x_t·Wᵀ + x·W_tᵀ, and for a
    weight without a tangent it materialises W_t as zeros and runs the second matmul anyway (torch 2.13: `mm` on a
    zeros-expanded tensor, no short cut): every linear layer of sCM's JVP pass cost 3 matmuls where 2 carry
    information (`tests/test_jvp_flops.py` counts them). Here a dual input whose weight carries no tangent is split:
    the primal through the layer, the tangent through the weight alone, the same values to the bit. Anything else
    (no tangent, a weight with a tangent, a pass that records gradients, code being compiled) takes nn.Linear's path.
    Same parameter names, so checkpoints and FSDP2 see an nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No dual level open (every plain forward: rollouts, teacher, samplers): no `_unpack_dual` dispatch either.
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or getattr(fwAD, "_current_level", 0) < 0:
            return super().forward(x)
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is None or any(fwAD.unpack_dual(p).tangent is not None for p in (self.weight, self.bias)
                                  if p is not None):
            return super().forward(x)
        return fwAD.make_dual(F.linear(primal, self.weight, self.bias), F.linear(tangent, self.weight))


def linear_in(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed in x's dtype whatever the stored weight dtype, so the time path stays fp32
    even if someone casts the whole module to bf16."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


class TimestepEmbedder(nn.Module):
    """linear_1 → SiLU → linear_2 (diffusers `TimestepEmbedding`; Wan `time_embedding.0/.2`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_in(self.linear_2, F.silu(linear_in(self.linear_1, x)))


# ----------------------------------------------------------------------------------------------------------
# Norms computed in (at least) fp32, as Wan's FP32LayerNorm / WanRMSNorm

def fp32_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """LayerNorm over the last dim evaluated in ≥ fp32 and cast back to x's dtype (Wan's FP32LayerNorm)."""
    dt = compute_dtype(x.dtype)
    weight = None if weight is None else weight.to(dt)
    bias = None if bias is None else bias.to(dt)
    return F.layer_norm(x.to(dt), x.shape[-1:], weight, bias, eps).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in ≥ fp32 and cast back; affine parameters optional (Wan norm1/norm3 have none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_layer_norm(x, self.weight, self.bias, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x·rsqrt(mean(x²) + eps) over the last dim in ≥ fp32, cast to x's dtype, times the gain in x's dtype (Wan)."""
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain; for QK-norm it spans all heads (Wan's
    'rms_norm_across_heads'), so the parameter is [dim], not [head_dim]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# ----------------------------------------------------------------------------------------------------------
# 3D rotary position embedding (Wan2.1): head_dim split over (t, h, w), rotation of interleaved pairs

def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real widths given to the (t, h, w) axes: h and w get 2·(head_dim//6) each, t the rest (Wan)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, *, theta: float = 10000.0,
                device: torch.device | None = None, start_frame: int = 0) -> torch.Tensor:
    """Rotation angles [f·h·w, head_dim/2] in float64 for a token grid (f, h, w) in row-major order.

    Axis a of real width d_a rotates its pair j by pos_a·θ^(−2j/d_a); the pair angles of the three axes are
    concatenated t, h, w, exactly like Wan's `rope_params` tables indexed by (frame, row, column). Frames sit at
    positions start_frame, start_frame + 1, … (a chunk of a longer video keeps its place in it).
    """
    per_axis = []
    for n, d, start in zip(grid, rope_axis_dims(head_dim), (start_frame, 0, 0)):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        pos = torch.arange(start, start + n, dtype=torch.float64, device=device)
        per_axis.append(pos[:, None] * omega[None, :])
    f, h, w = grid
    t_ang = per_axis[0][:, None, None, :].expand(f, h, w, -1)
    h_ang = per_axis[1][None, :, None, :].expand(f, h, w, -1)
    w_ang = per_axis[2][None, None, :, :].expand(f, h, w, -1)
    return torch.cat([t_ang, h_ang, w_ang], dim=-1).reshape(f * h * w, head_dim // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of x [B, heads, L, head_dim] by the angles whose cos/sin are [L, head_dim/2].

    The rotation is computed in ≥ fp32 (cos/sin are cast to that dtype) and cast back to x's dtype.
    """
    dt = compute_dtype(x.dtype)
    pairs = x.to(dt).unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(dt), sin.to(dt)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Patchify: token order (f, h, w) row-major; within a token (pt, ph, pw, C) with C fastest, as Wan's head

def patch_grid(shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) → token grid (T/pt, H/ph, W/pw); raises with the expected shape if not divisible."""
    _, _, T, H, W = shape
    pt, ph, pw = patch_size
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent of shape {tuple(shape)} is not divisible by patch_size {tuple(patch_size)}: "
                         f"expected [B, C, T, H, W] with T % {pt} == 0, H % {ph} == 0, W % {pw} == 0")
    return T // pt, H // ph, W // pw


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] → [B, L, pt·ph·pw·C], the inverse of `unpatchify`."""
    B, C = x.shape[:2]
    f, h, w = patch_grid(tuple(x.shape), patch_size)
    pt, ph, pw = patch_size
    x = x.reshape(B, C, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, f * h * w, pt * ph * pw * C)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int],
               channels: int) -> torch.Tensor:
    """[B, L, pt·ph·pw·C] → [B, C, T, H, W] (Wan's `unpatchify`: 'fhwpqrc → cfphqwr')."""
    B = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    x = tokens.reshape(B, f, h, w, pt, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, channels, f * pt, h * ph, w * pw)
