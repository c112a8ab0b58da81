"""Benchmark of the fused attention forward+JVP kernel against PyTorch on one CUDA GPU (bf16).

Run: `python -m kernels.bench [--seqs 1024,4096,...] [--json FILE]`. Prints one markdown table:
  ours fwd+JVP (ms, TFLOP/s at 12·B·H·Lq·Lk·D), SDPA forward (default backend, cuDNN/flash on H100) and our
  time as a multiple of it, our forward-only pass, torch.func.jvp over the MATH backend (ms or OOM) and our
  speed-up, peak extra memory of ours and of MATH, and our backward against SDPA's backward.
Timings are triton.testing.do_bench medians (CUDA events); MATH runs use 1 warm-up + 3 timed runs.
"""
from __future__ import annotations

import argparse
import json
import statistics

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


def bench_shape(B: int, H: int, N: int, D: int, *, math_max_n: int, dtype=torch.bfloat16) -> dict:
    import triton

    from kernels.flash_jvp import _bwd, _fwd
    gen = torch.Generator(device="cuda").manual_seed(N + D)
    q, k, v, qt, kt, vt = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(6))
    flops = 12.0 * B * H * N * N * D
    row = {"B": B, "H": H, "N": N, "D": D}
    do_bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    row["ours_ms"] = do_bench(lambda: _fwd(q, k, v, qt, kt, vt))
    row["ours_tflops"] = flops / row["ours_ms"] * 1e-9
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
    return row


def _fmt(x, spec: str) -> str:
    return x if isinstance(x, str) else ("-" if x is None else format(x, spec))


def table(rows: list[dict]) -> str:
    head = ("| D | B×H | N | ours fwd+JVP ms | TFLOP/s | SDPA fwd ms | ×SDPA fwd | ours fwd ms | MATH JVP ms "
            "| speed-up | ours extra MiB | MATH extra MiB | ours bwd ms | SDPA bwd ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed = r["ours_ms"] and isinstance(r["math_ms"], float) and r["math_ms"] / r["ours_ms"]
        lines.append(
            f"| {r['D']} | {r['B']}×{r['H']} | {r['N']} | {r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | "
            f"{r['sdpa_fwd_ms']:.3f} | {r['x_sdpa_fwd']:.2f} | {r['ours_fwd_ms']:.3f} | {_fmt(r['math_ms'], '.1f')} | "
            f"{_fmt(speed or None, '.1f')} | {r['ours_mem_mib']:.0f} | {_fmt(r['math_mem_mib'], '.0f')} | "
            f"{r['ours_bwd_ms']:.3f} | {r['sdpa_bwd_ms']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,4096,8192,16384,32768")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", default="64:24,128:12", help="head count per head dim (B=1)")
    ap.add_argument("--math-max-n", type=int, default=16384, help="largest N to try the MATH JVP at")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    heads = dict(map(int, kv.split(":")) for kv in args.heads.split(","))
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {__import__('triton').__version__} bf16", flush=True)
    rows = []
    for d in map(int, args.dims.split(",")):
        for n in map(int, args.seqs.split(",")):
            rows.append(bench_shape(1, heads[d], n, d, math_max_n=args.math_max_n))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
