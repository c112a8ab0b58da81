"""Fused attention forward+JVP kernel tests, flash-attention style.

CPU (CI): `pytest tests/test_kernels.py` runs the Triton kernels under the interpreter (TRITON_INTERPRET=1 is
set per test with monkeypatch; kernels read it at call time, so other tests in the process are unaffected).
GPU: `pytest -m gpu tests/test_kernels.py` runs the same checks compiled on CUDA, plus larger shapes.

Rule: every output is compared in float64 with the exact result (torch.func.jvp / autograd over plain softmax
attention, `kernels.reference`) on the inputs as the kernel sees them (rounded to its dtype), and its max error
must stay below BARS × u·max|reference|, u the dtype's unit roundoff (fp32 2^-24, fp16 2^-11, bf16 2^-8; lse and
lse_t in fp32's, as the kernel accumulates and returns them in fp32). Rounding the exact output to bf16 alone costs
up to 1 u·max|ref|; the bars say how many such roundings the kernel may lose on top. Each case draws its inputs
from its own fixed seed (the same on every run), and each bar is 1.5× the worst error over many seeds of that test,
rounded up (`BARS` says how many); outputs are poisoned with NaN before every launch, so an unwritten element fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kernels
import kernels.flash_jvp as katt
from kernels.reference import attention_ref

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # interpreter log2(0) on empty rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}    # unit roundoff
U_LSE = 2.0**-24                                   # lse, lse_t: accumulated and returned in fp32 for every dtype
# Max error / (u·max|ref|), per test, output and dtype: 1.5× the worst over the seeds measured, rounded up to two
# digits (Triton interpreter on CPU, float64 reference on the rounded inputs). "jvp" and "bwd": seeds 0-199 of every
# case, 600 and 400 draws per output and dtype (2026-12-03, `experiments/bench/kernel_bar_draws.py --seeds 0-199`;
# every error in docs/results/kernels/draws_cpu_interpreter.json); "fwd" and "merge": seeds 0-12 (2026-12-02, the
# worst values in the commit message that set them). Rounding the exact result to the dtype alone is 0.5; fp16/bf16
# outputs land at 1-3.6, fp32 ones at 20-29 (sums over ~300 keys in fp32), lse_t at 12-23.
BARS = {
    "jvp": {"o": {torch.float32: 37, torch.float16: 1.7, torch.bfloat16: 3.8},
            "o_t": {torch.float32: 31, torch.float16: 2.6, torch.bfloat16: 5.4},
            "lse": {torch.float32: 4.6, torch.float16: 5.1, torch.bfloat16: 3.4},
            "lse_t": {torch.float32: 31, torch.float16: 36, torch.bfloat16: 19}},
    "bwd": {"o": {torch.float32: 37, torch.float16: 1.7, torch.bfloat16: 3.8},
            "dq": {torch.float32: 36, torch.float16: 2.5, torch.bfloat16: 4.7},
            "dk": {torch.float32: 44, torch.float16: 2.7, torch.bfloat16: 4.4},
            "dv": {torch.float32: 42, torch.float16: 2.1, torch.bfloat16: 4.4}},
    "fwd": {"func_o": 18, "func_o_t": 20, "dual_o_t": 13.3, "nograd_o": 11.3, "nograd_o_t": 13.3},
    "merge": {"o": {torch.float32: 25, torch.float16: 1.3},
              "o_t": {torch.float32: 19, torch.float16: 2.8},
              "lse": {torch.float32: 3.1, torch.float16: 3.1},
              "lse_t": {torch.float32: 21, torch.float16: 17},
              "o_vs_full": {torch.float32: 11.2, torch.float16: 2},
              "o_t_vs_full": {torch.float32: 9.1, torch.float16: 1.7},
              "lse_vs_full": {torch.float32: 4.5, torch.float16: 4.4},
              "lse_t_vs_full": {torch.float32: 5.7, torch.float16: 6.4}},
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def triton_mode(request, monkeypatch):
    """'cpu' = interpreter on CPU tensors; 'cuda' = compiled kernels. Outputs are NaN-poisoned either way."""
    device = request.param
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(katt, "POISON_OUTPUTS", True)
    return device


def _seeded(seed: int) -> tuple[int, torch.Generator]:
    """A fixed seed per case (the same draw on every run: a failure is a regression, not a bad draw)."""
    return seed, torch.Generator().manual_seed(seed)


def _draw(shape, gen, layout: str = "contiguous") -> torch.Tensor:
    """A float64 CPU tensor of `shape` [B, H, L, D], optionally a non-contiguous view of a bigger buffer:
    'packed' = a head slice of [B, L, 3, H, D] (qkv-style), 'transposed' = D not unit-stride."""
    B, H, L, D = shape
    if layout == "packed":
        return torch.randn(B, L, 3, H, D, generator=gen, dtype=torch.float64)[:, :, 1].permute(0, 2, 1, 3)
    if layout == "transposed":
        return torch.randn(B, H, D, L, generator=gen, dtype=torch.float64).transpose(-1, -2)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _cast(x: torch.Tensor, dtype, device) -> torch.Tensor:
    # Same strides as x (gaps included), so non-contiguous layouts reach the kernel as such.
    y = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device)
    return y.copy_(x)


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double().cpu() - ref.double().cpu()).abs().max().item()


def _rounded(x: torch.Tensor, dtype) -> torch.Tensor:
    """x as the kernel sees it (rounded to its dtype), back in float64 for the exact reference."""
    return x.to(dtype).double()


def _check(name: str, ours: torch.Tensor, ref: torch.Tensor, units: float, u: float, seed: int):
    """max|ours − ref| ≤ units · u · max|ref| (the bar in rounding units of the kernel's dtype)."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (seed {seed})"
    err, bar = _err(ours, ref), units * u * ref.double().abs().max().item()
    assert err <= bar, f"{name}: kernel err {err:.3g} > {units:g} u·max|ref| = {bar:.3g} (seed {seed})"


# Absolute floors of the block-causal tests' rule (flash-attention's): errors below them are rounding noise.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _check_vs_torch(name: str, ours: torch.Tensor, torch_same: torch.Tensor, ref: torch.Tensor, dtype, seed: int):
    """flash-attention's rule, used by the block-causal tests (their bars were measured against it): max|ours − ref|
    ≤ 2 × the same-dtype PyTorch computation's error + FLOOR[dtype]."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (seed {seed})"
    e_ours, e_pt = _err(ours, ref), _err(torch_same, ref)
    assert e_ours <= 2 * e_pt + FLOOR[dtype], f"{name}: kernel err {e_ours:.3g} > 2×torch {e_pt:.3g} + floor (seed {seed})"


def _jvp_torch(q, k, v, qt, kt, vt, mask, scale=None, chunks=None):
    """The reference: torch.func.jvp over plain softmax attention (any dtype, CPU or CUDA)."""
    f = lambda q_, k_, v_: attention_ref(q_, k_, v_, scale=scale, key_padding_mask=mask, chunk_sizes=chunks)
    o, ot = torch.func.jvp(f, (q, k, v), (qt, kt, vt))
    # Softmax over no valid key is NaN and so is its forward-mode tangent; the contract (and the twin's
    # primal) is 0 on such rows, so the reference is 0 there too.
    return o, torch.nan_to_num(ot, nan=0.0)


# (B, H, Lq, Lk, D, layout, masked): ragged Lq≠Lk with a padding mask that fully masks batch 1 and
# non-contiguous views; an even cross-attention shape at D=128; a non-power-of-two head dim.
CASES = [
    (2, 1, 200, 333, 64, "packed", True),
    (1, 2, 128, 64, 128, "contiguous", False),
    (1, 1, 96, 150, 80, "transposed", True),
]


def _make_case(case, gen):
    B, H, LQ, LK, D, layout, masked = case
    q, qt = _draw((B, H, LQ, D), gen, layout), _draw((B, H, LQ, D), gen)
    k, kt = _draw((B, H, LK, D), gen, layout), _draw((B, H, LK, D), gen, layout)
    v, vt = _draw((B, H, LK, D), gen, layout), _draw((B, H, LK, D), gen)
    mask = None
    if masked:
        mask = torch.rand(B, LK, generator=gen) > 0.3
        if B > 1:
            mask[1] = False                       # a batch item with no valid key: rows must be 0, not NaN
    return (q, k, v, qt, kt, vt), mask


def jvp_draw(case, dtype, device: str, seed: int) -> dict:
    """One draw of the JVP test at `seed`: {output: (kernel's, float64 reference, u)} for o, o_t, lse, lse_t, plus
    the lse -inf pattern's agreement ("lse_pattern") and the rows of a fully masked batch item ("masked_rows").
    The test checks one fixed seed per case; `experiments/bench/kernel_bar_draws.py` runs many to place the bars."""
    gen = torch.Generator().manual_seed(seed)
    xs64, mask = _make_case(case, gen)
    mask_dev = None if mask is None else mask.to(device)
    exact = [_rounded(x, dtype) for x in xs64]
    o_ref, ot_ref = _jvp_torch(*exact, mask)
    _, _, lse_ref, lset_ref = kernels.attention_jvp_lse_ref(*exact, key_padding_mask=mask)
    xs = [_cast(x, dtype, device) for x in xs64]
    o, ot, lse, lse_t = kernels.attention_jvp(*xs, key_padding_mask=mask_dev, return_lse=True)
    assert o.dtype == ot.dtype == dtype and o.shape == xs[0].shape
    fin = torch.isfinite(lse_ref)
    out = {"o": (o, o_ref, U[dtype]), "o_t": (ot, ot_ref, U[dtype]), "lse": (lse.cpu()[fin], lse_ref[fin], U_LSE),
           "lse_t": (lse_t, lset_ref, U_LSE), "lse_pattern": torch.equal(torch.isfinite(lse.cpu()), fin)}
    if mask is not None and case[0] > 1:
        out["masked_rows"] = (o[1], ot[1])
    return out


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}x{c[3]}d{c[4]}-{c[5]}")
def test_attention_jvp_matches_float64(triton_mode, dtype, case):
    """o, o_t, lse and lse_t against float64 (BARS["jvp"]). lse_t's bar is ~1e-6 absolute: a kernel returning
    lse_t ≡ 0 (|lse_t| ≈ 0.5–3 here) fails it by five orders of magnitude."""
    seed = CASES.index(case)
    draw = jvp_draw(case, dtype, triton_mode, seed)
    for name in ("o", "o_t", "lse", "lse_t"):
        ours, ref, u = draw[name]
        _check(name, ours, ref, BARS["jvp"][name][dtype], u, seed)
    assert draw["lse_pattern"], f"lse -inf pattern (seed {seed})"
    if "masked_rows" in draw:
        assert all((t == 0).all() for t in draw["masked_rows"]), "fully masked rows must be exactly 0"


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jvp_with_scores_rising_along_the_keys_matches_float64(triton_mode, dtype):
    """The online softmax rescales its running sums (l, acc, and the tangent's r, acc_t) by 2^(m_old − m_new)
    whenever a row's max rises. Keys with a ramp along q's constant direction make every row's max rise ~5 (exp2
    units) per 64-key tile, so the rescale does real work on every tile; random inputs rescale mostly in the first
    tiles. o, o_t by the file's block-causal rule (≤ 2× the same-dtype PyTorch error + FLOOR; the logits reach ~17,
    so the random-input BARS do not apply): over seeds 400-529 the kernel's error was at most 0.92 of that bound.
    lse, lse_t ≤ 14 u·max|ref| in fp32 units: 1.5× the worst over the same seeds (9.2, fp16 lse_t). Broken variants
    caught (2026-12-04, every dtype): acc_t not rescaled (o_t err 29 against 0.01), l not rescaled (o err 1.2).
    Written for the lazy-rescaling experiment (docs/BENCHMARKS.md, issue 28 lever 5; measured slower, not kept)."""
    seed, gen = _seeded(411)
    B, H, LQ, LK, D = 1, 2, 128, 320, 64
    q, qt = _draw((B, H, LQ, D), gen), _draw((B, H, LQ, D), gen)
    k, kt, v, vt = (_draw((B, H, LK, D), gen) for _ in range(4))
    q[..., 0] = 2.0
    k[..., 0] += 0.22 * torch.arange(LK, dtype=torch.float64)    # Δ rowmax ≈ 2·0.22·64/8·log2(e) ≈ 5 per tile
    xs64 = [_rounded(x, dtype) for x in (q, k, v, qt, kt, vt)]
    o_ref, ot_ref = _jvp_torch(*xs64, None)
    xs = [_cast(x, dtype, triton_mode) for x in xs64]
    o_pt, ot_pt = _jvp_torch(*xs, None)
    o, ot, lse, lse_t = kernels.attention_jvp(*xs, return_lse=True)
    _check_vs_torch("o", o, o_pt, o_ref, dtype, seed)
    _check_vs_torch("o_t", ot, ot_pt, ot_ref, dtype, seed)
    _, _, lse_ref, lset_ref = kernels.attention_jvp_lse_ref(*xs64)
    for name, ours, ref in (("lse", lse, lse_ref), ("lse_t", lse_t, lset_ref)):
        _check(name, ours, ref, 14, U_LSE, seed)


def _loss_grads(fn, xs, w):
    xs = [x.detach().requires_grad_(True) for x in xs]
    o = fn(*xs)
    (o.double() * w).sum().backward()
    return o.detach(), [x.grad for x in xs]


def backward_draw(case, dtype, device: str, seed: int) -> dict:
    """One draw of the backward test at `seed`: {output: (kernel's, float64 reference, u)} for o, dq, dk, dv (dq, dk,
    dv on the batch items with a valid key), plus the gradients of a fully masked batch item ("masked_grads")."""
    gen = torch.Generator().manual_seed(seed)
    (q, k, v, *_), mask = _make_case(case, gen)
    mask_dev = None if mask is None else mask.to(device)
    w = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ref_fn = lambda m: (lambda q_, k_, v_: attention_ref(q_, k_, v_, key_padding_mask=m))
    # The kernel's cotangent is w rounded to its dtype (the gradient of o.double()·w reaching o): so is the ref's.
    o_ref, g_ref = _loss_grads(ref_fn(mask), [_rounded(x, dtype) for x in (q, k, v)], _rounded(w, dtype))
    xs = [_cast(x, dtype, device) for x in (q, k, v)]
    o, g = _loss_grads(lambda q_, k_, v_: kernels.attention(q_, k_, v_, key_padding_mask=mask_dev), xs,
                       w.to(device))
    out = {"o": (o, o_ref, U[dtype])}
    keep = slice(0, 1) if (mask is not None and q.shape[0] > 1) else slice(None)  # ref grads are NaN on batch 1
    for name, a, c in zip(("dq", "dk", "dv"), g, g_ref):
        assert a.shape == c.shape and a.dtype == dtype
        out[name] = (a[keep], c[keep], U[dtype])
    if keep != slice(None):
        out["masked_grads"] = tuple(a[1] for a in g)
    return out


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"{c[2]}x{c[3]}d{c[4]}-{c[5]}")
def test_attention_backward_matches_float64(triton_mode, dtype, case):
    """o, dq, dk, dv against the exact float64 gradient of Σ w·o at the rounded inputs and cotangent, in units of
    bf16's (fp16's, fp32's) own rounding of that gradient (BARS["bwd"])."""
    seed = CASES.index(case)
    draw = backward_draw(case, dtype, triton_mode, seed)
    for name in ("o", "dq", "dk", "dv"):
        ours, ref, u = draw[name]
        _check(name, ours, ref, BARS["bwd"][name][dtype], u, seed)
    for name, grad in zip(("dq", "dk", "dv"), draw.get("masked_grads", ())):
        assert (grad == 0).all(), f"{name}: a batch with no valid key has zero gradient"


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
def test_forward_mode_through_attention(triton_mode):
    """torch.func.jvp and forward_ad through a small projection+attention function equal the float64 JVP at the
    fp32-rounded inputs (BARS["fwd"], in fp32 units of max|ref|)."""
    seed, gen = _seeded(0)
    B, L, C, H = 2, 70, 64, 2
    dev, dt = triton_mode, torch.float32
    bars, u = BARS["fwd"], U[dt]
    x, xt = (torch.randn(B, L, C, generator=gen, dtype=torch.float64) for _ in range(2))
    wqkv = torch.randn(3 * C, C, generator=gen, dtype=torch.float64) / C**0.5
    mask = torch.rand(B, L, generator=gen) > 0.2

    def block(x_, w_, attn, m):
        qkv = (x_ @ w_.T).view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4)   # non-contiguous q, k, v views
        return attn(qkv[0], qkv[1], qkv[2], key_padding_mask=m).transpose(1, 2).reshape(B, L, C)

    o_ref, ot_ref = torch.func.jvp(lambda x_: block(x_, _rounded(wqkv, dt), attention_ref, mask),
                                   (_rounded(x, dt),), (_rounded(xt, dt),))
    args = {"w_": wqkv.to(dev, dt), "attn": kernels.attention, "m": mask.to(dev)}
    o, ot = torch.func.jvp(lambda x_: block(x_, **args), (x.to(dev, dt),), (xt.to(dev, dt),))
    _check("torch.func.jvp o", o, o_ref, bars["func_o"], u, seed)
    _check("torch.func.jvp o_t", ot, ot_ref, bars["func_o_t"], u, seed)
    # Only q carries a tangent (k, v tangents are None inside the Function's jvp).
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    qt = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    o_ref, ot_ref = torch.func.jvp(lambda q_: attention_ref(q_, _rounded(k, dt), _rounded(v, dt)),
                                   (_rounded(q, dt),), (_rounded(qt, dt),))
    kd, vd = k.to(dev, dt), v.to(dev, dt)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = kernels.attention(fwAD.make_dual(q.to(dev, dt), qt.to(dev, dt)), kd, vd)
        ot = fwAD.unpack_dual(out).tangent
    _check("forward_ad o_t", ot, ot_ref, bars["dual_o_t"], u, seed)
    with torch.no_grad(), fwAD.dual_level():    # no grad recorded: the fused single pass, a dual output
        o, ot = fwAD.unpack_dual(kernels.attention(fwAD.make_dual(q.to(dev, dt), qt.to(dev, dt)), kd, vd))
    _check("forward_ad under no_grad o", o, o_ref, bars["nograd_o"], u, seed)
    _check("forward_ad under no_grad o_t", ot, ot_ref, bars["nograd_o_t"], u, seed)


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merge_partials_over_key_blocks(triton_mode, dtype):
    """Ring-attention style: two key blocks computed separately, merged via (lse, lse_t), equal the full pass and
    the float64 result (BARS["merge"]; o, o_t in the dtype's units, lse, lse_t in fp32's)."""
    seed, gen = _seeded(0)
    B, H, LQ, LK, D, cut = 2, 2, 100, 230, 64, 130
    xs64 = [torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for L in (LQ, LK, LK, LQ, LK, LK)]
    mask = torch.rand(B, LK, generator=gen) > 0.3
    mask[0, :cut] = False                              # batch 0: first block fully masked (lse = -inf there)
    mask[1] = False                                    # batch 1: every block fully masked
    o_ref, ot_ref, lse_ref, lset_ref = kernels.attention_jvp_lse_ref(*[_rounded(x, dtype) for x in xs64],
                                                                     key_padding_mask=mask)
    q, k, v, qt, kt, vt = (x.to(triton_mode, dtype) for x in xs64)
    m = mask.to(triton_mode)
    blocks = [slice(0, cut), slice(cut, LK)]
    parts = [kernels.attention_jvp(q, k[:, :, s], v[:, :, s], qt, kt[:, :, s], vt[:, :, s],
                                   key_padding_mask=m[:, s], return_lse=True) for s in blocks]
    merged = kernels.merge_attention_partials(parts)
    full = kernels.attention_jvp(q, k, v, qt, kt, vt, key_padding_mask=m, return_lse=True)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(merged.lse.cpu()), fin) and torch.equal(torch.isfinite(full[2].cpu()), fin)
    bars, u = BARS["merge"], U[dtype]
    for name, a, b, unit in (("o", merged.o, full[0], u), ("o_t", merged.o_t, full[1], u),
                             ("lse", merged.lse.cpu()[fin], full[2].cpu()[fin], U_LSE),
                             ("lse_t", merged.lse_t, full[3], U_LSE)):
        _check(f"merged {name} vs the full pass", a, b, bars[f"{name}_vs_full"][dtype], unit, seed)
    for name, a, ref, unit in (("o", merged.o, o_ref, u), ("o_t", merged.o_t, ot_ref, u),
                               ("lse", merged.lse.cpu()[fin], lse_ref[fin], U_LSE), ("lse_t", merged.lse_t, lset_ref, U_LSE)):
        _check(f"merged {name} vs float64", a, ref, bars[name][dtype], unit, seed)


def test_merge_partials_twin_exact():
    """The merge formula itself, on the float64 twin (no Triton): split into 3 key blocks."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 2, L, 16, generator=gen, dtype=torch.float64) for L in (7, 30, 30, 7, 30, 30)]
    q, k, v, qt, kt, vt = xs
    parts = [kernels.attention_jvp_lse_ref(q, k[:, :, s], v[:, :, s], qt, kt[:, :, s], vt[:, :, s])
             for s in (slice(0, 5), slice(5, 19), slice(19, 30))]
    merged = kernels.merge_attention_partials(parts)
    o_ref, ot_ref = _jvp_torch(q, k, v, qt, kt, vt, None)
    assert _err(merged.o, o_ref) < 1e-12 and _err(merged.o_t, ot_ref) < 1e-12


@pytest.mark.parametrize("triton_mode", ["cpu"], indirect=True)
def test_gradient_through_tangent_is_refused(triton_mode):
    x = [torch.randn(1, 1, 16, 32, requires_grad=True) for _ in range(6)]
    o, ot = kernels.attention_jvp(*x)
    o.sum().backward()                                   # the primal path has gradients
    assert x[0].grad is not None and torch.isfinite(x[0].grad).all()
    _, ot = kernels.attention_jvp(*x)
    with pytest.raises(NotImplementedError, match="semigradient"):
        ot.sum().backward()


def test_dispatch_uses_twin_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    assert not kernels.use_triton(q)
    assert torch.equal(kernels.attention(q, k, v), attention_ref(q, k, v))


def test_cuda_without_triton_warns_what_is_lost(monkeypatch):
    """On CUDA without Triton the twin runs, which materialises L×L: a warning names that and the fix. A CPU tensor
    takes the twin silently (that is its place). The CUDA tensor is stood in by its `is_cuda` flag, all that the
    dispatch reads, so this runs on the CPU-only CI."""
    from types import SimpleNamespace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.warns(RuntimeWarning, match=r"L×L score matrix.*pip install triton"):
        assert not kernels.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.use_triton(torch.zeros(1))


def test_float64_takes_the_twin_on_cuda_and_under_the_interpreter(monkeypatch):
    """float64 is the reference precision (float64 networks on CUDA check the fast paths; the evaluation's
    classifier trains in it): the Triton kernels have no float64 path, so such calls run the twin instead of
    being refused (two GPU tests hit the refusal on 2026-12-02). Other dtypes keep the kernel."""
    from types import SimpleNamespace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float64))
    assert kernels.use_triton(SimpleNamespace(is_cuda=True, dtype=torch.float32))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    assert not kernels.use_triton(q) and kernels.use_triton(q.float())
    assert torch.equal(kernels.attention(q, k, v), attention_ref(q, k, v))


# ----------------------------------------------------------------------------------------- GPU only

GPU_SHAPES = [(2, 3, 1000, 1333, 128), (1, 2, 515, 999, 64), (1, 2, 256, 300, 256), (1, 4, 2048, 2048, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_large_shapes(dtype, shape, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(katt, "POISON_OUTPUTS", True)
    seed, gen = _seeded(GPU_SHAPES.index(shape))
    B, H, LQ, LK, D = shape
    xs64 = [torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).cuda() for L in (LQ, LK, LK, LQ, LK, LK)]
    mask = (torch.rand(B, LK, generator=gen) > 0.1).cuda()
    w = torch.randn(xs64[0].shape, generator=gen, dtype=torch.float64).cuda()
    exact = [_rounded(x, dtype) for x in xs64]
    o_ref, ot_ref = _jvp_torch(*exact, mask)
    xs = [x.to(dtype) for x in xs64]
    o, ot = kernels.attention_jvp(*xs, key_padding_mask=mask)
    _check("o", o, o_ref, BARS["jvp"]["o"][dtype], U[dtype], seed)
    _check("o_t", ot, ot_ref, BARS["jvp"]["o_t"][dtype], U[dtype], seed)
    ref_fn = lambda q_, k_, v_: attention_ref(q_, k_, v_, key_padding_mask=mask)
    _, g_ref = _loss_grads(ref_fn, exact[:3], _rounded(w, dtype))
    _, g = _loss_grads(lambda q_, k_, v_: kernels.attention(q_, k_, v_, key_padding_mask=mask), xs[:3], w)
    for name, a, c in zip(("dq", "dk", "dv"), g, g_ref):
        _check(name, a, c, BARS["bwd"][name][dtype], U[dtype], seed)


@pytest.mark.gpu
def test_gpu_lse_matches_torch_flash(monkeypatch):
    """Our lse equals the logsumexp that torch's flash forward returns (so the FA2 backward could reuse it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
    _, _, lse, _ = kernels.attention_jvp(q, k, v, q, k, v, return_lse=True)
    assert _err(lse, out[1].float()) < 1e-3


def test_jvp_through_two_block_dit_matches_twin(monkeypatch):
    """`torch.func.jvp` through rcm_core's DiT (self- and cross-attention via kernels.attention): the Triton
    kernel under the interpreter gives the same primal and tangent as the PyTorch twin."""
    from rcm_core.config import ModelCfg
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.losses import jvp
    from rcm_core.networks import build_network

    torch.manual_seed(0)
    net = build_network(ModelCfg(kind="dit", in_channels=4, dim=128, ffn_dim=256, num_heads=2, num_layers=2,
                                 text_dim=32, num_classes=3, label_tokens=4))
    for p in net.parameters():                       # leave adaLN-zero's identity start: a real function
        torch.nn.init.normal_(p, std=0.05)
    den = TrigFlowDenoiser(net, "rf_velocity")
    x = torch.randn(2, 4, 2, 8, 8)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    x_dot, t_dot = torch.randn_like(x), torch.tensor([0.3, 0.2], dtype=torch.float64)
    cond = torch.tensor([0, 2])

    def run():
        return torch.func.jvp(lambda a, b: den.F(a, b, cond), (x, t), (x_dot, t_dot))

    def run_dual():      # the training path: rcm_core.method.losses.jvp, dual tensors, the fused attention pass
        return jvp(lambda a, b: den.F(a, b, cond), (x, t), (x_dot, t_dot))

    # Kernel first, then the twin by switching dispatch off: triton 3.6's interpreter cannot be entered after
    # a torch.func.jvp has run in compiled-dispatch mode in the same process (seen here; not a product path).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    F_dual, T_dual = run_dual()
    F_kern, T_kern = run()
    monkeypatch.setattr(katt, "use_triton", lambda x: False)
    F_twin, T_twin = run()
    assert torch.isfinite(T_kern).all() and torch.isfinite(T_dual).all()
    for F_, T_, how in ((F_kern, T_kern, "torch.func.jvp"), (F_dual, T_dual, "forward_ad")):
        assert (F_ - F_twin).norm() / F_twin.norm() < 1e-5, how
        assert (T_ - T_twin).norm() / T_twin.norm() < 1e-5, how

# ------------------------------------------------------------------------- block-causal masks (issue 30)
#
# chunk_sizes: token counts of consecutive chunks of one sequence; query chunk i attends key chunks 0..i.
# The interpreter runs 64×64 tiles, so CHUNKS (L = 200) has a boundary exactly on a tile edge (64), a 1-token
# chunk, a boundary inside a tile and a ragged last tile: query tile 0 sees one full key tile and skips three,
# the others see full tiles, partially masked tiles and (tile 1) skipped ones.
CHUNKS = (64, 37, 1, 98)


def test_kernel_refuses_a_scale_it_cannot_fold(monkeypatch):
    """The forward takes the row max of the raw scores and scales it afterwards, which needs scale > 0 (and a
    masked score −∞ times 0 would be NaN): zero, negative and non-finite scales end in one ValueError naming the
    value and the fix, before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 8, 16, generator=torch.Generator().manual_seed(5))
    for bad in (0.0, -0.25, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"scale {bad}: .*positive, finite.*negate q"):
            kernels.attention(q, q, q, scale=bad)
    assert torch.isfinite(kernels.attention(q, q, q, scale=0.25)).all()


def test_chunk_sizes_are_checked():
    """A wrong sum, q/k lengths that differ, or a non-positive entry raise one ValueError naming the values,
    on the twin and on the kernel's dispatch alike (the check runs before either)."""
    q = torch.randn(1, 1, 8, 16)
    k = torch.randn(1, 1, 9, 16)
    with pytest.raises(ValueError, match=r"chunk_sizes \(3, 4\) sum to 7, but the sequence has 8 tokens"):
        kernels.attention(q, q, q, chunk_sizes=(3, 4))
    with pytest.raises(ValueError, match="Lq=8, Lk=9"):
        kernels.attention_jvp(q, k, k, q, k, k, chunk_sizes=(8,))
    with pytest.raises(ValueError, match=r"chunk_sizes \(0, 8\).*positive ints"):
        attention_ref(q, q, q, chunk_sizes=(0, 8))
    assert kernels.block_causal_mask((2, 1)).tolist() == [[True, True, False], [True, True, False],
                                                          [True, True, True]]


def test_block_causal_twin_is_attention_over_the_key_prefix():
    """Known answer for the twin, float64: chunk i's rows (o, o_t, lse, lse_t) equal unmasked attention of those
    queries over the keys of chunks 0..i, computed separately. Both sides are the same float64 sums over the same
    keys, so they agree to rounding (measured ≤ 1.8e-15 over seeds 0-19; bar 1e-12)."""
    gen = torch.Generator().manual_seed(30)
    chunks = (5, 1, 9, 3)
    q, k, v, qt, kt, vt = (torch.randn(2, 3, 18, 16, generator=gen, dtype=torch.float64) for _ in range(6))
    o, ot, lse, lse_t = kernels.attention_jvp_lse_ref(q, k, v, qt, kt, vt, chunk_sizes=chunks)
    o2, ot2 = kernels.attention_jvp(q, k, v, qt, kt, vt, chunk_sizes=chunks)
    assert torch.equal(o, o2) and torch.equal(ot, ot2)
    start = 0
    for size in chunks:
        rows, keys = slice(start, start + size), slice(0, start + size)
        want = kernels.attention_jvp_lse_ref(q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                             qt[:, :, rows], kt[:, :, keys], vt[:, :, keys])
        for got, ref in zip((o, ot, lse, lse_t), want):
            assert _err(got[:, :, rows], ref) < 1e-12
        start += size
    # forward mode through the differentiable twin equals its closed form
    _, ot_func = torch.func.jvp(lambda a, b, c: attention_ref(a, b, c, chunk_sizes=chunks), (q, k, v), (qt, kt, vt))
    assert _err(ot_func, ot) < 1e-12


def _causal_case(gen, layout: str, masked: bool, B: int = 2, H: int = 1, D: int = 64):
    L = sum(CHUNKS)
    xs = [_draw((B, H, L, D), gen, layout if i < 3 else "contiguous") for i in range(6)]
    mask = None
    if masked:
        mask = torch.rand(B, L, generator=gen) > 0.3
        mask[1] = False                            # a batch item with no valid key: rows must be 0, not NaN
    return xs, mask


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,masked,seed", [("packed", True, 301), ("contiguous", False, 302)],
                         ids=["packed-padmask", "contiguous"])
