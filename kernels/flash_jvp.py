"""Fused attention forward + JVP on Triton: launchers, autotuning, autograd, dispatch and partial merging.

Public entry points (re-exported by `kernels`):
  attention(q, k, v, *, scale=None, key_padding_mask=None, chunk_sizes=None, primal="fused") -> o
      reverse-mode (Triton FA2-style backward) and forward-mode (its `jvp` runs the fused pass) differentiable,
      so `torch.func.jvp`, `torch.autograd.forward_ad` and plain training all work through it. `primal` picks
      what runs when no tangent is present (`PRIMAL_BACKENDS`): "fused" = our kernel everywhere; "sdpa_grad" =
      PyTorch SDPA (cuDNN / flash on CUDA) for calls that record a gradient; "sdpa" = SDPA for every call
      without a tangent. A call carrying a tangent always runs the fused forward+JVP pass, and so does every
      block-causal call (chunk_sizes set), whatever `primal` says.
  attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, key_padding_mask=None, chunk_sizes=None, return_lse=False)
      -> (o, o_t) or (o, o_t, lse, lse_t): the fused single pass, no L×L tensor.
  chunk_sizes (q, k one sequence): block-causal, query chunk i attends key chunks 0..i; the kernels skip the key
      tiles a query tile cannot see (about half the work at many chunks) and mask only those a boundary crosses.
  merge_attention_partials(parts) merges results over disjoint key blocks exactly (ring / context parallel).
Dispatch: Triton on CUDA tensors, and on any tensor while TRITON_INTERPRET=1 (read at call time); else the
PyTorch twins in kernels/reference.py. Test: `pytest tests/test_kernels.py`; bench: `python -m kernels.bench`.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from kernels._modes import interpret as _interpret, triton_module
from kernels.reference import attention_jvp_lse_ref, attention_jvp_ref, attention_ref, check_chunk_sizes


class AttnPartial(NamedTuple):
    """Attention over one block of keys: output, its tangent, row log-sum-exp [B,H,Lq] (fp32) and its tangent."""
    o: torch.Tensor
    o_t: torch.Tensor
    lse: torch.Tensor
    lse_t: torch.Tensor


# ----------------------------------------------------------------------------------------------- dispatch

def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or anywhere under the interpreter; the PyTorch twin otherwise. A CUDA tensor
    without Triton installed still runs (the twin), with a warning: the twin materialises the L×L score matrix.
    float64 always runs the twin: it is the reference precision (float64 networks check the bf16/fp32 paths, on
    CUDA too) and the Triton kernels compute in fp32 at best, so a float64 call there could only be refused."""
    if x.dtype == torch.float64:
        return False
    if _interpret():
        return True
    if not x.is_cuda:
        return False
    if importlib.util.find_spec("triton") is None:
        warnings.warn(TWIN_ON_CUDA, RuntimeWarning, stacklevel=3)
        return False
    return True


TWIN_ON_CUDA = ("kernels: Triton is not installed, so attention on CUDA runs the PyTorch twin "
                "(kernels/reference.py), which materialises the L×L score matrix: memory grows with L² and the "
                "fused forward+JVP pass is lost (no long videos); install it with `pip install triton`")


def _kernels(interpret: bool) -> ModuleType:
    """_triton_attention.py compiled (interpret=False) or interpreted (`kernels._modes`)."""
    return triton_module("_triton_attention.py", interpret)


# --------------------------------------------------------------------------------------------- launchers

_FWD_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3),
              (64, 128, 4, 2), (128, 64, 4, 3), (64, 32, 4, 2)]
# Extra (BLOCK_M, BLOCK_N, warps, stages) tried at head dim 64 only, with RCM_KERNELS_D64_SPACE=wide (issue 28,
# lever 5: D=64 runs at 0.96x the official kernel, whose space has 4-warp and deeper-pipelined tiles). Shared
# memory per stage at D=64 with tangents is 4·BLOCK_N·64·2 B (K, K̇, V, V̇), so 5 stages of BLOCK_N=64 or 3 of
# 128 still fit an H100/H200's 228 KB. Untuned until a GPU run picks from them.
_WIDE_D64_TILES = [(128, 64, 4, 4), (128, 64, 8, 5), (128, 32, 4, 4), (128, 32, 8, 4), (128, 128, 8, 3),
                   (128, 128, 4, 3), (64, 64, 4, 4), (64, 64, 8, 4), (64, 128, 4, 3), (128, 64, 4, 2)]


