"""Benchmark of the fused attention forward+JVP kernel against PyTorch on one CUDA GPU (bf16).

Run: `python -m kernels.bench [--seqs 1024,4096,...] [--json FILE]`. Prints one markdown table:
  ours fwd+JVP (ms, TFLOP/s at 12·B·H·Lq·Lk·D), SDPA forward (default backend, cuDNN/flash on H100) and our
  time as a multiple of it, our forward-only pass, torch.func.jvp over the MATH backend (ms or OOM) and our
  speed-up, peak extra memory of ours and of MATH, and our backward against SDPA's backward.
Timings are triton.testing.do_bench medians (CUDA events); MATH runs use 1 warm-up + 3 timed runs. A cell that
meets issue 28's bar for it is marked ✓ (fwd+JVP ≥ 540 TFLOP/s and ≥ 1.0× the official kernel at D=64, ahead of
it at other head dims, backward ≤ 1.15× SDPA's; `goal_marks`).

Against the official rCM kernel, one command (issue 28; the file is never committed: keep it in the
git-ignored .gpu/ folder):

    python3 -m kernels.bench --shapes 64:24:8192,128:12:8192,128:12:16384,128:12:32768,128:40:16384 \
        --math-max-n 0 --peer-kernel .gpu/peer/flash_attention_jvp_triton.py --d64-space both

`--peer-kernel PATH` loads NVlabs/rcm's `rcm/utils/flash_attention_jvp_triton.py` (entry point
`attention(q, k, v, tq, tk, tv, sm_scale) -> (o, to)`, its `_attention.apply`) and adds its fwd+JVP time,
TFLOP/s, ours/peer speed and the max |o − o_peer|, |ȯ − ȯ_peer| (the two must compute the same thing).
`--d64-space both` times our D=64 rows twice, with the default autotune space and with the wide one
(RCM_KERNELS_D64_SPACE=wide, kernels/flash_jvp.py), in the same process.

Pointer loads against TMA descriptors (issue 28; RCM_KERNELS_TMA, kernels/flash_jvp.py), one command:
`python3 -m kernels.bench --shapes 64:24:8192,128:12:8192 --tma-ab 4` interleaves the two load paths over 4 rounds
in one process (each autotuned on its own) and prints, per shape and pass (fwd+JVP, fwd, bwd), both times, their
ratio, the rounds TMA won, the tiles each picked and how far their outputs differ. Its bwd rows use TMA at every
head dim (the shipped rule, TMA_BWD_MIN_HEAD_DIM, is what they decide).

Warp-specialised backward tiles (issue 28; RCM_KERNELS_BWD_WS, kernels/flash_jvp.py), one command:
`python3 -m kernels.bench --shapes 64:24:8192,128:12:8192,64:24:32768,128:12:32768 --ws-ab 4` times the backward
with those tiles allowed and without, interleaved over 4 rounds (each side autotuned on its own), beside SDPA's
backward in the same rounds, and prints both times, their ratio, ours / SDPA, the rounds WS won and the dK/dV and
dQ tiles each side picked (" WS" marks a warp-specialised one).

The backward's tiles one by one (issue 28's backward bar at D=128), one command:
`python3 -m kernels.bench --shapes 128:12:8192 --bwd-tiles 3 --extra-tiles dkdv:64x128x4x4:ws,dq:128x128x4x2:ws`
times the whole backward with each pass pinned in turn to each tile of its autotune space (plus the extra ones),
the other pass at the autotuner's pick, beside the autotuned backward and SDPA's in the same rounds; a tile that
cannot launch is a row with its error.

Block-causal masks (issue 30): `python -m kernels.bench --block-causal` times the same kernels with
`chunk_sizes` against the unmasked kernel at the default Wan 480p × 81-frame shape, 21 chunks of one latent
frame (1,560 tokens each, 32,760 in all), H=12, D=128, bf16; one row per pass (fwd+JVP, fwd, bwd) and a CSV in
$OUT when set. Its TFLOP/s count only the attended (query, key) pairs (52.4 % of L² at 21 equal chunks), i.e.
the useful work; the bar is fwd+JVP ≥ 1.7× the unmasked kernel's speed. On CPU it runs under the interpreter at
tiny shapes: `TRITON_INTERPRET=1 python -m kernels.bench --block-causal --chunks 5x50 --dim 32 --heads 32:1
--dtype fp32` (perf_counter timings there, which say nothing about the GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _median_ms(fn, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn) -> float:
    """Peak memory allocated during fn beyond what was allocated before it (inputs), in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _math_jvp(q, k, v, qt, kt, vt):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qt, kt, vt))


