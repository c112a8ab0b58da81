"""The elementwise work of a DiT block's JVP pass, primal and tangent in one compiled function (issue 28, lever 4).

Why: profiled on one H200 (2026-12-03, 8,190 tokens, `model.compile=blocks`, `rcm_step.py --profile`), the JVP pass
spent 48 % of its GPU time in eager elementwise kernels (copy_ 66 ms in 4,611 calls, mul 54, add 32, sub 18 of
353 ms): forward-mode AD runs the fp32 islands between the matmuls (adaLN modulation, LayerNorm, RMSNorm, RoPE, the
gates, tanh-GELU) op by op, casts included, for the primal and again for the tangent. Inductor cannot compile a
dual tensor (it returns the primal and drops the tangent: experiments/bench/compile_forward_ad_probe.py), and
`torch.func.jvp` cannot open inside the JVP pass's `forward_ad` level ("nested forward mode AD is not supported").

So each island is two functions: `fn`, the one definition of its maths, which every pass calls, and `rule`, which
returns `(fn(...), its tangent)` from primals and tangents as plain tensors, the tangent written out by hand. When
asked (`fuse=True`: the block's `model.compile` is "blocks") and an input is a dual tensor of an open `forward_ad`
level with gradients off (sCM's JVP pass), `Island.__call__` unpacks the inputs, runs the compiled `rule` and
returns a dual tensor; every other call (plain forwards, with-grad passes, code being compiled, `fuse=False`) is
`fn` itself. `tests/test_tangent_islands.py` holds each rule to forward-mode AD through `fn` in
float64; tests/test_speed_levers.py's compiled-blocks tests hold a DiT's JVP pass with compiled islands to the eager
one. Every island's `fn` is, bit for bit, the block's former inline code; compiled (inside the fused JVP, as in
`model.compile=blocks`' plain forwards) it rounds as inductor orders it: a bf16 DiT's JVP pass is 4.83e-3
(primal) and 6.00e-3 (tangent) from float64 fused, 4.89e-3 and 7.11e-3 eager (experiments/bench/forward_ad_cost.py,
CPU, 2026-12-03).
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from rcm_core.networks.layers import (
    FP32LayerNorm,
    apply_rope,
    compute_dtype,
    fp32_layer_norm,
    rms_norm,
)

_FUSION = True       # `unfused()` turns it off: the eager dual path with model.compile=blocks, for A/B benchmarks


@contextlib.contextmanager
def unfused():
    """Inside: every island takes forward-mode AD through `fn` (the eager path), whatever `fuse` says. For
    experiments/bench/rcm_step.py --islands-ab, which times the JVP pass both ways in one process."""
    global _FUSION
    before, _FUSION = _FUSION, False
    try:
        yield
    finally:
        _FUSION = before


class Island:
    """`fn(*tensors, **static)`; its JVP by `rule(*primals, *tangents, **static) -> (out, out_tangent)` compiled,
    inside sCM's JVP pass when `fuse` (a tangent of None stands for zero)."""

    def __init__(self, fn, rule):
        self.fn, self.rule = fn, rule
        self._compiled = None          # built at the first fused call: nothing is compiled in runs that never fuse

    def __call__(self, *args: torch.Tensor | None, fuse: bool = False, **static):
        if (not fuse or not _FUSION or torch.compiler.is_compiling() or torch.is_grad_enabled()
                or getattr(fwAD, "_current_level", 0) < 0):
            return self.fn(*args, **static)
        pairs = [(None, None) if a is None else fwAD.unpack_dual(a) for a in args]
        if all(tangent is None for _, tangent in pairs):
            return self.fn(*args, **static)
        if self._compiled is None:
            self._compiled = torch.compile(self.rule)
        out, out_t = self._compiled(*(p for p, _ in pairs), *(t for _, t in pairs), **static)
        return fwAD.make_dual(out, out_t)