def d64_space() -> str:
    """"wide" (default) or "narrow": the autotune space of the fused forward at head dim 64. Wide adds 4-warp,
    BLOCK_N=32 and deeper-pipeline tiles; it was ahead in all three H200 runs (+3 %, +5 %, +5 % at H=24, N=8K,
    2026-12-03/04, docs/BENCHMARKS.md) for a longer first autotune; narrow is the space of the other head dims."""
    space = os.environ.get("RCM_KERNELS_D64_SPACE", "wide")
    if space not in ("narrow", "wide"):
        raise ValueError(f"RCM_KERNELS_D64_SPACE={space!r}: use narrow or wide")
    return space


def _fwd_configs(space: str = "narrow"):
    import triton
    tiles = _FWD_TILES + (_WIDE_D64_TILES if space == "wide" else [])
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def _tile(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune_fwd(configs, named_args, **kwargs):
    # Keep the search small: which tiles can pay off depends on the head dim (register and smem budget).
    d = kwargs["BLOCK_D"]
    tangent = kwargs["HAS_TANGENT"]
    def ok(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if _tile(c) not in _FWD_TILES:                    # a wide-space tile: head dim 64 only
            return d == 64
        if d >= 256:
            return bm == 64 and bn <= 64
        if d >= 128 and tangent:
            return bn <= 64 and (bm, bn) != (64, 32) and c.num_stages < 4   # 4 stages of K,K̇,V,V̇ overflow smem
        return (bm, bn) != (64, 32)
    kept = [c for c in configs if ok(c)]
    return kept or configs[-1:]


# Backward tiles (BLOCK_M, BLOCK_N, warps, stages). The dK/dV pass keeps k, v and two fp32 accumulators of
# BLOCK_N rows in registers, the dQ pass q, dO and one of BLOCK_M rows; the second group of each list holds the
# larger tiles and deeper pipelines tried since 2026-12-04 (our backward was 1.28-1.50x SDPA's on an H200).
_BWD_TILES = {
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3),
             (64, 128, 8, 3), (64, 64, 8, 3), (128, 128, 8, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
           (128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    # Warp-specialised tiles (the kernels' WS; 4 warps is one consumer group: Triton's Hopper pass adds a
    # producer group and splits the tile across two consumer groups, 12 warps in all). Tried only where the
    # launcher sets WS_OK.
    "dkdv_ws": [(64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 4, 2)],
    "dq_ws": [(128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 2)],
}


def _bwd_configs(kind: str):
    import triton
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WS": ws}, num_warps=w, num_stages=s)
            for ws, tiles in ((False, kind), (True, kind + "_ws")) for bm, bn, w, s in _BWD_TILES[tiles]]


def _prune_bwd(configs, named_args, **kwargs):
    # Register budget: 128×128 tiles only at head dim ≤ 64, 64×64 at most at 256. Warp-specialised tiles only
    # where the launcher allows them (WS_OK).
    d = kwargs["BLOCK_D"]
    limit = 64 * 64 if d >= 256 else (64 * 128 if d >= 128 else 128 * 128)
    ws_ok = kwargs.get("WS_OK", False)
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit
            and (ws_ok or not c.kwargs.get("WS", False))] or configs[-1:]


_EVEN = {
    "EVEN_M": lambda a: a["LQ"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["LK"] % a["BLOCK_N"] == 0,
    "EVEN_D": lambda a: a["D"] == a["BLOCK_D"],
}
_TUNE_KEY = ["LQ_KEY", "LK_KEY", "BLOCK_D", "HAS_MASK", "HAS_CHUNKS", "UPCAST", "PREC", "TMA"]


def _autotune() -> bool:
    # RCM_KERNELS_AUTOTUNE=0 pins one config per head dim on the GPU (quick compiles for tests).
    return os.environ.get("RCM_KERNELS_AUTOTUNE", "1") != "0"


def _fixed_config(name: str, block_d: int, fp32: bool, ws_ok: bool = False) -> dict:
    """One config per kernel: 64×64 in the interpreter (several key blocks, ragged tails, cheap to run);
    on the GPU a conservative tile that fits the registers at every head dim. fp32 (exact "ieee" dots, a
    correctness path, not a fast one) gets small tiles: its tiles take twice the shared memory and its
    FMA-based dots compile slowly. The backward passes take their warp-specialised path wherever it is allowed
    (ws_ok), so the tests run it (in the interpreter: its descriptor loads; the loop hint is a GPU matter)."""
    if name.startswith("_attn_bwd") and ws_ok:
        if _interpret():
            return {"BLOCK_M": 64, "BLOCK_N": 64, "WS": True}
        dkdv = name.endswith("dkdv")
        return {"BLOCK_M": 64 if dkdv else 128, "BLOCK_N": 128 if dkdv else 64, "num_warps": 4, "num_stages": 2,
                "WS": True}
    ws = {"WS": False} if name.startswith("_attn_bwd") else {}
    if _interpret():
        return {"BLOCK_M": 64, "BLOCK_N": 64, **ws}
    if fp32:
        small = block_d >= 256
        return {"BLOCK_M": 32 if small else 64, "BLOCK_N": 16 if small else 32, "num_warps": 4, "num_stages": 1,
                **ws}
    big = block_d >= 256
    if name == "_attn_fwd_jvp":
        return {"BLOCK_M": 64 if big else 128, "BLOCK_N": 32 if big else 64, "num_warps": 4 if big else 8, "num_stages": 2}
    if name.endswith("dkdv"):
        return {"BLOCK_M": 32, "BLOCK_N": 64 if big else 128, "num_warps": 4, "num_stages": 2, **ws}
    return {"BLOCK_M": 64 if big else 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, **ws}


@functools.lru_cache(maxsize=32)
def _launcher(name: str, interpret: bool, autotune: bool, d64: str = "narrow"):
    """The kernel wrapped for launch: EVEN_* heuristics always; autotune only on the GPU (the interpreter
    cannot benchmark: "0 active drivers"), keyed on head dim, flags and power-of-two length buckets."""
    import triton
    fn = triton.heuristics(_EVEN)(getattr(_kernels(interpret), name))
    if interpret or not autotune:
        return fn
    if name == "_attn_fwd_jvp":
        tuner = triton.autotune(_fwd_configs(d64), key=_TUNE_KEY + ["HAS_TANGENT"],
                                prune_configs_by={"early_config_prune": _prune_fwd})
    else:
        tuner = triton.autotune(_bwd_configs("dkdv" if name.endswith("dkdv") else "dq"), key=_TUNE_KEY + ["WS_OK"],
                                prune_configs_by={"early_config_prune": _prune_bwd})
    return tuner(fn)


def _current_launcher(name: str, fp32: bool = False):
    """The launcher `_run` uses for kernel `name` under the current settings (interpreter, autotune, D=64 space)."""
    return _launcher(name, _interpret(), _autotune() and not fp32,
                     d64_space() if name == "_attn_fwd_jvp" else "narrow")


def _run(name: str, grid, *args, **kwargs):
    fp32 = kwargs["PREC"] == "ieee"
    interpret, autotune = _interpret(), _autotune() and not fp32
    launcher = _current_launcher(name, fp32)
    if interpret or not autotune:
        kwargs.update(_fixed_config(name, kwargs["BLOCK_D"], fp32, kwargs.get("WS_OK", False)))
    if (kwargs["TMA"] or kwargs.get("WS_OK", False)) and not interpret:
        import triton
        # Set at every launch: the allocator is a context variable, and Ray Train runs the loop in a thread.
        triton.set_allocator(_tma_scratch)
    return launcher[grid](*args, **kwargs)


def tma_mode() -> str:
    """RCM_KERNELS_TMA: "auto" (default) streams the key/value tiles of the forward and dQ pass and the
    query/dO tiles of the dK/dV pass through TMA tensor descriptors on sm_90+ GPUs (the backward from head dim
    TMA_BWD_MIN_HEAD_DIM up, where it measured level or faster); "off" uses pointer loads everywhere; "on" is
    "auto" plus the interpreter, so CPU tests run the descriptor path too. Either way a tensor whose base or
    strides are not 16-byte aligned (TMA's rule) is read through pointers."""
    mode = os.environ.get("RCM_KERNELS_TMA", "auto")
    if mode not in ("auto", "off", "on"):
        raise ValueError(f"RCM_KERNELS_TMA={mode!r}: use auto, off or on")
    return mode


# The backward takes TMA from this head dim up. One H200, 2026-12-04 (`kernels.bench --tma-ab 4`, 4 interleaved
# rounds): at D=128 TMA / pointers 0.998 (8K) and 0.971 (32K), block-causal 32K 0.969; at D=64 1.016 and 1.038
# (TMA won 1 and 0 of 4 rounds), so D=64 keeps pointer loads. The forward took TMA at both (0.947-0.980).
TMA_BWD_MIN_HEAD_DIM = 128


def _tma_aligned(x: torch.Tensor) -> bool:
    # A descriptor covers one (batch, head)'s [L, D] rows: its base (b·s_b + h·s_h from the data pointer) and its
    # row stride must be multiples of 16 bytes, and D is the unit-stride dimension.
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(st * size % 16 == 0 for st in x.stride()[:-1])


def _use_tma(*streamed: torch.Tensor) -> bool:
    mode = tma_mode()
    if mode == "off" or (_interpret() and mode != "on"):
        return False
    if not _interpret() and torch.cuda.get_device_capability(streamed[0].device)[0] < 9:
        return False
    return all(_tma_aligned(x) for x in streamed)


def bwd_ws_mode() -> str:
    """RCM_KERNELS_BWD_WS: "auto" (default) lets the backward passes' autotuners try warp-specialised tiles where
    `_warp_specialise` allows them; "off" never (the A/B baseline, and the way out should Triton's Hopper
    pass miscompile on some other build)."""
    mode = os.environ.get("RCM_KERNELS_BWD_WS", "auto")
    if mode not in ("auto", "off"):
        raise ValueError(f"RCM_KERNELS_BWD_WS={mode!r}: use auto or off")
    return mode


def _warp_specialise(c: dict, q, k, v, do) -> bool:
    """Whether the backward passes may take warp-specialised tiles (their WS_OK). Triton 3.6's Hopper pass compiles
    the loop only when every load is a descriptor load (checked for sm_90 on the CPU,
    tests/test_kernels.py), so: no padding mask or chunk bounds (pointer loads), 16-bit inputs (the fp32 path's
    exact dots are a correctness path), sm_90 (the pass is Hopper's; Blackwell has another, untried), TMA on
    and aligned for q, k, v and dO (lse and delta: `_bwd` lays their rows out for it). Head dims up to 128: at
    256 every warp-specialised tile spilled 3-4 KiB per thread (sm_90 compile, 2026-12-04)."""
    if (bwd_ws_mode() == "off" or c["HAS_MASK"] or c["HAS_CHUNKS"] or c["PREC"] == "ieee"
            or c["BLOCK_D"] > 128):
        return False
    if not _interpret() and torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return _use_tma(q, k, v, do)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Global memory the kernels write their descriptors into (128 B per descriptor and program), asked for by
    # Triton at launch; from PyTorch's caching allocator on the current device, like the kernels' outputs.
    return torch.empty(size, dtype=torch.int8, device="cuda")


# Tests set this to fill every output with NaN before launch, so an element the kernel fails to write shows up.
POISON_OUTPUTS = False


def _empty(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels index D with unit stride (coalesced loads); other strides are passed through.
    return x if x.stride(-1) == 1 else x.contiguous()


def _bucket(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


@functools.lru_cache(maxsize=32)
def _chunk_bounds(chunk_sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(CHUNK_END, CHUNK_START) int32 [L]: each token's chunk end (exclusive) and start. Cached, so a training
    loop with a fixed chunk layout copies them to the device once."""
    sizes = torch.tensor(chunk_sizes, dtype=torch.int64)
    ends = torch.cumsum(sizes, 0)
    end = torch.repeat_interleave(ends, sizes)
    start = torch.repeat_interleave(ends - sizes, sizes)
    return end.to(device, torch.int32), start.to(device, torch.int32)


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            key_padding_mask: torch.Tensor | None, chunk_sizes: tuple[int, ...] | None = None) -> dict:
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    if k.shape != (B, H, LK, D) or v.shape != (B, H, LK, D):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected [B, H, L, D] "
                         "with equal B, H, D (the kernel has no GQA and d_v = d_qk)")
    if D > 256:
        raise ValueError(f"head dim {D} > 256 is not supported by the Triton kernel")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of fp16/bf16/fp32 for all")
    scale = _resolve_scale(scale, q)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale}: the Triton kernel needs a positive, finite softmax scale (it scales the "
                         "row max of the raw scores); leave it None for 1/sqrt(head dim), or negate q for a negative one")
    mask = q if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.uint8).contiguous()
    if key_padding_mask is not None and mask.shape != (B, LK):
        raise ValueError(f"key_padding_mask {tuple(mask.shape)} != [B, Lk] = {(B, LK)}")
    chunks = check_chunk_sizes(chunk_sizes, LQ, LK)
    chunk_end, chunk_start = (q, q) if chunks is None else _chunk_bounds(chunks, q.device)
    return {"H": H, "LQ": LQ, "LK": LK, "D": D, "scale": scale,
            "LQ_KEY": _bucket(LQ), "LK_KEY": _bucket(LK), "mask": mask, "s_mb": mask.stride(0) if mask.dim() == 2 else 0,
            "HAS_MASK": key_padding_mask is not None, "BLOCK_D": _block_d(D),
            "chunk_end": chunk_end, "chunk_start": chunk_start, "HAS_CHUNKS": chunks is not None,
            "UPCAST": q.dtype == torch.bfloat16 and _interpret(),
            "PREC": "ieee" if q.dtype == torch.float32 else "tf32"}


def _resolve_scale(scale: float | None, q: torch.Tensor) -> float:
    return float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _fwd(q, k, v, q_t=None, k_t=None, v_t=None, *, scale=None, key_padding_mask=None, chunk_sizes=None):
    """Launch the fused pass. Without tangents it is a plain flash forward that also writes lse."""
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    c = _common(q, k, v, scale, key_padding_mask, chunk_sizes)
    tangent = q_t is not None
    if tangent:
        q_t, k_t, v_t = (_unit_stride(t.to(q.dtype)) for t in (q_t, k_t, v_t))
    else:
        q_t, k_t, v_t = q, k, v                    # never read: HAS_TANGENT is a constexpr
    B, H, LQ, D = q.shape
    o = _empty((B, H, LQ, D), q, q.dtype)
    lse = _empty((B, H, LQ), q, torch.float32)
    o_t = _empty((B, H, LQ, D), q, q.dtype) if tangent else o
    lse_t = _empty((B, H, LQ), q, torch.float32) if tangent else lse
    grid = lambda meta: (_cdiv(LQ, meta["BLOCK_M"]), B * H)
    _run("_attn_fwd_jvp", grid, q, k, v, q_t, k_t, v_t, c["mask"], c["chunk_end"], o, o_t, lse, lse_t,
         *_strides(q), *_strides(k), *_strides(v), *_strides(q_t), *_strides(k_t), *_strides(v_t), c["s_mb"],
         c["H"], LQ, c["LK"], D, c["scale"], c["LQ_KEY"], c["LK_KEY"],
         HAS_TANGENT=tangent, HAS_MASK=c["HAS_MASK"], HAS_CHUNKS=c["HAS_CHUNKS"], UPCAST=c["UPCAST"],
         PREC=c["PREC"], BLOCK_D=c["BLOCK_D"], TMA=_use_tma(k, v, k_t, v_t))
    return (o, o_t, lse, lse_t) if tangent else (o, lse)


def _bwd(do, q, k, v, o, lse, *, scale=None, key_padding_mask=None, dlse=None, chunk_sizes=None):
    """FA2-style backward from the saved lse: delta = rowsum(dO⊙O) − dlse, then a dK/dV pass over key blocks
    and a dQ pass over query blocks (two launches, no atomics)."""
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    c = _common(q, k, v, scale, key_padding_mask, chunk_sizes)
    B, H, LQ, D = q.shape
    LK = c["LK"]
    do = do.to(q.dtype).contiguous()
    ws_ok = _warp_specialise(c, q, k, v, do)
    # The warp-specialised passes read lse and delta through 1-D descriptors, one per (batch, head) row, whose
    # base must sit on 16 bytes: rows padded to a multiple of 4 fp32 (at 8,190 tokens, say; a copy of lse of
    # B·H·LQ·4 bytes, microseconds). The plain passes read rows LQ apart.
    s_stat = -(-LQ // 4) * 4 if ws_ok else LQ
    if ws_ok and (s_stat != LQ or lse.data_ptr() % 16 or not lse.is_contiguous()):
        lse = torch.nn.functional.pad(lse.float(), (0, s_stat - LQ))
    delta = _delta(do, o.contiguous(), dlse, s_stat)
    dq = _empty((B, H, LQ, D), q, q.dtype)
    dk = _empty((B, H, LK, D), q, q.dtype)
    dv = _empty((B, H, LK, D), q, q.dtype)
    common = (*_strides(q), *_strides(k), *_strides(v), c["s_mb"], H, LQ, LK, D, c["scale"],
              c["LQ_KEY"], c["LK_KEY"], s_stat)
    flags = {"HAS_MASK": c["HAS_MASK"], "HAS_CHUNKS": c["HAS_CHUNKS"], "UPCAST": c["UPCAST"], "PREC": c["PREC"],
             "BLOCK_D": c["BLOCK_D"], "TMA": c["BLOCK_D"] >= TMA_BWD_MIN_HEAD_DIM and _use_tma(q, k, v, do),
             "WS_OK": ws_ok}
    bounds = (c["mask"], c["chunk_end"], c["chunk_start"])
    _run("_attn_bwd_dkdv", lambda m: (_cdiv(LK, m["BLOCK_N"]), B * H),
         q, k, v, do, *bounds, lse, delta, dk, dv, *common, **flags)
    _run("_attn_bwd_dq", lambda m: (_cdiv(LQ, m["BLOCK_M"]), B * H),
         q, k, v, do, *bounds, lse, delta, dq, *common, **flags)
    return dq, dk, dv


def _delta(do: torch.Tensor, o: torch.Tensor, dlse: torch.Tensor | None, s_stat: int | None = None) -> torch.Tensor:
    """rowsum(dO⊙O) − dlse [B, H, LQ] fp32, one Triton pass over the contiguous o and dO. Twin: `_delta_ref`.
    With s_stat (≥ LQ) the buffer is [B, H, s_stat], rows s_stat apart and the entries past LQ never written.
    Why not the twin: its two fp32 copies cost 0.15-0.62 ms against 0.02-0.06 (H200, 2026-12-04, 1-5 % of the
    backward; docs/BENCHMARKS.md, "Lever 5, the backward again")."""
    B, H, LQ, D = o.shape
    s_stat = LQ if s_stat is None else s_stat
    delta = _empty((B, H, s_stat), o, torch.float32)
    dlse_arg = delta if dlse is None else dlse.float().contiguous()      # without dlse: a pointer never read
    block_m = 64
    kernel = _kernels(_interpret())._attn_bwd_delta
    kernel[(_cdiv(LQ, block_m), B * H)](o, do, dlse_arg, delta, LQ, D, s_stat, HAS_DLSE=dlse is not None,
                                        BLOCK_M=block_m, BLOCK_D=_block_d(D), EVEN_M=LQ % block_m == 0,
                                        EVEN_D=D == _block_d(D))
    return delta


def _delta_ref(do: torch.Tensor, o: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    delta = (do.float() * o.float()).sum(-1)
    return delta if dlse is None else delta - dlse.float()


def _block_d(D: int) -> int:
    """The head-dim tile of every kernel: D rounded up to a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << (D - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# The fused pass as a custom op: a Function's `jvp` rule runs on functorch-wrapped tensors under
# torch.func.jvp, which a raw kernel launch cannot read; a custom op is dispatched down to plain tensors.
@torch.library.custom_op("rcm_kernels::attention_fwd_jvp", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor q_t, Tensor k_t, Tensor v_t, Tensor? mask, float scale,"
    " int[]? chunk_sizes) -> (Tensor, Tensor, Tensor, Tensor)"))
def _fwd_jvp_op(q, k, v, q_t, k_t, v_t, mask, scale, chunk_sizes):
    chunks = None if chunk_sizes is None else tuple(chunk_sizes)
    return _fwd(q, k, v, q_t, k_t, v_t, scale=scale, key_padding_mask=mask, chunk_sizes=chunks)


@_fwd_jvp_op.register_fake
def _(q, k, v, q_t, k_t, v_t, mask, scale, chunk_sizes):
    o = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return o, torch.empty_like(o), lse, torch.empty_like(lse)


# ---------------------------------------------------------------------------------------------- autograd

class _Attention(torch.autograd.Function):
    """o (and lse) from the Triton forward; backward = Triton FA2 backward; jvp = the fused pass."""

    @staticmethod
    def forward(q, k, v, scale, key_padding_mask, chunk_sizes):
        return _fwd(q, k, v, scale=scale, key_padding_mask=key_padding_mask, chunk_sizes=chunk_sizes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, mask, chunk_sizes = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.scale, ctx.mask, ctx.chunks = _resolve_scale(scale, q), mask, chunk_sizes

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _bwd(do, q, k, v, o, lse, scale=ctx.scale, key_padding_mask=ctx.mask, dlse=dlse,
                          chunk_sizes=ctx.chunks)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, scale_t, mask_t, chunks_t):
        # Forward AD has already run forward(); this recomputes the primal inside the fused pass (its P·V
        # GEMM is 1 of 6), which is cheaper than a separate tangent-only kernel would be to maintain.
        q, k, v = ctx.saved_tensors[:3]
        q_t, k_t, v_t = (torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), (q_t, k_t, v_t)))
        _, o_t, _, lse_t = _fwd_jvp_op(q, k, v, q_t, k_t, v_t, ctx.mask, ctx.scale, ctx.chunks)
        return o_t, lse_t


class _AttentionJVP(torch.autograd.Function):
    """(o, o_t, lse, lse_t) in one pass. Gradients flow to q, k, v through o and lse only: sCM/rCM
    never differentiate the tangent (it is a detached target), so a gradient reaching o_t raises."""

    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, scale, key_padding_mask, chunk_sizes):
        return _fwd(q, k, v, q_t, k_t, v_t, scale=scale, key_padding_mask=key_padding_mask, chunk_sizes=chunk_sizes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, *_, scale, mask, chunk_sizes = inputs
        o, _, lse, _ = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.mask, ctx.chunks = scale, mask, chunk_sizes
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, do_t, dlse, dlse_t):
        if do_t is not None or dlse_t is not None:
            raise NotImplementedError("attention_jvp: no gradient through the tangent output (semigradient "
                                      "contract: detach o_t, as sCM/rCM do)")
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _bwd(do, q, k, v, o, lse, scale=ctx.scale, key_padding_mask=ctx.mask, dlse=dlse,
                          chunk_sizes=ctx.chunks)
        return dq, dk, dv, None, None, None, None, None, None


# -------------------------------------------------------------------------------------------- public API

PRIMAL_BACKENDS = ("fused", "sdpa_grad", "sdpa")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              key_padding_mask: torch.Tensor | None = None, chunk_sizes: Sequence[int] | None = None,
              primal: str = "fused") -> torch.Tensor:
    """softmax(scale·q kᵀ) v over [B, H, L, D]; differentiable in reverse and forward mode. chunk_sizes: token
    counts of consecutive chunks of the one sequence q and k share (block-causal: chunk i sees chunks 0..i).
    `primal` (module docstring) sends tangent-free calls to SDPA; tangents always take the fused kernel, since
    SDPA's fused backends have no forward-mode rule (and its MATH backend materialises L×L)."""
    if primal not in PRIMAL_BACKENDS:
        raise ValueError(f"attention primal={primal!r}: use one of {PRIMAL_BACKENDS}")
    chunks = check_chunk_sizes(chunk_sizes, q.shape[-2], k.shape[-2])
    # Inside torch.compile the tangent check is skipped: a compiled DiT block only runs tangent-free calls
    # (rcm_core's blocks run eager when a tangent is present, since inductor drops forward-AD tangents).
    # Block-causal calls (chunks set) keep the fused kernel whatever `primal` says: SDPA would need a dense
    # [L, L] mask (1 GiB of bool at 32,760 tokens) that also shuts out its flash backend, while our kernel
    # skips the key tiles a query tile cannot see. The simplest correct choice; one code path for the mask.
    tangent_free = torch.compiler.is_compiling() or not has_tangent(q, k, v)
    if (chunks is None and primal != "fused" and (primal == "sdpa" or torch.is_grad_enabled())
            and tangent_free):
        return _sdpa(q, k, v, scale, key_padding_mask)
    if torch.compiler.is_compiling():
        return _fused_opaque()(q, k, v, scale, key_padding_mask, chunks)
    return _fused_attention(q, k, v, scale, key_padding_mask, chunks)


_OPAQUE: list = []


def _fused_opaque():
    """`_fused_attention` hidden from torch.compile: the Triton launch, its autotuner and the Function stay eager
    (a compiled DiT block graph-breaks around the call) while SDPA is traced natively. Made on first use, so
    importing `kernels` does not import torch._dynamo (a second on a small machine); a list, not functools.cache,
    which dynamo would trace through with a warning. `prepare_compile` makes it before any trace."""
    if not _OPAQUE:
        _OPAQUE.append(torch.compiler.disable(_fused_attention))
    return _OPAQUE[0]


def prepare_compile() -> None:
    """Call before torch.compile traces code that calls `attention`: makes the compile-opaque fused kernel
    eagerly. Made inside a trace instead, dynamo breaks the graph on `torch.compiler.disable` and then on the
    list's append (torch 2.11 warns "Dynamo does not know how to trace the builtin list.append") in every frame
    it traces on that first call; made here, a compiled caller breaks only around the kernel call itself."""
    _fused_opaque()


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                     key_padding_mask: torch.Tensor | None, chunks: tuple[int, ...] | None) -> torch.Tensor:
    if not use_triton(q):
        return attention_ref(q, k, v, scale=scale, key_padding_mask=key_padding_mask, chunk_sizes=chunks)
    duals = _forward_ad_inputs(q, k, v)
    if duals is not None:
        (q, k, v), tangents = duals
        o, o_t = attention_jvp(q, k, v, *tangents, scale=scale, key_padding_mask=key_padding_mask,
                               chunk_sizes=chunks)
        return fwAD.make_dual(o, o_t)
    o, _ = _Attention.apply(q, k, v, scale, key_padding_mask, chunks)
    return o


