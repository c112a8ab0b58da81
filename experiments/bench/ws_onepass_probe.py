"""Can Triton's Hopper warp specialisation run a one-pass attention backward? A compile probe for sm_90, on the CPU.

Run: `python experiments/bench/ws_onepass_probe.py` (in its own process, as kernel_registers.py: Triton must not
be in interpreter mode; ~1 min). Prints one row per head dim × tile × way of writing dQ: the warp-specialised loop
and, as the control, the same loop plain, each with ptxas's report where it compiles and the failing compiler
pass where it does not.

Why (issue 28): our backward runs two passes (dK/dV, then dQ), 7 tile GEMMs per query × key tile pair where
FlashAttention's one pass runs 5 and adds each tile's dQ share into an fp32 buffer. Both one-pass attempts on the
plain path lost on the H200 (register pressure; 2026-12-04), and FlashAttention-3 does it with warp-specialised
groups. `kernels/_triton_attention.py` warp-specialises each pass separately; this asks whether the dK/dV loop
can also add dQ once it is warp-specialised. The kernel here is the dK/dV loop reduced to what the question
needs (descriptor loads only, as the pass requires; no masks, no chunks, even lengths), not a second copy of the
project's kernel: it is never launched.

dQ is written four ways: not at all (the two-pass loop), a TMA bulk reduce-add through a descriptor
(`desc.atomic_add`, `cp.reduce.async.bulk.tensor`), per-element pointer atomics, and a plain descriptor store
(numerically wrong, it overwrites; there only to show which part of a reduce-add the pass refuses). Result with
Triton 3.6.0 (2026-12-05, docs/BENCHMARKS.md "Lever 5, warp specialisation"): every plain loop compiles; every
warp-specialised loop that writes dQ by a reduce-add fails in the NVGPUWarpSpecialization pass.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.bench.kernel_registers import ptxas_report

_LOG2E = tl.constexpr(1.4426950408889634)
DQ_WRITES = ("none", "tma_reduce", "pointer_atomic", "tma_store")


@triton.jit
def _write_dq(DQ, dq_desc, dq, bh, start_m, LQ, BLOCK_M: tl.constexpr, D: tl.constexpr, DQ_WRITE: tl.constexpr):
    if DQ_WRITE == "tma_reduce":
        dq_desc.atomic_add([start_m, 0], dq)
    elif DQ_WRITE == "pointer_atomic":
        rows = start_m + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        tl.atomic_add(DQ + bh * LQ * D + rows[:, None] * D + cols[None, :], dq, sem="relaxed")
    elif DQ_WRITE == "tma_store":
        dq_desc.store([start_m, 0], dq)


@triton.jit
def _dkdv_loop(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, LQ, LK, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DQ_WRITE: tl.constexpr,
               WS: tl.constexpr):
    """dK, dV of BLOCK_N keys over every query tile (FA2's recomputation of Pᵀ from lse); with DQ_WRITE other
    than "none", each tile's dQ share scale·dS·K (dS = ds_tᵀ) is written as that mode says."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    k_desc = tl.make_tensor_descriptor(K + bh * LK * D, shape=[LK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + bh * LK * D, shape=[LK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    q_desc = tl.make_tensor_descriptor(Q + bh * LQ * D, shape=[LQ, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    do_desc = tl.make_tensor_descriptor(DO + bh * LQ * D, shape=[LQ, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    lse_desc = tl.make_tensor_descriptor(LSE + bh * LQ, shape=[LQ], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA + bh * LQ, shape=[LQ], strides=[1], block_shape=[BLOCK_M])
    dq_desc = tl.make_tensor_descriptor(DQ + bh * LQ * D, shape=[LQ, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    k = k_desc.load([pid_n * BLOCK_N, 0])
    v = v_desc.load([pid_n * BLOCK_N, 0])
    qk_scale = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for start_m in tl.range(0, LQ, BLOCK_M, warp_specialize=WS):
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        lse = lse_desc.load([start_m]) * _LOG2E
        delta = delta_desc.load([start_m])
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(q.dtype), do, dv)
        ds_t = (p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
        if DQ_WRITE != "none":
            _write_dq(DQ, dq_desc, tl.dot(tl.trans(ds_t), k) * scale, bh, start_m, LQ, BLOCK_M, D, DQ_WRITE)
    dk_desc = tl.make_tensor_descriptor(DK + bh * LK * D, shape=[LK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    dv_desc = tl.make_tensor_descriptor(DV + bh * LK * D, shape=[LK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    dk_desc.store([pid_n * BLOCK_N, 0], (dk * scale).to(tl.bfloat16))
    dv_desc.store([pid_n * BLOCK_N, 0], dv.to(tl.bfloat16))


def _failing_pass(stderr_text: str) -> str:
    # MLIR prints which pass failed to the process's stderr (C++), not into the Python exception.
    m = re.search(r"Pipeline failed while executing \[`([^`]+)`", stderr_text)
    return m[1] if m else "unknown pass"


def compile_probe(d: int, tile: tuple[int, int, int, int], dq_write: str, ws: bool) -> dict:
    """Compile one variant for sm_90: ptxas's report, or which compiler pass failed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bm, bn, warps, stages = tile
    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
                "DK": "*bf16", "DV": "*bf16", "DQ": "*fp32", "LQ": "i32", "LK": "i32"}
    const = {"BLOCK_M": bm, "BLOCK_N": bn, "D": d, "DQ_WRITE": dq_write, "WS": ws}
    sig = {**pointers, "scale": "fp32", **{name: "constexpr" for name in const}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers))}
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            compiled = triton.compile(ASTSource(_dkdv_loop, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps, "num_stages": stages})
        except RuntimeError:  # the MLIR pipeline's failure is the finding (a front-end error raises)
            log.seek(0)
            return {"ok": False, "error": f"fails in {_failing_pass(log.read())}"}
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return {"ok": True, **ptxas_report(compiled.asm["ptx"]), "shared": compiled.metadata.shared,
            "warps": compiled.metadata.num_warps, "warp_specialized": "ttg.warp_specialize" in compiled.asm["ttgir"]}


def _cell(r: dict) -> str:
    if not r["ok"]:
        return f"**no**: {r['error']}"
    ws = " (WS)" if r["warp_specialized"] else ""
    return (f"{r['regs']} regs, spills {r['spill_st']}/{r['spill_ld']} B, {r['shared'] / 1024:.1f} KiB, "
            f"{r['warps']} warps{ws}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--tiles", default="64x128x4x2,64x64x4x3", help="BMxBNxWxS items (4 warps: the WS tiles)")
    ap.add_argument("--dq", default=",".join(DQ_WRITES), help=f"any of {', '.join(DQ_WRITES)}")
    args = ap.parse_args(argv)
    print("| D | BLOCK_M×BLOCK_N, warps, stages | dQ written by | warp-specialised loop | plain loop (control) |\n"
          "|---|---|---|---|---|", flush=True)
    rows = []
    for d in map(int, args.dims.split(",")):
        for tile in (tuple(map(int, t.split("x"))) for t in args.tiles.split(",")):
            for dq_write in args.dq.split(","):
                ws, plain = (compile_probe(d, tile, dq_write, flag) for flag in (True, False))
                rows.append({"D": d, "tile": tile, "dq": dq_write, "ws": ws, "plain": plain})
                print(f"| {d} | {tile[0]}×{tile[1]}, {tile[2]}, {tile[3]} | {dq_write} | {_cell(ws)} | {_cell(plain)} |",
                      flush=True)
    return rows


if __name__ == "__main__":
    main()