def test_block_causal_jvp_matches_float64(triton_mode, dtype, layout, masked, seed):
    """Kernel (o, o_t, lse, lse_t) with chunk_sizes against torch.func.jvp over the float64 twin, by the file's
    rule (≤ 2× the same-dtype PyTorch error + FLOOR). The bars, measured over seeds 0-19 in the interpreter (both
    layouts): the kernel's max error over PyTorch's was at most 1.78 (fp32), 1.09 (fp16), 1.36 (bf16) on o and
    o_t, so every seed passed 2× PyTorch before the floor was needed; lse bars as in the unmasked test."""
    gen = torch.Generator().manual_seed(seed)
    xs64, mask = _causal_case(gen, layout, masked)
    mask_dev = None if mask is None else mask.to(triton_mode)
    o_ref, ot_ref = _jvp_torch(*xs64, mask, chunks=CHUNKS)
    xs = [_cast(x, dtype, triton_mode) for x in xs64]
    o_pt, ot_pt = _jvp_torch(*xs, mask_dev, chunks=CHUNKS)
    o, ot, lse, lse_t = kernels.attention_jvp(*xs, key_padding_mask=mask_dev, chunk_sizes=CHUNKS, return_lse=True)
    _check_vs_torch("o", o, o_pt, o_ref, dtype, seed)
    _check_vs_torch("o_t", ot, ot_pt, ot_ref, dtype, seed)
    _, _, lse_ref, lset_ref = kernels.attention_jvp_lse_ref(*xs64, key_padding_mask=mask, chunk_sizes=CHUNKS)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse.cpu()), fin), f"lse -inf pattern (seed {seed})"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _err(lse[fin], lse_ref[fin]) < tol and _err(lse_t, lset_ref) < 50 * tol, f"lse (seed {seed})"
    if masked:
        assert (o[1] == 0).all() and (ot[1] == 0).all(), "fully masked rows must be exactly 0"


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_causal_backward_matches_float64(triton_mode, dtype):
    """dq, dk, dv through kernels.attention(chunk_sizes=CHUNKS) against autograd over the float64 twin, same
    rule; packed layout with a padding mask (batch 1 fully masked: zero gradient there). Measured over seeds 0-9:
    kernel / PyTorch error ≤ 2.23 (fp32 dq: 8e-8 over 2×, floor 1e-5), ≤ 1.16 (fp16), ≤ 2.14 (bf16 dv: 7.5e-4
    over 2×, floor 1e-3, the tightest margin); the same rule and floors as the unmasked kernel's tests."""
    seed = 303
    gen = torch.Generator().manual_seed(seed)
    (q, k, v, *_), mask = _causal_case(gen, "packed", True)
    w = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ref_fn = lambda m: (lambda q_, k_, v_: attention_ref(q_, k_, v_, key_padding_mask=m, chunk_sizes=CHUNKS))
    o_ref, g_ref = _loss_grads(ref_fn(mask), (q, k, v), w)
    xs = [_cast(x, dtype, triton_mode) for x in (q, k, v)]
    mask_dev, w_dev = mask.to(triton_mode), w.to(triton_mode)
    o_pt, g_pt = _loss_grads(ref_fn(mask_dev), xs, w_dev)
    o, g = _loss_grads(lambda q_, k_, v_: kernels.attention(q_, k_, v_, key_padding_mask=mask_dev,
                                                             chunk_sizes=CHUNKS), xs, w_dev)
    _check_vs_torch("o", o, o_pt, o_ref, dtype, seed)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g_pt, g_ref):
        _check_vs_torch(name, a[:1], b[:1], c[:1], dtype, seed)     # the float64 grads are NaN on the masked batch 1
        assert (a[1] == 0).all(), f"{name}: a batch with no valid key has zero gradient"


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
def test_block_causal_forward_mode_through_attention(triton_mode):
    """torch.func.jvp (the Function's jvp rule) and forward_ad dual tensors under no_grad (the fused single pass)
    through kernels.attention(chunk_sizes=...) equal the float64 JVP; fp32, bar 1e-4 as in the unmasked test
    (torch.func.jvp measured ≤ 1.8e-6 over seeds 0-19)."""
    gen = torch.Generator().manual_seed(304)
    q, k, v, qt, kt, vt = (torch.randn(1, 2, sum(CHUNKS), 32, generator=gen, dtype=torch.float64) for _ in range(6))
    o_ref, ot_ref = torch.func.jvp(lambda a, b, c: attention_ref(a, b, c, chunk_sizes=CHUNKS), (q, k, v), (qt, kt, vt))
    dev = lambda x: x.to(triton_mode, torch.float32)
    f = lambda a, b, c: kernels.attention(a, b, c, chunk_sizes=CHUNKS)
    o, ot = torch.func.jvp(f, (dev(q), dev(k), dev(v)), (dev(qt), dev(kt), dev(vt)))
    assert _err(o, o_ref) < 1e-4 and _err(ot, ot_ref) < 1e-4, "torch.func.jvp"
    import torch.autograd.forward_ad as fwAD
    with torch.no_grad(), fwAD.dual_level():
        out = f(*(fwAD.make_dual(dev(x), dev(t)) for x, t in ((q, qt), (k, kt), (v, vt))))
        o, ot = fwAD.unpack_dual(out)
    assert _err(o, o_ref) < 1e-4 and _err(ot, ot_ref) < 1e-4, "forward_ad"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")   # the planted NaN rows, by design
