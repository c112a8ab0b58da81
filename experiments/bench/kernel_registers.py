"""Registers, spills and shared memory of the attention kernels compiled for sm_90, on a machine without a GPU.

Run: `python experiments/bench/kernel_registers.py [--dims 64,128] [--kernels fwd_jvp,fwd,dkdv,dq,dkdv_ws,dq_ws] [--tma both]`
(in its own process: Triton must not have been imported in interpreter mode, as the CPU test suite does).
Triton compiles ahead of time for a target it is told (here an H100/H200, sm_90, 128 threads per warp group) and
ships ptxas, so the register picture of every tile in the autotune spaces of kernels/flash_jvp.py comes from one
CPU command: ptxas's own report (registers per thread, spill stores and loads, bytes) and Triton's shared memory.
Why (issue 28): at head dim 64 two changes that removed floating-point work made the forward slower (−4 %, −16 %);
what decides there is where the 128×128 tile's values live, and this prints it without spending device time.

`--kernels dkdv_ws,dq_ws` compiles the backward passes' warp-specialised tiles (the WS path: descriptor loads only)
and says in its last column whether Triton's Hopper pass split the kernel into warp groups (12 warps for 4 asked).

Each row is one kernel × head dim × tile × load path (pointer loads, or TMA descriptors: RCM_KERNELS_TMA). The
kernel is specialised as the launcher specialises it for an unmasked bf16 call at even lengths (every length and
row stride a multiple of 16, as at the bench's power-of-two shapes); `--ragged` compiles it for lengths no tile
divides and no multiple of 16 (Wan's 32,760 and 8,190 tokens). What it cannot say: the time. A tile without
spills can still be slower; the GPU A/B (`python -m kernels.bench --tma-ab`) measures that.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kernels import flash_jvp

# kernel name → (Triton function, extra constexprs, tiles, prune)
_POINTERS_F32 = {"LSE", "LSET", "DELTA"}
_UNALIGNED_INTS = {"H", "LQ_KEY", "LK_KEY"}          # not specialised as multiples of 16 (H = 12, 24, 40 ...)


def _kernel_table():
    return {
        "fwd_jvp": ("_attn_fwd_jvp", {"HAS_TANGENT": True}, flash_jvp._FWD_TILES + flash_jvp._WIDE_D64_TILES,
                    flash_jvp._prune_fwd),
        "fwd": ("_attn_fwd_jvp", {"HAS_TANGENT": False}, flash_jvp._FWD_TILES + flash_jvp._WIDE_D64_TILES,
                flash_jvp._prune_fwd),
        "dkdv": ("_attn_bwd_dkdv", {"WS_OK": False, "WS": False}, flash_jvp._BWD_TILES["dkdv"], flash_jvp._prune_bwd),
        "dkdv_ws": ("_attn_bwd_dkdv", {"WS_OK": True, "WS": True}, flash_jvp._BWD_TILES["dkdv_ws"],
                    flash_jvp._prune_bwd),
        "dq": ("_attn_bwd_dq", {"WS_OK": False, "WS": False}, flash_jvp._BWD_TILES["dq"], flash_jvp._prune_bwd),
        "dq_ws": ("_attn_bwd_dq", {"WS_OK": True, "WS": True}, flash_jvp._BWD_TILES["dq_ws"], flash_jvp._prune_bwd),
    }


def _signature(fn, const: dict, ragged: bool = False) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        if name == "scale":
            sig[name] = "fp32"
        elif name.isupper() and name not in ("H", "LQ", "LK", "D", "LQ_KEY", "LK_KEY"):
            sig[name] = "*fp32" if name in _POINTERS_F32 else "*bf16"
        else:
            sig[name] = "i32"
        if name not in _UNALIGNED_INTS and name != "scale" and not (ragged and name in ("LQ", "LK", "s_stat")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_report(ptx: str) -> dict:
    """ptxas -v on the kernel's PTX for sm_90a: registers, spill stores/loads (bytes)."""
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        err = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return {"regs": int(regs[1]), "spill_st": int(spill[1]), "spill_ld": int(spill[2])}


def compile_tile(kernel: str, d: int, tile: tuple[int, int, int, int], tma: bool, ragged: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, extra, _, _ = _kernel_table()[kernel]
    fn = flash_jvp._kernels(False).__dict__[name]
    bm, bn, warps, stages = tile
    const = {"HAS_MASK": False, "HAS_CHUNKS": False, "UPCAST": False, "PREC": "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
             "BLOCK_D": d, "EVEN_M": not ragged, "EVEN_N": not ragged, "EVEN_D": True, "TMA": tma, **extra}
    sig, attrs = _signature(fn, const, ragged)
    compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    # A warp-specialised kernel launches more warps than asked (its producer and consumer groups).
    return {**ptxas_report(compiled.asm["ptx"]), "shared": compiled.metadata.shared,
            "warps": compiled.metadata.num_warps, "warp_specialized": "ttg.warp_specialize" in compiled.asm["ttgir"]}


def tiles_for(kernel: str, d: int) -> list[tuple[int, int, int, int]]:
    """The tiles the autotuner would try for this kernel and head dim (its own prune)."""
    import triton
    _, extra, tiles, prune = _kernel_table()[kernel]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WS": extra.get("WS", False)}, num_warps=w, num_stages=s)
               for bm, bn, w, s in tiles]
    kept = prune(configs, None, BLOCK_D=d, HAS_TANGENT=extra.get("HAS_TANGENT", False), WS_OK=extra.get("WS_OK"))
    return [flash_jvp._tile(c) for c in kept]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128", help="head dims")
    ap.add_argument("--kernels", default="fwd_jvp,fwd,dkdv,dq",
                    help="any of fwd_jvp, fwd, dkdv, dq, dkdv_ws, dq_ws (the last two: warp-specialised tiles)")
    ap.add_argument("--tma", choices=["off", "on", "both"], default="both", help="load path(s) to compile")
    ap.add_argument("--tiles", default=None, help="BMxBNxWxS items, e.g. 128x128x8x3 (default: the autotune space)")
    ap.add_argument("--ragged", action="store_true",
                    help="compile for lengths no tile divides (EVEN_M = EVEN_N = False: masked tails), not even ones")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(_kernel_table()))
    if unknown:
        raise SystemExit(f"error: --kernels {unknown}: use fwd_jvp, fwd, dkdv, dq, dkdv_ws or dq_ws")
    paths = {"off": [False], "on": [True], "both": [False, True]}[args.tma]
    print("| kernel | D | BLOCK_M×BLOCK_N, warps, stages | loads | registers | spill stores B | spill loads B "
          "| shared KiB | warps launched |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for kernel in kernels:
        for d in map(int, args.dims.split(",")):
            tiles = ([tuple(map(int, t.split("x"))) for t in args.tiles.split(",")] if args.tiles
                     else tiles_for(kernel, d))
            for tile in tiles:
                for tma in paths:
                    r = {"kernel": kernel, "D": d, "tile": tile, "tma": tma, "ragged": args.ragged,
                         **compile_tile(kernel, d, tile, tma, args.ragged)}
                    rows.append(r)
                    print(f"| {kernel} | {d} | {tile[0]}×{tile[1]}, {tile[2]}, {tile[3]} | "
                          f"{'TMA' if tma else 'pointers'} | {r['regs']} | {r['spill_st']} | {r['spill_ld']} | "
                          f"{r['shared'] / 1024:.1f} | {r['warps']}{' (WS)' if r['warp_specialized'] else ''} |",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