def _or_zero(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t


def _layer_norm_tangent(xf: torch.Tensor, x_t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) of y = (x − μ)/σ over the last dim, σ² = var + eps, in xf's dtype: ẏ = (ẋc − y·mean(y·ẋc)) / σ with
    ẋc = ẋ − mean(ẋ)."""
    xc = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    xt_c = x_t - x_t.mean(-1, keepdim=True)
    return y, (xt_c - y * (y * xt_c).mean(-1, keepdim=True)) * rstd


# ----------------------------------------------------------------------------------------------------------
# adaLN: LayerNorm without affine, then (1 + scale) and shift, in the modulation's dtype (≥ fp32)

def _modulated_norm(x, scale, shift, *, eps: float):
    dt = scale.dtype
    return (fp32_layer_norm(x.to(dt), None, None, eps) * (1 + scale) + shift).to(x.dtype)


def _modulated_norm_rule(x, scale, shift, x_t, scale_t, shift_t, *, eps: float):
    dt = scale.dtype
    y, y_t = _layer_norm_tangent(x.to(dt), _or_zero(x_t, x).to(dt), eps)
    out_t = y_t * (1 + scale)
    if scale_t is not None:
        out_t = out_t + y * scale_t
    if shift_t is not None:
        out_t = out_t + shift_t
    return _modulated_norm(x, scale, shift, eps=eps), out_t.to(x.dtype)


modulated_norm = Island(_modulated_norm, _modulated_norm_rule)


# ----------------------------------------------------------------------------------------------------------
# Gated residual: x + branch · gate in the gate's dtype (branch promoted by the product), cast back to x's

def _gated_residual(x, branch, gate):
    # `branch * gate`, not `branch.to(dt) * gate`: the same values, but autograd then keeps the bf16 branch for
    # the backward, not an fp32 copy (the activation bytes rcm_core.run.plan counts)
    return (x.to(gate.dtype) + branch * gate).to(x.dtype)


def _gated_residual_rule(x, branch, gate, x_t, branch_t, gate_t):
    dt = gate.dtype
    out_t = _or_zero(x_t, x).to(dt)
    if branch_t is not None:
        out_t = out_t + branch_t.to(dt) * gate
    if gate_t is not None:
        out_t = out_t + branch.to(dt) * gate_t
    return _gated_residual(x, branch, gate), out_t.to(x.dtype)


gated_residual = Island(_gated_residual, _gated_residual_rule)


# ----------------------------------------------------------------------------------------------------------
# LayerNorm with affine (weight, bias) in ≥ fp32 (Wan's norm2); the parameters carry no tangent in sCM's pass

def _affine_norm(x, weight, bias, *, eps: float):
    return fp32_layer_norm(x, weight, bias, eps)


def _affine_norm_rule(x, weight, bias, x_t, weight_t, bias_t, *, eps: float):
    if weight_t is not None or bias_t is not None:
        raise ValueError("affine_norm's rule takes tangents of x only (sCM's pass differentiates no parameter)")
    dt = compute_dtype(x.dtype)
    _, y_t = _layer_norm_tangent(x.to(dt), _or_zero(x_t, x).to(dt), eps)
    return _affine_norm(x, weight, bias, eps=eps), (y_t * weight.to(dt)).to(x.dtype)


affine_norm = Island(_affine_norm, _affine_norm_rule)


class TangentFusedLayerNorm(FP32LayerNorm):
    """FP32LayerNorm (with affine) whose JVP is `affine_norm`'s rule when `compile_mode` is "blocks". A module,
    not a function call in the block: FSDP2 makes Wan's fp32 norm2 its own unit (rcm_core.parallel.sharding),
    whose weights are gathered by the module's own forward hooks."""

    compile_mode = "none"          # model.compile, set by networks.dit.set_compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine_norm(x, self.weight, self.bias, eps=self.eps, fuse=self.compile_mode == "blocks")


# ----------------------------------------------------------------------------------------------------------
# QK: RMSNorm across heads (gain in x's dtype, as Wan), split into heads, RoPE in ≥ fp32 (self-attention only)

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)          # [B, L, D] → [B, heads, L, hd]


def _qk_heads(x, weight, cos=None, sin=None, *, eps: float, heads: int):
    y = _heads(rms_norm(x, weight, eps), heads)
    return y if cos is None else apply_rope(y, cos, sin)


def _qk_heads_rule(x, weight, cos, sin, x_t, weight_t, cos_t, sin_t, *, eps: float, heads: int):
    if weight_t is not None or cos_t is not None or sin_t is not None:
        raise ValueError("qk_heads' rule takes tangents of x only (the gain and RoPE's angles carry none)")
    dt = compute_dtype(x.dtype)
    xf, xt = x.to(dt), _or_zero(x_t, x).to(dt)
    r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = xf * r
    y_t = _heads(((xt - y * (y * xt).mean(-1, keepdim=True)) * r).to(x.dtype) * weight.to(x.dtype), heads)
    return _qk_heads(x, weight, cos, sin, eps=eps, heads=heads), (y_t if cos is None else apply_rope(y_t, cos, sin))


qk_heads = Island(_qk_heads, _qk_heads_rule)


# ----------------------------------------------------------------------------------------------------------
# tanh-GELU of the feed-forward's hidden layer

_GELU_C = 0.7978845608028654           # √(2/π)


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def _gelu_rule(x, x_t):
    """d/dx ½x(1 + tanh u), u = c(x + 0.044715x³): ½(1 + tanh u) + ½x(1 − tanh²u)·c(1 + 3·0.044715x²), in ≥ fp32."""
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    th = torch.tanh(_GELU_C * (xf + 0.044715 * xf.pow(3)))
    slope = 0.5 * (1 + th) + 0.5 * xf * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * xf * xf)
    return _gelu(x), (slope * _or_zero(x_t, x).to(dt)).to(x.dtype)


gelu_tanh = Island(_gelu, _gelu_rule)