@pytest.mark.parametrize("triton_mode", ["cpu"], indirect=True)
def test_block_causal_kernels_never_read_skipped_tiles(triton_mode):
    """The tile skipping itself: chunks (64, 136) on 64×64 tiles. Query tile 0 (forward, dQ) must never load key
    tiles 1-3, and the dK/dV programs of chunk 1's keys must never load query tile 0. NaN planted in a skipped
    tile would reach the outputs through 0·NaN in the tile GEMMs (a mask alone does not hide it: checked by
    making the loops read every tile, which fails here), so outputs bitwise equal to a clean run prove those
    tiles were not read."""
    chunks, cut = (64, 136), 64
    gen = torch.Generator().manual_seed(305)
    q, k, v, qt, kt, vt, do = (torch.randn(1, 1, 200, 32, generator=gen) for _ in range(7))
    nan_after = lambda x: torch.cat([x[:, :, :cut], torch.full_like(x[:, :, cut:], float("nan"))], 2)
    nan_before = lambda x: torch.cat([torch.full_like(x[:, :, :cut], float("nan")), x[:, :, cut:]], 2)
    o, ot, lse, _ = katt._fwd(q, k, v, qt, kt, vt, chunk_sizes=chunks)
    o_p, ot_p, _, _ = katt._fwd(q, *(nan_after(x) for x in (k, v)), qt, *(nan_after(x) for x in (kt, vt)),
                                chunk_sizes=chunks)
    assert torch.equal(o_p[:, :, :cut], o[:, :, :cut]) and torch.equal(ot_p[:, :, :cut], ot[:, :, :cut])
    dq, dk, dv = katt._bwd(do, q, k, v, o, lse, chunk_sizes=chunks)
    dq_p, _, _ = katt._bwd(do, q, nan_after(k), nan_after(v), o, lse, chunk_sizes=chunks)
    assert torch.equal(dq_p[:, :, :cut], dq[:, :, :cut]), "dQ of chunk 0 read keys of chunk 1"
    _, dk_p, dv_p = katt._bwd(nan_before(do), nan_before(q), k, v, o, lse, chunk_sizes=chunks)
    assert torch.equal(dk_p[:, :, cut:], dk[:, :, cut:]) and torch.equal(dv_p[:, :, cut:], dv[:, :, cut:]), \
        "dK/dV of chunk 1 read queries of chunk 0"