def load_peer(path: str) -> types.ModuleType:
    """The official rCM kernel module from `path`. Its top imports `einops` and flash-attn (used by its backward
    only); where either is not installed a stand-in that raises on use is registered for the load, and a line
    says so: the forward+JVP timed here does not touch them."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--peer-kernel {path}: no such file; place NVlabs/rcm's "
                         "rcm/utils/flash_attention_jvp_triton.py there (git-ignored .gpu/ folder)")
    shims = {}
    if importlib.util.find_spec("einops") is None:
        shims["einops"] = _raising_module("einops", ["rearrange"])
    if importlib.util.find_spec("flash_attn") is None:
        shims["flash_attn"] = _raising_module("flash_attn", [])
        shims["flash_attn.flash_attn_interface"] = _raising_module(
            "flash_attn.flash_attn_interface", ["_flash_attn_backward", "_flash_attn_varlen_backward"])
    if shims:
        print(f"# peer kernel: {', '.join(sorted(shims))} not installed; stand-ins raise if called "
              "(only the peer's backward would call them; it is not timed)", flush=True)
    spec = importlib.util.spec_from_file_location("rcm_peer_attention", file)
    mod = importlib.util.module_from_spec(spec)
    with _modules(shims):
        spec.loader.exec_module(mod)
    if not callable(getattr(mod, "attention", None)):
        raise SystemExit(f"--peer-kernel {path}: no callable `attention(q, k, v, tq, tk, tv, sm_scale)` in it")
    return mod


def _raising_module(name: str, attrs: list[str]) -> types.ModuleType:
    mod = types.ModuleType(name)
    for attr in attrs:
        def missing(*args, _what=f"{name}.{attr}", **kwargs):
            raise RuntimeError(f"{_what} is a stand-in (package not installed); pip install it to use it")
        setattr(mod, attr, missing)
    return mod


@contextlib.contextmanager
def _modules(extra: dict):
    saved = {k: sys.modules.get(k) for k in extra}
    sys.modules.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@contextlib.contextmanager
def _env(name: str, value: str):
    """An environment variable for the calls inside (kernels.flash_jvp reads its variables at each launch)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def d64_space(space: str):
    """Our D=64 autotune space for the calls inside."""
    return _env("RCM_KERNELS_D64_SPACE", space)


