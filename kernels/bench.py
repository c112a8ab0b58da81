"""Benchmark of the fused attention forward+JVP kernel against PyTorch on one CUDA GPU (bf16).

Run: `python -m kernels.bench [--seqs 1024,4096,...] [--json FILE]`. Prints one markdown table:
  ours fwd+JVP (ms, TFLOP/s at 12·B·H·Lq·Lk·D), SDPA forward (default backend, cuDNN/flash on H100) and our
  time as a multiple of it, our forward-only pass, torch.func.jvp over the MATH backend (ms or OOM) and our
  speed-up, peak extra memory of ours and of MATH, and our backward against SDPA's backward.
Timings are triton.testing.do_bench medians (CUDA events); MATH runs use 1 warm-up + 3 timed runs.

Against the official rCM kernel, one command (issue 28; the file is never committed: keep it in the
git-ignored .gpu/ folder):

    python3 -m kernels.bench --shapes 64:24:8192,128:12:8192,128:12:16384,128:12:32768,128:40:16384 \
        --math-max-n 0 --peer-kernel .gpu/peer/flash_attention_jvp_triton.py --d64-space both

`--peer-kernel PATH` loads NVlabs/rcm's `rcm/utils/flash_attention_jvp_triton.py` (entry point
`attention(q, k, v, tq, tk, tv, sm_scale) -> (o, to)`, its `_attention.apply`) and adds its fwd+JVP time,
TFLOP/s, ours/peer speed and the max |o − o_peer|, |ȯ − ȯ_peer| (the two must compute the same thing).
`--d64-space both` times our D=64 rows twice, with the default autotune space and with the wide one
(RCM_KERNELS_D64_SPACE=wide, kernels/flash_jvp.py), in the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
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
def d64_space(space: str):
    """Our D=64 autotune space for the calls inside (kernels.flash_jvp reads the variable at each launch)."""
    old = os.environ.get("RCM_KERNELS_D64_SPACE")
    os.environ["RCM_KERNELS_D64_SPACE"] = space
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RCM_KERNELS_D64_SPACE")
        else:
            os.environ["RCM_KERNELS_D64_SPACE"] = old


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
    return row


def _fmt(x, spec: str) -> str:
    return x if isinstance(x, str) else ("-" if x is None else format(x, spec))


def table(rows: list[dict]) -> str:
    head = ("| D | B×H | N | D=64 space | ours fwd+JVP ms | TFLOP/s | peer fwd+JVP ms | peer TFLOP/s | ours/peer speed "
            "| max|Δo| | max|Δȯ| | SDPA fwd ms | ×SDPA fwd | ours fwd ms | MATH JVP ms "
            "| speed-up | ours extra MiB | MATH extra MiB | ours bwd ms | SDPA bwd ms | ours bwd / SDPA bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        speed = r["ours_ms"] and isinstance(r["math_ms"], float) and r["math_ms"] / r["ours_ms"]
        vs_peer = r["peer_ms"] / r["ours_ms"] if r["peer_ms"] else None
        lines.append(
            f"| {r['D']} | {r['B']}×{r['H']} | {r['N']} | {r['d64_space']} | {r['ours_ms']:.3f} | "
            f"{r['ours_tflops']:.0f} | {_fmt(r['peer_ms'], '.3f')} | {_fmt(r['peer_tflops'], '.0f')} | "
            f"{_fmt(vs_peer, '.2f')} | {_fmt(r['peer_err_o'], '.1e')} | {_fmt(r['peer_err_ot'], '.1e')} | "
            f"{r['sdpa_fwd_ms']:.3f} | {r['x_sdpa_fwd']:.2f} | {r['ours_fwd_ms']:.3f} | {_fmt(r['math_ms'], '.1f')} | "
            f"{_fmt(speed or None, '.1f')} | {r['ours_mem_mib']:.0f} | {_fmt(r['math_mem_mib'], '.0f')} | "
            f"{r['ours_bwd_ms']:.3f} | {r['sdpa_bwd_ms']:.3f} | {r['ours_bwd_ms'] / r['sdpa_bwd_ms']:.2f} |")
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'64:24:8192,128:12:16384' → [(D, H, N), ...]."""
    try:
        return [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: give D:H:N items, e.g. 64:24:8192,128:12:16384")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,4096,8192,16384,32768")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", default="64:24,128:12", help="head count per head dim (B=1)")
    ap.add_argument("--math-max-n", type=int, default=16384, help="largest N to try the MATH JVP at")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="D:H:N items (B=1) instead of the --dims × --seqs grid, e.g. 64:24:8192,128:12:16384")
    ap.add_argument("--peer-kernel", default=None, metavar="PATH",
                    help="the official rCM Triton kernel file (flash_attention_jvp_triton.py) to time beside ours")
    ap.add_argument("--d64-space", choices=["narrow", "wide", "both"], default="narrow",
                    help="our D=64 autotune space (both: one row each, same process)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    heads = dict(map(int, kv.split(":")) for kv in args.heads.split(","))
    shapes = args.shapes or [(d, heads[d], n) for d in map(int, args.dims.split(","))
                             for n in map(int, args.seqs.split(","))]
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