@pytest.mark.parametrize("chunks", [(64, 37, 1, 98), (156,) * 21, (500, 156, 1, 1000, 77)], ids=len)
@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 64), (64, 128)])
def test_block_causal_tile_plan_is_minimal(chunks, block_m, block_n):
    """The kernels' loop bounds (mirrored by kernels.bench.tile_counts) load exactly the key tiles that hold at
    least one attended pair for the query tile, and run unmasked exactly on the tiles every row sees whole
    (the ragged last key tile always takes the masked path). Counted on the [L, L] mask, exact."""
    from kernels.bench import attended_pairs, tile_counts
    mask = kernels.block_causal_mask(chunks)
    L = mask.shape[0]
    assert attended_pairs(chunks) == int(mask.sum())
    nm, nn = -(-L // block_m), -(-L // block_n)
    # Pad keys with "not attended" (a ragged key tile is then never whole) and rows with copies of the last row
    # (it sees a superset of every row's keys, so a tile's any/all over rows is unchanged).
    padded = torch.cat([mask, mask[-1:].expand(nm * block_m - L, L)], 0)
    padded = torch.nn.functional.pad(padded, (0, nn * block_n - L), value=False)
    tiles = padded.view(nm, block_m, nn, block_n)
    loaded, full = int(tiles.any(3).any(1).sum()), int(tiles.all(3).all(1).sum())
    n_full, n_partial, n_all = tile_counts(chunks, block_m, block_n)
    assert (n_full, n_full + n_partial, n_all) == (full, loaded, nm * nn)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_block_causal_bench_runs_under_the_interpreter(monkeypatch, tmp_path, capsys):
    """`python -m kernels.bench --block-causal` end to end at a tiny shape on CPU: the table, its check (the
    first chunk and the last equal the unmasked kernel there: bitwise in the interpreter's fp32) and the CSV."""
    from kernels import bench
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--block-causal", "--chunks", "2x20,1x8", "--dim", "16",
                                     "--heads", "16:1", "--dtype", "fp32"])
    monkeypatch.setattr(bench, "_timer", lambda device: (lambda fn: (fn(), 1.0)[1]))   # one call, no timing
    bench.main()
    out = capsys.readouterr().out
    assert "| fwd+JVP | 48 (3) | 1×16 |" in out and "not judged: interpreter timings" in out
    assert "max |Δ| = 0" in out
    rows = (tmp_path / "block_causal_bench.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("pass,device,L,chunks")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunks", [(1560,) * 3, (500, 156, 1, 1000, 77)], ids=["3x1560", "ragged"])