def bench_shape(B: int, H: int, N: int, D: int, *, math_max_n: int, dtype=torch.bfloat16,
                peer: types.ModuleType | None = None, space: str = "narrow") -> dict:
    import triton

    from kernels.flash_jvp import _bwd, _fwd
    gen = torch.Generator(device="cuda").manual_seed(N + D)
    q, k, v, qt, kt, vt = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(6))
    flops = 12.0 * B * H * N * N * D
    row = {"B": B, "H": H, "N": N, "D": D, "d64_space": space if D == 64 else "-"}
    do_bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    with d64_space(space):
        row["ours_ms"] = do_bench(lambda: _fwd(q, k, v, qt, kt, vt))
        o, o_t = _fwd(q, k, v, qt, kt, vt)[:2]
    row["ours_tflops"] = flops / row["ours_ms"] * 1e-9
    row["peer_ms"] = row["peer_tflops"] = row["peer_err_o"] = row["peer_err_ot"] = None
    if peer is not None:
        scale = D ** -0.5
        with torch.no_grad():
            row["peer_ms"] = do_bench(lambda: peer.attention(q, k, v, qt, kt, vt, scale))
            po, pot = peer.attention(q, k, v, qt, kt, vt, scale)
        row["peer_tflops"] = flops / row["peer_ms"] * 1e-9
        row["peer_err_o"] = (po.float() - o.float()).abs().max().item()
        row["peer_err_ot"] = (pot.float() - o_t.float()).abs().max().item()
        if not all(torch.isfinite(x).all() for x in (po, pot, o, o_t)):
            raise RuntimeError(f"D={D} H={H} N={N}: non-finite output from ours or the peer; no time reported")
    row["ours_fwd_ms"] = do_bench(lambda: _fwd(q, k, v))
    row["sdpa_fwd_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
    row["x_sdpa_fwd"] = row["ours_ms"] / row["sdpa_fwd_ms"]
    row["ours_mem_mib"] = _peak_extra_mib(lambda: _fwd(q, k, v, qt, kt, vt))
    row["math_ms"] = row["math_mem_mib"] = None
    if N <= math_max_n:
        try:
            row["math_mem_mib"] = _peak_extra_mib(lambda: _math_jvp(q, k, v, qt, kt, vt))
            row["math_ms"] = _median_ms(lambda: _math_jvp(q, k, v, qt, kt, vt))
        except torch.OutOfMemoryError:
            row["math_ms"] = "OOM"
        torch.cuda.empty_cache()
    # Backward: ours from the saved lse vs SDPA's own backward (default backend), same dO.
    o, lse = _fwd(q, k, v)
    dout = torch.randn_like(o)
    row["ours_bwd_ms"] = do_bench(lambda: _bwd(dout, q, k, v, o, lse))
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    og = F.scaled_dot_product_attention(qg, kg, vg)
    row["sdpa_bwd_ms"] = do_bench(lambda: torch.autograd.grad(og, (qg, kg, vg), dout, retain_graph=True))
    # The timed gradients checked against SDPA's (both bf16; they differ by rounding, ~3e-3 relative when tuned
    # tiles are right): a tile config that computes garbage fast must not report a time.
    ours = _bwd(dout, q, k, v, o, lse)
    theirs = torch.autograd.grad(og, (qg, kg, vg), dout, retain_graph=True)
    row["bwd_max_rel_vs_sdpa"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                     for a, b in zip(ours, theirs))
    if not row["bwd_max_rel_vs_sdpa"] <= 0.03:
        raise RuntimeError(f"D={D} H={H} N={N}: our backward differs from SDPA's by {row['bwd_max_rel_vs_sdpa']:.2e} "
                           "relative (> 0.03); no time reported")
    return row


def _fmt(x, spec: str) -> str:
    return x if isinstance(x, str) else ("-" if x is None else format(x, spec))


# Issue 28's kernel bars: at head dim 64 ≥ 540 TFLOP/s fwd+JVP and at least the official kernel's speed; at every
# other head dim ahead of it; the backward within 1.15× SDPA's time everywhere.
D64_TFLOPS, PEER_SPEED, BWD_OVER_SDPA = 540.0, 1.0, 1.15


def goal_marks(r: dict) -> dict[str, bool]:
    """Which of issue 28's bars a row meets: {"tflops", "peer", "bwd"} (a bar without its number, e.g. no peer
    kernel given, or a bar that does not apply, is absent)."""
    marks = {"bwd": r["ours_bwd_ms"] / r["sdpa_bwd_ms"] <= BWD_OVER_SDPA}
    if r["D"] == 64:
        marks["tflops"] = r["ours_tflops"] >= D64_TFLOPS
    if r["peer_ms"]:
        vs_peer = r["peer_ms"] / r["ours_ms"]
        marks["peer"] = vs_peer >= PEER_SPEED if r["D"] == 64 else vs_peer > PEER_SPEED
    return marks


def table(rows: list[dict]) -> str:
    """One row per shape; a cell that meets issue 28's bar for it is marked ✓ (the bars follow the table)."""
    head = ("| D | B×H | N | D=64 space | ours fwd+JVP ms | TFLOP/s | peer fwd+JVP ms | peer TFLOP/s | ours/peer speed "
            "| max|Δo| | max|Δȯ| | SDPA fwd ms | ×SDPA fwd | ours fwd ms | MATH JVP ms "
            "| speed-up | ours extra MiB | MATH extra MiB | ours bwd ms | SDPA bwd ms | ours bwd / SDPA bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed = r["ours_ms"] and isinstance(r["math_ms"], float) and r["math_ms"] / r["ours_ms"]
        vs_peer = r["peer_ms"] / r["ours_ms"] if r["peer_ms"] else None
        met = goal_marks(r)
        tick = lambda bar: " ✓" if met.get(bar) else ""       # noqa: E731
        lines.append(
            f"| {r['D']} | {r['B']}×{r['H']} | {r['N']} | {r['d64_space']} | {r['ours_ms']:.3f} | "
            f"{r['ours_tflops']:.0f}{tick('tflops')} | {_fmt(r['peer_ms'], '.3f')} | "
            f"{_fmt(r['peer_tflops'], '.0f')} | {_fmt(vs_peer, '.2f')}{tick('peer')} | "
            f"{_fmt(r['peer_err_o'], '.1e')} | {_fmt(r['peer_err_ot'], '.1e')} | "
            f"{r['sdpa_fwd_ms']:.3f} | {r['x_sdpa_fwd']:.2f} | {r['ours_fwd_ms']:.3f} | {_fmt(r['math_ms'], '.1f')} | "
            f"{_fmt(speed or None, '.1f')} | {r['ours_mem_mib']:.0f} | {_fmt(r['math_mem_mib'], '.0f')} | "
            f"{r['ours_bwd_ms']:.3f} | {r['sdpa_bwd_ms']:.3f} | "
            f"{r['ours_bwd_ms'] / r['sdpa_bwd_ms']:.2f}{tick('bwd')} |")
    lines.append(f"\n✓ meets issue 28's bar: fwd+JVP ≥ {D64_TFLOPS:.0f} TFLOP/s at D=64; ours/peer ≥ {PEER_SPEED:.1f} "
                 f"at D=64, > {PEER_SPEED:.1f} at other head dims; ours bwd / SDPA bwd ≤ {BWD_OVER_SDPA:.2f}")
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'64:24:8192,128:12:16384' → [(D, H, N), ...]."""
    try:
        return [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: give D:H:N items, e.g. 64:24:8192,128:12:16384")


# ------------------------------------------------------------------------------- TMA A/B

def _tuned_tile(name: str) -> str:
    """The tile the autotuner picked in the last launch of kernel `name` ("-" when autotuning is off or under the
    interpreter); " WS" marks a warp-specialised backward tile."""
    from kernels import flash_jvp
    cfg = getattr(flash_jvp._current_launcher(name), "best_config", None)
    if cfg is None:
        return "-"
    return "{}x{} w{} s{}".format(*flash_jvp._tile(cfg)) + (" WS" if cfg.kwargs.get("WS") else "")


def _interleaved(sides: dict, fn, rounds: int, do_bench, tile) -> tuple[dict, dict, dict]:
    """Time `fn` under each side's environment {side: (variable, value)}, the sides interleaved over `rounds`
    rounds in one process (so clocks and neighbours drift alike). Returns each side's times, last outputs and
    the tile string `tile()` read after its last call."""
    times, outs, tiles = {side: [] for side in sides}, {}, {}
    for _ in range(rounds):
        for side, (name, value) in sides.items():
            with _env(name, value):
                times[side].append(do_bench(fn))
                outs[side] = fn()
                tiles[side] = tile()
    return times, outs, tiles


def _max_rel_diff(a_outs, b_outs) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(a_outs, b_outs))


def tma_ab(shapes: list[tuple[int, int, int]], rounds: int, device: str = "cuda") -> list[dict]:
    """Pointer loads (RCM_KERNELS_TMA=off) against TMA descriptors (auto), interleaved over `rounds` rounds in one
    process, each path autotuned on its own (TMA is part of the tuning key). Per shape and pass: the median over
    rounds of each path's do_bench median, how many rounds TMA was faster, the tiles each picked, and the largest
    difference between the two paths' outputs relative to the output's max (bf16 rounding apart; they may pick
    different tiles, which sum in another order). device "cpu": under the interpreter (TRITON_INTERPRET=1) at tiny
    shapes, TMA forced on (RCM_KERNELS_TMA=on): it proves the command and that both paths agree, and times nothing."""
    return [row for d, h, n in shapes for row in _tma_ab_shape(d, h, n, rounds, device)]


@contextlib.contextmanager
def _bwd_tma_at_every_head_dim():
    """The A/B measures the descriptor path itself, so it lifts the backward's head-dim rule (TMA only from
    TMA_BWD_MIN_HEAD_DIM up, which earlier A/Bs set): its bwd rows below that head dim say whether the rule holds."""
    from kernels import flash_jvp
    shipped = flash_jvp.TMA_BWD_MIN_HEAD_DIM
    flash_jvp.TMA_BWD_MIN_HEAD_DIM = 0
    try:
        yield
    finally:
        flash_jvp.TMA_BWD_MIN_HEAD_DIM = shipped


def _tma_ab_shape(d: int, h: int, n: int, rounds: int, device: str) -> list[dict]:
    from kernels.flash_jvp import _bwd, _fwd
    do_bench = _timer(device)
    tma_mode = "auto" if device == "cuda" else "on"
    gen = torch.Generator(device=device).manual_seed(n + d)
    q, k, v, qt, kt, vt, dout = (torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16, generator=gen)
                                 for _ in range(7))
    o, lse = _fwd(q, k, v)
    passes = {"fwd+JVP": (lambda: _fwd(q, k, v, qt, kt, vt), "_attn_fwd_jvp", 12.0),
              "fwd": (lambda: _fwd(q, k, v), "_attn_fwd_jvp", 4.0),
              "bwd": (lambda: _bwd(dout, q, k, v, o, lse), "_attn_bwd_dkdv", 10.0)}
    rows = []
    for pname, (fn, kname, flops_per) in passes.items():
        tile = lambda kname=kname, pname=pname: (_tuned_tile(kname) + (" / dq " + _tuned_tile("_attn_bwd_dq")
                                                                         if pname == "bwd" else ""))
        sides = {"off": ("RCM_KERNELS_TMA", "off"), "tma": ("RCM_KERNELS_TMA", tma_mode)}
        # Warp specialisation off on both sides: it needs TMA, so allowing it would credit its gain to TMA.
        with _bwd_tma_at_every_head_dim(), _env("RCM_KERNELS_BWD_WS", "off"):
            times, outs, tiles = _interleaved(sides, fn, rounds, do_bench, tile)
        diff = _max_rel_diff(outs["off"], outs["tma"])
        if not all(torch.isfinite(x).all() for x in (*outs["off"], *outs["tma"])) or diff > 0.03:
            raise RuntimeError(f"D={d} H={h} N={n} {pname}: outputs non-finite or TMA/pointer paths differ by "
                               f"{diff:.2e} relative (> 0.03); no time reported")
        old, new = statistics.median(times["off"]), statistics.median(times["tma"])
        flops = flops_per * h * n * n * d
        rows.append({"pass": pname, "D": d, "H": h, "N": n, "pointers_ms": old, "tma_ms": new,
                     "pointers_tflops": flops / old * 1e-9, "tma_tflops": flops / new * 1e-9,
                     "tma_over_pointers": new / old,
                     "rounds_tma_faster": sum(b < a for a, b in zip(times["off"], times["tma"])),
                     "rounds": rounds, "tile_pointers": tiles["off"], "tile_tma": tiles["tma"],
                     "max_rel_diff": diff, "times": times})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tma_table(rows: list[dict]) -> str:
    lines = [("| pass | D | H | N | pointers ms (TFLOP/s) | TMA ms (TFLOP/s) | TMA / pointers | rounds TMA faster "
              "| tiles (pointers; TMA) | max rel. diff |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pass']} | {r['D']} | {r['H']} | {r['N']} | {r['pointers_ms']:.3f} "
                     f"({r['pointers_tflops']:.0f}) | {r['tma_ms']:.3f} ({r['tma_tflops']:.0f}) | "
                     f"{r['tma_over_pointers']:.3f} | {r['rounds_tma_faster']} of {r['rounds']} | "
                     f"{r['tile_pointers']}; {r['tile_tma']} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- warp-specialised backward A/B

def ws_ab(shapes: list[tuple[int, int, int]], rounds: int, device: str = "cuda") -> list[dict]:
    """The backward with its passes' warp-specialised tiles allowed (RCM_KERNELS_BWD_WS=auto) against
    without them (off), interleaved over `rounds` rounds in one process, each side autotuned on its own (WS_OK is
    part of the tuning key), with SDPA's backward (issue 28's yardstick) timed in the same rounds. Per shape: the
    medians, the ratio, the rounds WS won, the dK/dV and dQ tiles picked (" WS" marks a warp-specialised one: with WS
    allowed the tuner may still pick a plain tile) and how far the gradients of the two sides differ. device
    "cpu": under the interpreter with TMA forced on (the WS path needs descriptors), which runs the WS data path
    (the loop hint is a compiler matter) and times nothing."""
    return [_ws_ab_shape(d, h, n, rounds, device) for d, h, n in shapes]


def _ws_ab_shape(d: int, h: int, n: int, rounds: int, device: str) -> dict:
    from kernels.flash_jvp import _bwd, _fwd
    do_bench = _timer(device)
    gen = torch.Generator(device=device).manual_seed(n + d)
    q, k, v, dout = (torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    o, lse = _fwd(q, k, v)
    fn = lambda: _bwd(dout, q, k, v, o, lse)
    tma = "auto" if device == "cuda" else "on"
    sides = {"off": ("RCM_KERNELS_BWD_WS", "off"), "ws": ("RCM_KERNELS_BWD_WS", "auto")}
    with _env("RCM_KERNELS_TMA", tma):
        times, outs, tiles = _interleaved(sides, fn, rounds, do_bench,
                                          lambda: _tuned_tile("_attn_bwd_dkdv") + " / dq " + _tuned_tile("_attn_bwd_dq"))
    sdpa_ms = vs_sdpa = None
    if device == "cuda":
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs)
        sdpa_grads = lambda: torch.autograd.grad(out, (qs, ks, vs), dout, retain_graph=True)
        sdpa_ms = statistics.median(do_bench(sdpa_grads) for _ in range(rounds))
        vs_sdpa = _max_rel_diff(outs["ws"], sdpa_grads())
    diff = _max_rel_diff(outs["off"], outs["ws"])
    if (not all(torch.isfinite(x).all() for x in (*outs["off"], *outs["ws"])) or diff > 0.03
            or (vs_sdpa is not None and vs_sdpa > 0.03)):
        raise RuntimeError(f"D={d} H={h} N={n}: gradients non-finite, or WS/plain differ by {diff:.2e}, or WS/SDPA "
                           f"by {vs_sdpa} relative (bar 0.03); no time reported")
    old, new = statistics.median(times["off"]), statistics.median(times["ws"])
    flops = 10.0 * h * n * n * d
    row = {"D": d, "H": h, "N": n, "plain_ms": old, "ws_ms": new, "plain_tflops": flops / old * 1e-9,
           "ws_tflops": flops / new * 1e-9, "ws_over_plain": new / old, "sdpa_bwd_ms": sdpa_ms,
           "ws_over_sdpa": None if sdpa_ms is None else new / sdpa_ms,
           "rounds_ws_faster": sum(b < a for a, b in zip(times["off"], times["ws"])), "rounds": rounds,
           "tile_plain": tiles["off"], "tile_ws": tiles["ws"], "max_rel_diff": diff, "ws_max_rel_vs_sdpa": vs_sdpa,
           "times": times}
    print(json.dumps(row), flush=True)
    return row


def ws_table(rows: list[dict]) -> str:
    lines = [("| D | H | N | plain ms (TFLOP/s) | WS allowed ms (TFLOP/s) | WS / plain | rounds WS faster | SDPA bwd ms "
              "| ours (WS) / SDPA | dK/dV / dQ tiles (plain; WS allowed) | max rel. diff |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sdpa = "-" if r["sdpa_bwd_ms"] is None else f"{r['sdpa_bwd_ms']:.3f}"
        ratio = "-" if r["ws_over_sdpa"] is None else f"{r['ws_over_sdpa']:.3f}"
        lines.append(f"| {r['D']} | {r['H']} | {r['N']} | {r['plain_ms']:.3f} ({r['plain_tflops']:.0f}) | "
                     f"{r['ws_ms']:.3f} ({r['ws_tflops']:.0f}) | {r['ws_over_plain']:.3f} | "
                     f"{r['rounds_ws_faster']} of {r['rounds']} | {sdpa} | {ratio} | {r['tile_plain']}; "
                     f"{r['tile_ws']} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- backward tile sweep

@contextlib.contextmanager
def _pinned_bwd_tile(kind: str, tile: tuple[int, int, int, int], ws: bool):
    """Backward pass `kind` ("dkdv" or "dq") launched with this one tile for the calls inside: the autotuner's
    space becomes that tile (one config: nothing benchmarked) and the fixed config (the interpreter) names it."""
    from kernels import flash_jvp
    name, saved, fixed = "_attn_bwd_" + kind, dict(flash_jvp._BWD_TILES), flash_jvp._fixed_config
    bm, bn, warps, stages = tile
    flash_jvp._BWD_TILES[kind], flash_jvp._BWD_TILES[kind + "_ws"] = ([], [tile]) if ws else ([tile], [])
    flash_jvp._fixed_config = lambda n, *a, **kw: (
        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "WS": ws} if n == name
        else fixed(n, *a, **kw))
    flash_jvp._launcher.cache_clear()
    try:
        yield
    finally:
        flash_jvp._BWD_TILES.clear()
        flash_jvp._BWD_TILES.update(saved)
        flash_jvp._fixed_config = fixed
        flash_jvp._launcher.cache_clear()


def parse_tiles(text: str) -> list[tuple[str, tuple[int, int, int, int], bool]]:
    """"dkdv:64x128x4x4:ws,dq:128x64x8x2" → [(pass, (BLOCK_M, BLOCK_N, warps, stages), warp-specialised)]."""
    tiles = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        try:
            if parts[0] not in ("dkdv", "dq") or len(parts) not in (2, 3) or parts[2:] not in ([], ["ws"]):
                raise ValueError
            tile = tuple(int(x) for x in parts[1].split("x"))
            if len(tile) != 4:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: write PASS:BMxBNxWARPSxSTAGES[:ws], PASS dkdv or dq, "
                                             "e.g. dkdv:64x128x4x4:ws") from None
        tiles.append((parts[0], tile, parts[2:] == ["ws"]))
    return tiles


def bwd_tiles(shapes: list[tuple[int, int, int]], rounds: int, device: str = "cuda",
              extra: tuple = ()) -> list[dict]:
    """Each backward pass's tiles in turn (its autotune space for the shape's head dim, warp-specialised tiles
    where the shape allows them, plus `extra`), the other pass held at the autotuner's pick, against the autotuned
    backward and SDPA's, interleaved over `rounds` rounds in one process. Per tile: the whole backward's median,
    its ratios to the autotuned one and to SDPA's, and how far its gradients are from the autotuned ones; a tile
    that fails to launch (shared memory, say) or gives non-finite gradients is a row with its error, no time."""
    return [row for d, h, n in shapes for row in _bwd_tiles_shape(d, h, n, rounds, device, extra)]


def _bwd_candidates(d: int, ws_ok: bool, extra) -> list[tuple[str, tuple[int, int, int, int], bool]]:
    from kernels import flash_jvp
    found = []
    for kind in ("dkdv", "dq"):
        kept = flash_jvp._prune_bwd(flash_jvp._bwd_configs(kind), None, BLOCK_D=flash_jvp._block_d(d), WS_OK=ws_ok)
        found += [(kind, flash_jvp._tile(c), bool(c.kwargs["WS"])) for c in kept]
    return found + [t for t in extra if t not in found]


def _bwd_tiles_shape(d: int, h: int, n: int, rounds: int, device: str, extra) -> list[dict]:
    from kernels import flash_jvp
    do_bench = _timer(device)
    gen = torch.Generator(device=device).manual_seed(n + d)
    q, k, v, dout = (torch.randn(1, h, n, d, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    tma = "auto" if device == "cuda" else "on"
    with _env("RCM_KERNELS_TMA", tma):
        o, lse = flash_jvp._fwd(q, k, v)
        fn = lambda: flash_jvp._bwd(dout, q, k, v, o, lse)
        want = fn()                                   # autotuned (the fixed tiles under the interpreter)
        ws_ok = flash_jvp._warp_specialise(flash_jvp._common(q, k, v, None, None), q, k, v, dout)
        picked = {kind: _picked_tile(flash_jvp, kind, d, ws_ok) for kind in ("dkdv", "dq")}
        candidates = [("autotuned", None, None)] + _bwd_candidates(d, ws_ok, extra)
        times, errors, diffs = {c: [] for c in candidates}, {}, {}
        for _ in range(rounds):
            for cand in candidates:
                if cand in errors:
                    continue
                kind, tile, ws = cand
                other = "dq" if kind == "dkdv" else "dkdv"
                with contextlib.ExitStack() as pins:
                    if tile is not None:
                        pins.enter_context(_pinned_bwd_tile(other, *picked[other]))
                        pins.enter_context(_pinned_bwd_tile(kind, tile, ws))
                    try:
                        got = fn()
                        if not all(torch.isfinite(x).all() for x in got):
                            raise RuntimeError("non-finite gradients")
                        diffs[cand] = _max_rel_diff(got, want)
                        times[cand].append(do_bench(fn))
                    except Exception as e:                  # a tile this card cannot run: say so, time the rest
                        errors[cand] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        sdpa_ms = None
        if device == "cuda":
            qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs)
            sdpa_ms = statistics.median(do_bench(lambda: torch.autograd.grad(out, (qs, ks, vs), dout,
                                                                             retain_graph=True)) for _ in range(rounds))
    base = statistics.median(times[candidates[0]])
    flops = 10.0 * h * n * n * d
    rows = []
    for cand in candidates:
        kind, tile, ws = cand
        ms = statistics.median(times[cand]) if cand not in errors else None
        row = {"D": d, "H": h, "N": n, "pass": kind, "tile": "-" if tile is None else "{}x{} w{} s{}".format(*tile),
               "ws": ws, "autotuned_pick": tile is not None and picked[kind] == (tile, ws), "ms": ms,
               "tflops": None if ms is None else flops / ms * 1e-9, "over_autotuned": None if ms is None else ms / base,
               "over_sdpa": None if ms is None or sdpa_ms is None else ms / sdpa_ms, "sdpa_bwd_ms": sdpa_ms,
               "max_rel_diff": diffs.get(cand), "error": errors.get(cand), "times": times[cand],
               "other_pass": None if tile is None else "{}x{} w{} s{}".format(*picked["dq" if kind == "dkdv" else
                                                                                      "dkdv"][0])}
        if row["error"] is None and row["max_rel_diff"] > 0.03:
            row["error"], row["ms"] = f"gradients {row['max_rel_diff']:.1e} from the autotuned ones (bar 0.03)", None
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _picked_tile(flash_jvp, kind: str, d: int, ws_ok: bool) -> tuple[tuple[int, int, int, int], bool]:
    """The tile pass `kind` ran with in the last launch: the autotuner's pick, or the fixed config without one."""
    cfg = getattr(flash_jvp._current_launcher("_attn_bwd_" + kind), "best_config", None)
    if cfg is not None:
        return flash_jvp._tile(cfg), bool(cfg.kwargs["WS"])
    cfg = flash_jvp._fixed_config("_attn_bwd_" + kind, flash_jvp._block_d(d), False, ws_ok)
    return (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.get("num_warps", 4), cfg.get("num_stages", 1)), cfg["WS"]


