"""The fused JVP islands of networks/tangent_islands.py (issue 28, lever 4): each hand-written tangent rule equals
forward-mode AD through the island's own function in float64. (A DiT's JVP pass under `model.compile=blocks`, its
islands compiled by inductor, against the eager one: tests/test_speed_levers.py's compiled-blocks test.)

Bars: in float64 a rule and autograd's forward-mode AD compute the same derivative by different op orders, so they
differ by rounding alone: the worst over seeds 0–9 and every case below was 1.03e-15 relative (GELU; the others
2.2e-16 to 4.7e-16; 2026-12-03); the bar 1e-12 is ~1,000× that and far below what a wrong term gives (a
modulated-norm rule without LayerNorm's y·mean(y·ẋ) term: 0.137 at seed 0, test_a_wrong_rule_is_caught).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from rcm_core.networks import tangent_islands as ti
from rcm_core.networks.layers import rope_angles

BAR = 1e-12


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _cases(gen: torch.Generator):
    """(island, primal args, tangents (None: no tangent), static) shaped as in a Wan block: x [B, L, D]."""
    B, L, D, H = 2, 12, 24, 3
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    ang = rope_angles((2, 2, 3), D // H, device=None)
    cos, sin = ang.cos(), ang.sin()
    return [
        (ti.modulated_norm, (r(B, L, D), r(B, 1, D), r(B, 1, D)), (r(B, L, D), r(B, 1, D), r(B, 1, D)),
         {"eps": 1e-6}),
        (ti.modulated_norm, (r(B, 3, 4, D), r(B, 3, 1, D), r(B, 3, 1, D)), (r(B, 3, 4, D), None, r(B, 3, 1, D)),
         {"eps": 1e-6}),                               # per-frame modulation view, one input without tangent
        (ti.gated_residual, (r(B, L, D), r(B, L, D), r(B, 1, D)), (r(B, L, D), r(B, L, D), r(B, 1, D)), {}),
        (ti.gated_residual, (r(B, L, D), r(B, L, D), r(B, 1, D)), (r(B, L, D), None, r(B, 1, D)), {}),
        (ti.affine_norm, (r(B, L, D), r(D), r(D)), (r(B, L, D), None, None), {"eps": 1e-6}),
        (ti.qk_heads, (r(B, L, D), r(D), cos, sin), (r(B, L, D), None, None, None), {"eps": 1e-6, "heads": H}),
        (ti.qk_heads, (r(B, L, D), r(D), None, None), (r(B, L, D), None, None, None), {"eps": 1e-6, "heads": H}),
        (ti.gelu_tanh, (r(B, L, D) * 3,), (r(B, L, D),), {}),
    ]


def _autograd(island, args, tangents, static):
    """The reference: forward-mode AD through the island's own function on dual tensors."""
    with fwAD.dual_level():
        duals = [a if t is None or a is None else fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        out = island.fn(*duals, **static)
        return fwAD.unpack_dual(out).primal, fwAD.unpack_dual(out).tangent


@pytest.mark.parametrize("seed", range(3))
def test_each_rule_equals_forward_ad_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    for island, args, tangents, static in _cases(gen):
        ref, ref_t = _autograd(island, args, tangents, static)
        out, out_t = island.rule(*args, *tangents, **static)
        name = island.fn.__name__
        assert torch.equal(out, ref), name                               # the primal is fn itself
        assert _rel(out_t, ref_t) < BAR, (name, _rel(out_t, ref_t))


def test_a_wrong_rule_is_caught():
    """The bar catches a rule missing one term (here LayerNorm's y·mean(y·ẋ)): the check above is not vacuous."""
    def wrong(x, scale, shift, x_t, scale_t, shift_t, *, eps):
        xc = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        y_t = (x_t - x_t.mean(-1, keepdim=True)) * rstd
        return ti._modulated_norm(x, scale, shift, eps=eps), y_t * (1 + scale) + xc * rstd * scale_t + shift_t
    gen = torch.Generator().manual_seed(0)
    island, args, tangents, static = _cases(gen)[0]
    _, ref_t = _autograd(island, args, tangents, static)
    assert _rel(wrong(*args, *tangents, **static)[1], ref_t) > 1e-2


def test_islands_are_the_plain_functions_outside_a_fused_jvp():
    """No tangent, gradients on, `fuse=False` or no dual level: `fn` itself, bit for bit, and nothing compiled."""
    gen = torch.Generator().manual_seed(1)
    island, args, tangents, static = _cases(gen)[0]
    before = island._compiled
    ref = island.fn(*args, **static)
    ref_t = _autograd(island, args, tangents, static)[1]
    assert torch.equal(island(*args, fuse=True, **static), ref)                   # no dual level open
    with fwAD.dual_level():
        assert torch.equal(island(*args, fuse=True, **static), ref)               # a level, no dual input
        dual = [fwAD.make_dual(a, t) for a, t in zip(args, tangents)]
        out = island(*dual, fuse=False, **static)                                 # asked not to fuse
        assert torch.equal(fwAD.unpack_dual(out).tangent, ref_t)
        with torch.enable_grad():
            island(*dual, fuse=True, **static)                                    # a pass that records gradients
    assert island._compiled is before