def test_gpu_block_causal(dtype, chunks, monkeypatch):
    """Compiled kernels at latent-frame-sized chunks (1,560 tokens = one Wan 480p latent frame), fwd+JVP and
    backward, by the file's rule against the float64 twin on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(katt, "POISON_OUTPUTS", True)
    seed = 306
    gen = torch.Generator().manual_seed(seed)
    xs64 = [torch.randn(1, 2, sum(chunks), 128, generator=gen, dtype=torch.float64).cuda() for _ in range(6)]
    o_ref, ot_ref = _jvp_torch(*xs64, None, chunks=chunks)
    xs = [x.to(dtype) for x in xs64]
    o_pt, ot_pt = _jvp_torch(*xs, None, chunks=chunks)
    o, ot = kernels.attention_jvp(*xs, chunk_sizes=chunks)
    _check_vs_torch("o", o, o_pt, o_ref, dtype, seed)
    _check_vs_torch("o_t", ot, ot_pt, ot_ref, dtype, seed)
    w = torch.randn(o.shape, device="cuda", dtype=torch.float64)
    ref_fn = lambda q_, k_, v_: attention_ref(q_, k_, v_, chunk_sizes=chunks)
    _, g_ref = _loss_grads(ref_fn, xs64[:3], w)
    _, g_pt = _loss_grads(ref_fn, xs[:3], w)
    _, g = _loss_grads(lambda q_, k_, v_: kernels.attention(q_, k_, v_, chunk_sizes=chunks), xs[:3], w)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g_pt, g_ref):
        _check_vs_torch(name, a, b, c, dtype, seed)


# ------------------------------------------------------------------------------------ TMA descriptor loads

def _tma_outputs(xs, mask, chunks, w):
    """fwd+JVP outputs and the gradients of Σ w·o through the kernels, in one list (CPU tensors)."""
    o, ot, lse, lse_t = kernels.attention_jvp(*xs, key_padding_mask=mask, chunk_sizes=chunks, return_lse=True)
    o2, grads = _loss_grads(lambda q_, k_, v_: kernels.attention(q_, k_, v_, key_padding_mask=mask,
                                                                  chunk_sizes=chunks), xs[:3], w)
    return [o, ot, lse, lse_t, o2, *grads]


@pytest.mark.parametrize("triton_mode", ["cpu"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + ["block-causal"], ids=str)
def test_tma_loads_equal_pointer_loads(triton_mode, dtype, case, monkeypatch):
    """The descriptor path (RCM_KERNELS_TMA, the default on sm_90+) reads the same tiles as the pointer path,
    out-of-range rows and head-dim columns as 0 on both, so under the interpreter every output of the forward+JVP
    and the backward is equal bit for bit: ragged tails, padding masks, packed and transposed layouts, a head dim
    that is not a power of two and block-causal chunks. The GPU tests run the compiled descriptor path."""
    _, gen = _seeded(400 + (CASES.index(case) if case in CASES else 9))
    if case == "block-causal":
        xs64, mask, chunks = (*_causal_case(gen, "packed", True), CHUNKS)
    else:
        xs64, mask = _make_case(case, gen)
        chunks = None
    w = torch.randn(xs64[0].shape, generator=gen, dtype=torch.float64)
    xs = [_cast(x, dtype, "cpu") for x in xs64]
    launched = [katt._unit_stride(x) for x in xs]           # as the launcher hands them over (D unit-stride)
    assert katt._use_tma(*launched) is False               # the interpreter's default ("auto") is pointers
    outs = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("RCM_KERNELS_TMA", mode)
        assert katt._use_tma(*launched) is (mode == "on")
        outs[mode] = _tma_outputs(xs, mask, chunks, w)
    for name, a, b in zip(("o", "o_t", "lse", "lse_t", "o (grad pass)", "dq", "dk", "dv"), outs["off"], outs["on"]):
        assert not a.isnan().any(), f"{name}: NaN in the pointer path's output"
        assert torch.equal(a, b), f"{name}: TMA and pointer loads differ ({_err(a.nan_to_num(), b.nan_to_num()):.3g})"


def test_tma_is_used_only_where_its_alignment_holds(monkeypatch):
    """A descriptor needs 16-byte aligned base and row strides: a bf16 head dim of 36 (72-byte rows) or a view
    starting 2 bytes into its buffer reads through pointers; a bad RCM_KERNELS_TMA value is one error naming it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RCM_KERNELS_TMA", "on")
    ok = torch.zeros(1, 2, 10, 64, dtype=torch.bfloat16)
    assert katt._use_tma(ok, ok)
    assert not katt._use_tma(ok, torch.zeros(1, 2, 10, 36, dtype=torch.bfloat16))
    assert not katt._use_tma(ok, torch.zeros(1 * 2 * 10 * 64 + 1, dtype=torch.bfloat16)[1:].view(1, 2, 10, 64))
    assert katt._use_tma(torch.zeros(1, 2, 10, 36, dtype=torch.float32))      # 144-byte rows
    monkeypatch.setenv("RCM_KERNELS_TMA", "off")
    assert not katt._use_tma(ok)
    monkeypatch.setenv("RCM_KERNELS_TMA", "yes")
    with pytest.raises(ValueError, match="RCM_KERNELS_TMA='yes': use auto, off or on"):
        katt._use_tma(ok)