def bwd_tiles_table(rows: list[dict]) -> str:
    lines = ["| D | H | N | pass | tile | WS | backward ms (TFLOP/s) | ÷ autotuned | ÷ SDPA's | max rel. diff | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f} ({r['tflops']:.0f})"
        ratio = lambda x: "-" if x is None else f"{x:.3f}"
        note = r["error"] or ("the autotuner's pick" if r["autotuned_pick"] else "")
        diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        lines.append(f"| {r['D']} | {r['H']} | {r['N']} | {r['pass']} | {r['tile']} | {'WS' if r['ws'] else ''} | "
                     f"{ms} | {ratio(r['over_autotuned'])} | {ratio(r['over_sdpa'])} | {diff} | {note} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- block-causal rows

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Model FLOPs per attended (q, k) pair and head dim, as in the table above: forward 2 GEMMs (4), fwd+JVP 6 (12),
# backward 2.5× the forward (10, the FA2 convention; our two-pass backward recomputes QKᵀ once more).
_FLOPS_PER_PAIR_D = {"fwd+JVP": 12.0, "fwd": 4.0, "bwd": 10.0}


def parse_chunks(spec: str) -> tuple[int, ...]:
    """'21x1560' -> 21 chunks of 1560 tokens; '3x40,1x8' -> (40, 40, 40, 8); '500,77' -> (500, 77)."""
    sizes: list[int] = []
    for part in spec.split(","):
        n, _, size = part.partition("x")
        sizes += [int(size)] * int(n) if size else [int(n)]
    return tuple(sizes)


def attended_pairs(chunks: tuple[int, ...]) -> int:
    """(query, key) pairs a block-causal mask lets through: chunk i's queries see the keys of chunks 0..i."""
    seen, pairs = 0, 0
    for c in chunks:
        seen += c
        pairs += c * seen
    return pairs


def tile_counts(chunks: tuple[int, ...], block_m: int, block_n: int) -> tuple[int, int, int]:
    """(full, partial, all) key tiles over the forward's query tiles, by the kernel's own loop bounds: a query
    tile loads key tiles up to its last row's chunk end, and those below its first row's end need no mask."""
    ends = [e for i, c in enumerate(chunks) for e in [sum(chunks[:i + 1])] * c]
    L = len(ends)
    full = partial = 0
    for m0 in range(0, L, block_m):
        lo, hi = ends[m0], ends[min(m0 + block_m, L) - 1]
        n_full = lo // block_n
        full += n_full
        partial += -(-hi // block_n) - n_full
    return full, partial, -(-L // block_m) * -(-L // block_n)


def _timer(device: str):
    if device == "cuda":
        import triton
        return lambda fn: triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")

    def cpu_ms(fn, reps: int = 3) -> float:        # the interpreter: proves the command runs, times nothing real
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_ms


def _fwd_tile_shape(device: str) -> tuple[int, int]:
    """The (BLOCK_M, BLOCK_N) the latest fwd+JVP launch ran with: the autotuner's pick on the GPU, else the
    fixed config."""
    from kernels import flash_jvp as katt
    if device == "cuda" and katt._autotune():
        # `_current_launcher`: the launcher `_run` used (its cache key includes the D=64 space; asking `_launcher`
        # with fewer arguments reads another, never-run tuner and fell back to the fixed tile).
        best = getattr(katt._current_launcher("_attn_fwd_jvp"), "best_config", None)
        if best is not None:
            return best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"]
    cfg = katt._fixed_config("_attn_fwd_jvp", 128, False)
    return cfg["BLOCK_M"], cfg["BLOCK_N"]


def bench_block_causal(chunks: tuple[int, ...], H: int, D: int, dtype: torch.dtype, device: str) -> list[dict]:
    """Rows (fwd+JVP, fwd, bwd): unmasked vs block-causal time, speed-up, TFLOP/s on attended pairs."""
    from kernels.flash_jvp import _bwd, _fwd
    L = sum(chunks)
    gen = torch.Generator(device=device).manual_seed(L + D)
    q, k, v, qt, kt, vt, do = (torch.randn(1, H, L, D, device=device, dtype=dtype, generator=gen) for _ in range(7))
    time_ms = _timer(device)
    o_full, lse_full = _fwd(q, k, v)
    o_bc, lse_bc = _fwd(q, k, v, chunk_sizes=chunks)
    passes = {
        "fwd+JVP": (lambda: _fwd(q, k, v, qt, kt, vt), lambda: _fwd(q, k, v, qt, kt, vt, chunk_sizes=chunks)),
        "fwd": (lambda: _fwd(q, k, v), lambda: _fwd(q, k, v, chunk_sizes=chunks)),
        "bwd": (lambda: _bwd(do, q, k, v, o_full, lse_full),
                lambda: _bwd(do, q, k, v, o_bc, lse_bc, chunk_sizes=chunks)),
    }
    pairs_full, pairs_bc = float(L) * L, float(attended_pairs(chunks))
    rows = []
    for name, (full_fn, bc_fn) in passes.items():
        full_ms, bc_ms = time_ms(full_fn), time_ms(bc_fn)
        if name == "fwd+JVP":
            bm, bn = _fwd_tile_shape(device)        # read now: the tuner's best_config is its latest launch
        per_ms = _FLOPS_PER_PAIR_D[name] * H * D * 1e-9          # TFLOP/s = pairs·flops / (ms·1e9)
        rows.append({"pass": name, "device": device, "L": L, "chunks": len(chunks), "H": H, "D": D, "dtype": str(dtype).split(".")[-1],
                     "unmasked_ms": full_ms, "block_causal_ms": bc_ms, "speedup": full_ms / bc_ms,
                     "unmasked_tflops": pairs_full * per_ms / full_ms, "block_causal_tflops": pairs_bc * per_ms / bc_ms,
                     "attended_share": pairs_bc / pairs_full})
    full, partial, total = tile_counts(chunks, bm, bn)
    for r in rows:
        r.update({"fwd_tile": f"{bm}x{bn}", "tiles_loaded_share": (full + partial) / total,
                  "tiles_masked_share": partial / total})
    # Sanity on the timed outputs: the last chunk sees every key (equal to the unmasked pass there), and the first
    # chunk equals the unmasked kernel over its own tokens.
    c0, cl = chunks[0], chunks[-1]
    o_first, _ = _fwd(q[:, :, :c0], k[:, :, :c0], v[:, :, :c0])
    check = max((o_bc[:, :, L - cl:] - o_full[:, :, L - cl:]).abs().max().item(),
                (o_bc[:, :, :c0] - o_first).abs().max().item())
    for r in rows:
        r["check_max_abs_diff"] = check
    return rows


def block_causal_table(rows: list[dict], bar: float = 1.7) -> str:
    head = ("| pass | L (chunks) | H×D | unmasked ms | block-causal ms | speed-up | unmasked TFLOP/s | "
            "block-causal TFLOP/s (attended pairs) | key tiles loaded / masked (fwd tile) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['pass']} | {r['L']} ({r['chunks']}) | {r['H']}×{r['D']} | {r['unmasked_ms']:.3f} | "
                     f"{r['block_causal_ms']:.3f} | {r['speedup']:.2f}× | {r['unmasked_tflops']:.3g} | "
                     f"{r['block_causal_tflops']:.3g} | {r['tiles_loaded_share']:.1%} / {r['tiles_masked_share']:.1%} "
                     f"({r['fwd_tile']}) |")
    jvp = next(r for r in rows if r["pass"] == "fwd+JVP")
    verdict = ("not judged: interpreter timings" if jvp["device"] != "cuda"
               else "met" if jvp["speedup"] >= bar else "MISSED")
    lines.append(f"\nattended pairs: {jvp['attended_share']:.1%} of L²; fwd+JVP speed-up {jvp['speedup']:.2f}× "
                 f"(bar ≥ {bar}×: {verdict}); check: block-causal vs unmasked on the first and last chunk, "
                 f"max |Δ| = {jvp['check_max_abs_diff']:.3g}")
    return "\n".join(lines)


def main_block_causal(args, n_heads: int) -> None:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not interpret and not torch.cuda.is_available():
        raise SystemExit("error: --block-causal needs a CUDA GPU, or TRITON_INTERPRET=1 for the CPU interpreter")
    device = "cpu" if interpret else "cuda"
    chunks = parse_chunks(args.chunks)
    card = "CPU, Triton interpreter" if interpret else torch.cuda.get_device_name()
    print(f"# {card} torch {torch.__version__} triton {__import__('triton').__version__} {args.dtype}; "
          f"chunks {args.chunks} = {len(chunks)} chunks, {sum(chunks)} tokens", flush=True)
    rows = bench_block_causal(chunks, n_heads, args.dim, _DTYPES[args.dtype], device)
    print(block_causal_table(rows))
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "block_causal_bench.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"csv: {path}")


def _main_ab(shapes, rounds: int, option: str, run, fmt) -> None:
    """One A/B command: the rows, their table, and both as kernels_<tma|ws>_ab.{json,md} in $OUT when set."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not interpret and not torch.cuda.is_available():
        raise SystemExit(f"error: {option} needs a CUDA GPU, or TRITON_INTERPRET=1 for the CPU interpreter")
    stem = "kernels_" + option.strip("-").replace("-", "_")
    card = ("CPU, Triton interpreter (TMA forced on; timings say nothing)" if interpret
            else torch.cuda.get_device_name())
    print(f"# {card} torch {torch.__version__} triton {__import__('triton').__version__} bf16", flush=True)
    rows = run(shapes, rounds, "cpu" if interpret else "cuda")
    print(fmt(rows))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"{stem}.json").write_text(json.dumps(rows, indent=1))
        (Path(os.environ["OUT"]) / f"{stem}.md").write_text(fmt(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-causal", action="store_true", help="only the block-causal vs unmasked rows")
    ap.add_argument("--chunks", default="21x1560", help="block-causal chunk sizes, e.g. 21x1560 or 3x40,1x8")
    ap.add_argument("--dim", type=int, default=128, help="head dim of the block-causal rows")
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES), help="dtype of the block-causal rows")
    ap.add_argument("--seqs", default="1024,4096,8192,16384,32768")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", default="64:24,128:12", help="head count per head dim (B=1)")
    ap.add_argument("--math-max-n", type=int, default=16384, help="largest N to try the MATH JVP at")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="D:H:N items (B=1) instead of the --dims × --seqs grid, e.g. 64:24:8192,128:12:16384")
    ap.add_argument("--peer-kernel", default=None, metavar="PATH",
                    help="the official rCM Triton kernel file (flash_attention_jvp_triton.py) to time beside ours")
    ap.add_argument("--d64-space", choices=["narrow", "wide", "both"], default="wide",
                    help="our D=64 autotune space (both: one row each, same process)")
    ap.add_argument("--tma-ab", type=int, default=0, metavar="ROUNDS",
                    help="only the A/B of pointer loads against TMA descriptors on --shapes, ROUNDS interleaved rounds")
    ap.add_argument("--ws-ab", type=int, default=0, metavar="ROUNDS",
                    help="only the A/B of the backward with and without warp-specialised tiles on --shapes")
    ap.add_argument("--bwd-tiles", type=int, default=0, metavar="ROUNDS",
                    help="only the backward on --shapes, each pass's tiles in turn (the other at the autotuner's "
                         "pick), ROUNDS interleaved rounds")
    ap.add_argument("--extra-tiles", type=parse_tiles, default=[], metavar="TILES",
                    help="--bwd-tiles: tiles beyond the autotune space, e.g. dkdv:64x128x4x4:ws,dq:128x128x4x2:ws")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    heads = dict(map(int, kv.split(":")) for kv in args.heads.split(","))
    if args.block_causal:
        if args.dim not in heads:
            raise SystemExit(f"error: --heads {args.heads} names no head count for --dim {args.dim}: add {args.dim}:H")
        return main_block_causal(args, heads[args.dim])
    shapes = args.shapes or [(d, heads[d], n) for d in map(int, args.dims.split(","))
                             for n in map(int, args.seqs.split(","))]
    for rounds, option, run, fmt in ((args.tma_ab, "--tma-ab", tma_ab, tma_table),
                                     (args.ws_ab, "--ws-ab", ws_ab, ws_table),
                                     (args.bwd_tiles, "--bwd-tiles",
                                      lambda *a: bwd_tiles(*a, extra=tuple(args.extra_tiles)), bwd_tiles_table)):
        if rounds:
            return _main_ab(shapes, rounds, option, run, fmt)
    peer = load_peer(args.peer_kernel) if args.peer_kernel else None
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {__import__('triton').__version__} bf16", flush=True)
    rows = []
    spaces = ["narrow", "wide"] if args.d64_space == "both" else [args.d64_space]
    for d, h, n in shapes:
        for space in (spaces if d == 64 else ["narrow"]):
            rows.append(bench_shape(1, h, n, d, math_max_n=args.math_max_n, peer=peer, space=space))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    out = os.environ.get("OUT")
    if args.json or out:
        path = args.json or str(Path(out) / "kernels_bench.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        if out:
            (Path(out) / "kernels_bench.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