def has_tangent(*xs: torch.Tensor) -> bool:
    """True when some x carries a forward-mode tangent: a `forward_ad` dual tensor, or a tensor wrapped by a
    functorch transform (torch.func.jvp; vmap/grad wrappers count too: the fused path handles them all)."""
    for x in xs:
        if torch._C._functorch.is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None:
            return True
    return False


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
          key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with our mask convention (bool [B, Lk], True = attend) and our
    fully-masked-row rule (output 0, as the kernel and the twin give; SDPA's backends differ on such rows)."""
    mask = None if key_padding_mask is None else key_padding_mask.to(q.device, torch.bool)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :],
                                       scale=scale)
    if mask is not None:
        o = torch.where(mask.any(-1)[:, None, None, None], o, torch.zeros_like(o))
    return o


def _forward_ad_inputs(*xs: torch.Tensor):
    """((primals), (tangents)) when some input is a `torch.autograd.forward_ad` dual tensor and no gradient
    is being recorded, else None. Then `attention` runs the fused pass once and returns a dual output, where
    the Function's `jvp` rule would have run the forward first and the fused pass after it (the primal twice,
    about 4/3 of the work). With grad on, or under torch.func.jvp (functorch's own levels), the rule runs."""
    if torch.is_grad_enabled():
        return None
    parts = [fwAD.unpack_dual(x) for x in xs]
    if all(p.tangent is None for p in parts):
        return None
    return (tuple(p.primal for p in parts),
            tuple(torch.zeros_like(p.primal) if p.tangent is None else p.tangent for p in parts))


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, *,
                  scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                  chunk_sizes: Sequence[int] | None = None, return_lse: bool = False) -> tuple[torch.Tensor, ...]:
    """(o, o_t) of attention and its JVP in one fused pass; with return_lse also the row log-sum-exp
    lse [B, H, Lq] (fp32, natural log, -inf on fully masked rows) and its tangent lse_t = Σ_j P_ij·Ṡ_ij.
    chunk_sizes as in `attention` (block-causal)."""
    chunks = check_chunk_sizes(chunk_sizes, q.shape[-2], k.shape[-2])
    masks = {"key_padding_mask": key_padding_mask, "chunk_sizes": chunks}
    if use_triton(q):
        out = _AttentionJVP.apply(q, k, v, q_t, k_t, v_t, scale, key_padding_mask, chunks)
    elif return_lse:
        out = attention_jvp_lse_ref(q, k, v, q_t, k_t, v_t, scale=scale, **masks)
    else:
        return attention_jvp_ref(q, k, v, q_t, k_t, v_t, scale=scale, **masks)
    return tuple(out) if return_lse else (out[0], out[1])