def test_register_report_compiles_for_sm90_on_a_cpu(tmp_path):
    """experiments/bench/kernel_registers.py compiles a kernel for sm_90 without a GPU and reads ptxas's report.
    At the 128×64 8-warp forward+JVP tile (D=64) TMA frees the registers the pointer path spends on addresses
    (217 → 171 with triton 3.6: ptxas is deterministic, so the strict drop is the check), neither path spills, and
    the shared memory holds three stages of K, K̇, V, V̇ (3 · 4 · 64 · 64 · 2 B = 96 KiB, plus q and the barriers)."""
    pytest.importorskip("triton")
    tool = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "kernel_registers.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a compile, not the interpreter
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(tool), "--dims", "64", "--kernels", "fwd_jvp", "--tiles", "128x64x8x3",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    pointers, tma = json.loads(out.read_text())
    assert (pointers["tma"], tma["tma"]) == (False, True)
    assert 0 < tma["regs"] < pointers["regs"] <= 255
    assert pointers["spill_st"] == tma["spill_st"] == 0
    assert 96 * 1024 <= tma["shared"] <= 160 * 1024
    assert "| fwd_jvp | 64 | 128×64, 8, 3 | TMA |" in run.stdout
    bad = subprocess.run([sys.executable, str(tool), "--kernels", "fwd_jvpp"], env=env, capture_output=True, text=True,
                         check=False)
    assert bad.returncode != 0 and "--kernels ['fwd_jvpp']" in bad.stderr


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_tma_ab_bench_runs_under_the_interpreter(monkeypatch, tmp_path, capsys):
    """`python -m kernels.bench --tma-ab ROUNDS` end to end at a tiny shape on CPU (TMA forced on there): one row per
    pass, both paths' outputs equal bit for bit (max rel. diff 0: the interpreter reads the same tiles either way),
    the backward's head-dim rule lifted inside the A/B and restored after it, and the JSON in $OUT."""
    from kernels import bench
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--shapes", "16:2:40", "--tma-ab", "1"])
    monkeypatch.setattr(bench, "_timer", lambda device: (lambda fn: (fn(), 1.0)[1]))   # one call, no timing
    launches = set()
    run = katt._run
    monkeypatch.setattr(katt, "_run", lambda name, grid, *a, **kw: (launches.add((name, kw["TMA"])),
                                                                     run(name, grid, *a, **kw))[1])
    bench.main()
    assert launches == {(name, tma) for name in ("_attn_fwd_jvp", "_attn_bwd_dkdv", "_attn_bwd_dq")
                        for tma in (False, True)}                   # each kernel ran on both paths, D=16 bwd too
    out = capsys.readouterr().out
    assert "CPU, Triton interpreter" in out
    for name in ("fwd+JVP", "fwd", "bwd"):
        assert f"| {name} | 16 | 2 | 40 |" in out
    rows = json.loads((tmp_path / "kernels_tma_ab.json").read_text())
    assert [r["pass"] for r in rows] == ["fwd+JVP", "fwd", "bwd"]
    assert all(r["max_rel_diff"] == 0.0 and r["rounds"] == 1 for r in rows)
    assert katt.TMA_BWD_MIN_HEAD_DIM == 128


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("with_dlse", [False, True], ids=["no-dlse", "dlse"])
def test_backward_delta_kernel_within_the_fp32_sum_bound(triton_mode, with_dlse):
    """The backward's delta = rowsum(dO⊙O) − dlse, one Triton pass, against float64 at a ragged length and a head dim
    that is not a power of two: bf16·bf16 products are exact in fp32, so the only error is the fp32 sum of D terms
    (and the one subtraction): |err| ≤ (D + 1)·2⁻²⁴·(Σ|o·dO| + |dlse|), the textbook bound, not a measured one."""
    seed, gen = _seeded(500 + with_dlse)
    B, H, L, D = 2, 3, 77, 80
    o, do = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).to(torch.bfloat16) for _ in range(2))
    dlse = torch.randn(B, H, L, generator=gen, dtype=torch.float64).float() if with_dlse else None
    ours = katt._delta(do.to(triton_mode), o.to(triton_mode), None if dlse is None else dlse.to(triton_mode)).cpu()
    prod = o.double() * do.double()
    exact = prod.sum(-1) - (0 if dlse is None else dlse.double())
    bound = (D + 1) * 2.0**-24 * (prod.abs().sum(-1) + (0 if dlse is None else dlse.double().abs()))
    assert ours.dtype == torch.float32 and ours.shape == (B, H, L)
    assert ((ours.double() - exact).abs() <= bound).all(), f"delta outside the fp32 sum bound (seed {seed})"
    assert torch.allclose(ours, katt._delta_ref(do, o, dlse), rtol=0, atol=float(bound.max()) * 2)


RAGGED_UNMASKED = (1, 2, 77, 150, 64, "contiguous", False)


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_with_ragged_keys_and_no_mask_matches_float64(triton_mode, dtype):
    """Ragged key and query counts (150, 77: no multiple of any tile) without a padding mask: the dK/dV pass then
    applies no key mask at all (keys past the end are read as zero rows that feed only their own, unstored dK, dV
    rows). Same rule and BARS["bwd"] as the other backward cases; over seeds 0-39 every output stayed within
    the bar at 1.5× its worst error (tightest: bf16 dV, worst 2.79 units against the bar's 4.4)."""
    seed = 0
    draw = backward_draw(RAGGED_UNMASKED, dtype, triton_mode, seed)
    for name in ("o", "dq", "dk", "dv"):
        ours, ref, u = draw[name]
        _check(name, ours, ref, BARS["bwd"][name][dtype], u, seed)


# --------------------------------------------------------------------- warp-specialised backward passes

# Ragged LQ: 77 (lse and delta rows then padded to 80 for their descriptors) or 76; LK ragged (the dQ pass's WS then
# runs one loop, every key tile masked) or whole tiles (its unmasked loop).
WS_CASES = [(1, 2, 77, 150, 64, "contiguous", False), (1, 2, 76, 128, 64, "contiguous", False)]
# BARS' rule over seeds 0-39 of both cases (interpreter, 2026-12-04): two outputs' worst went past BARS["bwd"] at
# 76 × 128 (bf16 dK 3.23 → 1.5× = 4.85, fp16 dV 1.43 → 2.15; the plain path gives the same bits there), so
# these get their own bars, rounded up; every other worst stayed under BARS["bwd"] / 1.5.
WS_BARS = {**BARS["bwd"], "dk": {**BARS["bwd"]["dk"], torch.bfloat16: 4.9},
           "dv": {**BARS["bwd"]["dv"], torch.float16: 2.2}}


def test_warp_specialisation_only_where_allowed(monkeypatch):
    """The backward passes' warp-specialised tiles (WS_OK) need every load to be a descriptor load (Triton 3.6's
    Hopper pass fails to compile with any pointer load): no padding mask, no chunks, 16-bit inputs, TMA on and
    aligned, head dim ≤ 128. Each condition alone turns it off; a bad RCM_KERNELS_BWD_WS is one error naming it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RCM_KERNELS_TMA", "on")
    q = torch.zeros(1, 2, 77, 64, dtype=torch.bfloat16)

    def allowed(q=q, mask=None, chunks=None):
        c = katt._common(q, q, q, None, mask, chunks)
        return katt._warp_specialise(c, q, q, q, q)

    assert allowed()
    assert allowed(q=q.half())
    assert not allowed(mask=torch.ones(1, 77, dtype=torch.bool))
    assert not allowed(chunks=(38, 39))
    assert not allowed(q=q.float())
    assert not allowed(q=torch.zeros(1, 2, 77, 36, dtype=torch.bfloat16))              # 72-byte rows: no TMA
    assert allowed(q=torch.zeros(1, 2, 77, 128, dtype=torch.bfloat16))
    assert not allowed(q=torch.zeros(1, 2, 77, 256, dtype=torch.bfloat16))             # spills at D=256
    monkeypatch.setenv("RCM_KERNELS_TMA", "off")
    assert not allowed()
    monkeypatch.setenv("RCM_KERNELS_TMA", "on")
    monkeypatch.setenv("RCM_KERNELS_BWD_WS", "off")
    assert not allowed()
    monkeypatch.setenv("RCM_KERNELS_BWD_WS", "yes")
    with pytest.raises(ValueError, match="RCM_KERNELS_BWD_WS='yes': use auto or off"):
        allowed()
    # The autotuners' prune drops the WS tiles unless the launch says WS_OK (part of the tuning key).
    ws_tiles = lambda kept: sorted(katt._tile(c) for c in kept if c.kwargs["WS"])
    for kind in ("dkdv", "dq"):
        configs = katt._bwd_configs(kind)
        assert ws_tiles(katt._prune_bwd(configs, None, BLOCK_D=64, WS_OK=False)) == []
        assert ws_tiles(katt._prune_bwd(configs, None, BLOCK_D=64, WS_OK=True)) == sorted(katt._BWD_TILES[kind + "_ws"])
        assert len(katt._prune_bwd(configs, None, BLOCK_D=128, WS_OK=True)) == len(
            katt._prune_bwd(configs, None, BLOCK_D=128, WS_OK=False)) + 3              # 128×128 only at D ≤ 64


@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", WS_CASES, ids=lambda c: f"{c[2]}x{c[3]}")
def test_warp_specialised_backward_matches_float64(triton_mode, dtype, case, monkeypatch):
    """The WS path (descriptor loads of every operand; rows past LQ read as 0) against float64 at 77 × 150 and
    76 × 128, in units of the dtype's rounding (WS_BARS). On CPU the same draw with RCM_KERNELS_BWD_WS=off is equal
    bit for bit: the interpreter reads the same tiles either way and ignores the loop hint. On the GPU (fixed tiles
    under RCM_KERNELS_AUTOTUNE=0) the compiled warp-specialised loops run on sm_90. fp32 never takes it (checked)."""
    monkeypatch.setenv("RCM_KERNELS_TMA", "on")
    taken, strides = [], []
    allowed, delta = katt._warp_specialise, katt._delta
    monkeypatch.setattr(katt, "_warp_specialise", lambda *a: (taken.append(allowed(*a)), taken[-1])[1])
    monkeypatch.setattr(katt, "_delta", lambda *a: (strides.append(a[3]), delta(*a))[1])
    seed = WS_CASES.index(case)
    draw = backward_draw(case, dtype, triton_mode, seed)
    hopper = triton_mode == "cpu" or torch.cuda.get_device_capability() == (9, 0)
    assert taken == [dtype != torch.float32 and hopper]
    LQ = case[2]
    assert strides == [-(-LQ // 4) * 4 if taken[0] else LQ]          # the statistics' rows: 80 apart at LQ = 77
    for name in ("o", "dq", "dk", "dv"):
        ours, ref, u = draw[name]
        _check(name, ours, ref, WS_BARS[name][dtype], u, seed)
    if triton_mode == "cpu" and taken[0]:
        monkeypatch.setenv("RCM_KERNELS_BWD_WS", "off")
        plain = backward_draw(case, dtype, triton_mode, seed)
        assert taken[-1] is False
        for name in ("dq", "dk", "dv"):
            assert torch.equal(draw[name][0], plain[name][0]), f"{name}: WS and plain paths differ"


@pytest.mark.parametrize("ws_pass", ["dkdv", "dq"])
def test_one_pass_warp_specialised_the_other_plain_equals_the_plain_backward(ws_pass, monkeypatch):
    """Under WS_OK the autotuners try plain tiles too, so one pass may run warp-specialised and the other plain, both
    reading lse and delta from the buffers the launcher padded to rows of s_stat (80 at LQ = 77). In the interpreter
    with TMA forced on, each mix gives the plain backward's bits; at a second (batch, head) row a plain tile that
    indexed the statistics LQ apart read the wrong rows (the bug this caught)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RCM_KERNELS_TMA", "on")
    fixed = katt._fixed_config

    def one_pass_ws(name, block_d, fp32, ws_ok=False):
        return fixed(name, block_d, fp32, ws_ok and name.endswith(ws_pass))

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 77, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 150, 64, generator=gen).bfloat16() for _ in range(2))
    w = torch.randn(1, 2, 77, 64, generator=gen)

    def grads():
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        (kernels.attention(*xs).float() * w).sum().backward()
        return [x.grad for x in xs]

    monkeypatch.setenv("RCM_KERNELS_BWD_WS", "off")
    plain = grads()
    monkeypatch.setenv("RCM_KERNELS_BWD_WS", "auto")
    monkeypatch.setattr(katt, "_fixed_config", one_pass_ws)
    mixed = grads()
    for name, a, b in zip(("dq", "dk", "dv"), mixed, plain):
        assert torch.equal(a, b), f"{name}: {ws_pass} warp-specialised, the other pass plain, differs from plain"