def merge_attention_partials(parts: Sequence[AttnPartial | tuple]) -> AttnPartial:
    """Exact merge of attention over disjoint key blocks (ring / context-parallel attention), tangents included.

    With w_i = exp(lse_i − lse), lse = logsumexp_i lse_i: o = Σ w_i o_i, lse_t = Σ w_i lse_t_i and, since
    ẇ_i = w_i (lse_t_i − lse_t), o_t = Σ w_i (o_t_i + (lse_t_i − lse_t) o_i). Blocks with lse = -inf (all keys
    masked) get weight 0; a row masked in every block stays 0 with lse = -inf, no NaN.
    """
    parts = [AttnPartial(*p) for p in parts]
    acc = torch.promote_types(parts[0].o.dtype, torch.float32)
    lses = torch.stack([p.lse.to(acc) for p in parts])                    # [P, B, H, Lq]
    lse = torch.logsumexp(lses, dim=0)
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - finite)                                          # 0 for empty blocks
    lse_t = (w * torch.stack([p.lse_t.to(acc) for p in parts])).sum(0)
    o = sum(w[i, ..., None] * p.o.to(acc) for i, p in enumerate(parts))
    o_t = sum(w[i, ..., None] * (p.o_t.to(acc) + (p.lse_t.to(acc) - lse_t)[..., None] * p.o.to(acc))
              for i, p in enumerate(parts))
    dtype = parts[0].o.dtype
    return AttnPartial(o.to(dtype), o_t.to(dtype), lse, lse_t)