@pytest.mark.parametrize("ragged", [False, True], ids=["even", "ragged"])
def test_warp_specialised_backward_tiles_compile_for_sm90_on_a_cpu(tmp_path, ragged):
    """Every warp-specialised dK/dV and dQ tile the autotuners may try (their prune: 128×128 only at D=64) compiles
    for sm_90 without a GPU and comes out warp-specialised: Triton's pass turned the 4-warp tile into 12 warps (a
    producer group and two consumer groups). At even lengths ptxas spilled nothing; at ragged ones (Wan's 32,760
    tokens: masked tails, the dQ pass's single masked loop) the check is the compile itself, which Triton 3.6 fails
    on a second loop after the specialised one or on any pointer load (a crash at launch, not a slow kernel)."""
    pytest.importorskip("triton")
    tool = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "kernel_registers.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(tool), "--dims", "64,128", "--kernels", "dkdv_ws,dq_ws", "--tma", "on",
                          "--json", str(out)] + (["--ragged"] if ragged else []),
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert sorted((r["kernel"], r["D"], tuple(r["tile"])) for r in rows) == sorted(
        (kind, d, t) for kind in ("dkdv_ws", "dq_ws") for d in (64, 128) for t in katt._BWD_TILES[kind]
        if d == 64 or t[:2] != (128, 128))
    for r in rows:
        assert r["ragged"] is ragged and r["warp_specialized"] and r["warps"] == 12, r
        if not ragged:
            assert r["spill_st"] == r["spill_ld"] == 0, r


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_ws_ab_bench_runs_under_the_interpreter(monkeypatch, tmp_path, capsys):
    """`python -m kernels.bench --ws-ab ROUNDS` end to end at a tiny shape on CPU: the backward launched once with
    warp-specialised tiles allowed and once without, gradients equal bit for bit (the interpreter runs the WS data
    path; the loop hint is the GPU compiler's), one row per shape, and the JSON and table in $OUT."""
    from kernels import bench
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--shapes", "16:2:40", "--ws-ab", "1"])
    monkeypatch.setattr(bench, "_timer", lambda device: (lambda fn: (fn(), 1.0)[1]))   # one call, no timing
    launches = []
    run = katt._run
    monkeypatch.setattr(katt, "_run", lambda name, grid, *a, **kw: (launches.append((name, kw.get("WS_OK"))),
                                                                     run(name, grid, *a, **kw))[1])
    bench.main()
    assert {w for name, w in launches if name == "_attn_bwd_dkdv"} == {False, True}
    out = capsys.readouterr().out
    assert "| 16 | 2 | 40 |" in out
    rows = json.loads((tmp_path / "kernels_ws_ab.json").read_text())
    assert len(rows) == 1 and rows[0]["max_rel_diff"] == 0.0 and rows[0]["sdpa_bwd_ms"] is None
    assert (tmp_path / "kernels_ws_ab.md").read_text().startswith("| D | H | N |")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("triton_mode", DEVICES, indirect=True)
def test_backward_masks_padded_keys_whose_scores_would_overflow(triton_mode, monkeypatch):
    """Rows whose every score is near −90 have lse ≈ −90, so a key past LK (read as a zero row: score 0) would get
    p = e^90, inf in fp32, and ds·k = inf·0 = NaN in dQ. The dQ pass therefore keeps its key-range select on the
    ragged last tile, on the plain path (its tail loop) and on the warp-specialised one (its single masked loop):
    dropping it there turns this dQ to NaN (checked). The dK/dV pass needs none (such keys feed only their own,
    unstored rows). TMA on, bf16: every gradient finite on both paths, and under the interpreter equal bit for bit.
    (No float64 bar here: dQ is a near-cancelling sum at these scores, and this draw is about finiteness.)"""
    monkeypatch.setenv("RCM_KERNELS_TMA", "on")
    _, gen = _seeded(700)
    B, H, LQ, LK, D = 1, 2, 76, 150, 64
    noise = lambda L: 0.1 * torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    q, k, v = (x.to(triton_mode, torch.bfloat16) for x in (-12 + noise(LQ), 1 + noise(LK),
                                                           torch.randn(B, H, LK, D, generator=gen, dtype=torch.float64)))
    do = torch.randn(B, H, LQ, D, generator=gen).to(triton_mode, torch.bfloat16)
    o, lse = katt._fwd(q, k, v)
    assert lse.max() < -88.8                     # e^(−lse) > fp32's largest (e^88.7): the hazard is in this draw
    hopper = triton_mode == "cpu" or torch.cuda.get_device_capability() == (9, 0)
    grads = {}
    for ws in ("off", "auto"):
        monkeypatch.setenv("RCM_KERNELS_BWD_WS", ws)
        assert katt._warp_specialise(katt._common(q, k, v, None, None, None), q, k, v, do) is (ws == "auto" and hopper)
        grads[ws] = katt._bwd(do, q, k, v, o, lse)
        for name, g in zip(("dq", "dk", "dv"), grads[ws]):
            assert torch.isfinite(g).all(), f"{name} (RCM_KERNELS_BWD_WS={ws}): non-finite"
    if triton_mode == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(grads["off"], grads["auto"]))


def test_bwd_tiles_bench_pins_each_tile_under_the_interpreter(monkeypatch, tmp_path, capsys):
    """`python -m kernels.bench --bwd-tiles ROUNDS` end to end at a tiny shape on CPU: one row for the autotuned
    backward and one per tile of each pass's space (warp-specialised tiles too, TMA forced on) plus the extra
    ones; each pinned tile is the one launched, the other pass held at the first run's tile; a tile that cannot
    launch (48 keys: not a power of two) is a row with its error and no time, the rest still timed; the
    JSON and table in $OUT; a malformed --extra-tiles item is refused naming itself and the form."""
    from kernels import bench
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench", "--shapes", "16:2:40", "--bwd-tiles", "1",
                                     "--extra-tiles", "dkdv:32x32x4x2:ws,dq:48x48x4x2"])
    monkeypatch.setattr(bench, "_timer", lambda device: (lambda fn: (fn(), 1.0)[1]))   # one call, no timing
    launches = []
    run = katt._run
    def seen(name, grid, *a, **kw):       # the tile `_run` launches with: the fixed config's under the interpreter
        tile = katt._fixed_config(name, kw["BLOCK_D"], False, kw.get("WS_OK", False))
        launches.append((name, tile["BLOCK_M"], tile["BLOCK_N"], tile.get("WS")))
        return run(name, grid, *a, **kw)
    monkeypatch.setattr(katt, "_run", seen)
    bench.main()
    rows = json.loads((tmp_path / "kernels_bwd_tiles.json").read_text())
    spaces = {kind: len(katt._prune_bwd(katt._bwd_configs(kind), None, BLOCK_D=16, WS_OK=True))
              for kind in ("dkdv", "dq")}
    assert len(rows) == 1 + spaces["dkdv"] + spaces["dq"] + 2
    assert rows[0]["pass"] == "autotuned" and rows[0]["over_autotuned"] == 1.0
    extra, bad = rows[-2:]
    assert (extra["tile"], extra["ws"], extra["ms"], extra["max_rel_diff"]) == ("32x32 w4 s2", True, 1.0, 0.0)
    assert bad["ms"] is None and bad["error"] and bad["tile"] == "48x48 w4 s2"
    assert ("_attn_bwd_dkdv", 32, 32, True) in launches and ("_attn_bwd_dq", 64, 64, True) in launches
    assert ("_attn_bwd_dkdv", 32, 128, False) in launches and ("_attn_bwd_dq", 128, 128, True) in launches
    assert all(r["error"] is None and r["max_rel_diff"] == 0.0 for r in rows[:-1])
    assert (tmp_path / "kernels_bwd_tiles.md").read_text().startswith("| D | H | N | pass | tile |")
    assert "| 16 | 2 | 40 | dq | 48x48 w4 s2 |" in capsys.readouterr().out
    with pytest.raises(argparse.ArgumentTypeError, match="'dq:64x64': write PASS:BMxBNxWARPSxSTAGES"):
        bench.parse_tiles("dkdv:64x64x4x2,dq:64x64")
