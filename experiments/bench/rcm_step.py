"""Cost of one rCM iteration at Wan2.1-1.3B shape on one GPU (issue 9). Prints one table.

    python3 experiments/bench/rcm_step.py                # on the GPU: the 1.3B shape at 8,190 and 32,760 tokens
    python experiments/bench/rcm_step.py --tiny          # CPU smoke run of the same code path

Random weights (width 1536, 30 blocks, 12 heads, text 512×4096) built on the meta device and materialised on the
GPU, bf16 compute with an fp32 time path, fp32 master weights and AdamW state (rcm_core.parallel.precision), per-block
activation checkpointing for the with-grad passes. Every timed part's output is checked to be finite first. Parts are timed separately (CUDA events via do_bench-style
medians) and as whole student / critic iterations; a plain flow-matching step on the same model and batch is the
unit of cost. The JVP pass is also run with the PyTorch twin attention (materialises L×L: what a user gets
without the kernel). MFU counts model FLOPs (matmuls and attention, 2 FLOPs per MAC) against 989 TFLOP/s.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels.flash_jvp as katt
from rcm_core.config import ExperimentCfg, ModelCfg
from rcm_core.data.latents import LatentBatch
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import build_state, distill_step, make_optimizer
from rcm_core.method.losses import flow_matching_loss, scm_tangent_jvp
from rcm_core.networks import build_network
from rcm_core.run.plan import forward_flops
from rcm_core.method.trigflow import add_noise

PEAK = 989e12
WAN_1P3B = dict(kind="dit", in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256,
                text_dim=4096, dtype="bfloat16", activation_checkpointing=True)
TINY = dict(kind="dit", in_channels=16, dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32,
            dtype="float32", activation_checkpointing=True)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds over `reps` after one warm-up, synchronising around each call."""
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def guard(fn):
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


def build(cfg: ExperimentCfg, device: torch.device) -> TrigFlowDenoiser:
    with torch.device("meta"):
        net = build_network(cfg.model)
    net = net.to_empty(device=device)
    net.reset_parameters()
    for p in net.parameters():                 # off the zero init, so every path does real arithmetic
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite parameters after init: {bad[:5]}")
    return TrigFlowDenoiser(net, "rf_velocity")


def finite(name: str, *outs) -> None:
    """Refuse to time NaN arithmetic (the 32,760-token rows of an earlier table did, unnoticed)."""
    for o in outs:
        vals = o.values() if isinstance(o, dict) else (o if isinstance(o, tuple) else (o,))
        for v in vals:
            if not torch.isfinite(torch.as_tensor(v)).all():
                raise RuntimeError(f"{name}: non-finite output; no time reported")


def run_shape(model: dict, latent: tuple, L_text: int, device: torch.device, reps: int) -> list[tuple]:
    cfg = ExperimentCfg(model=ModelCfg(**model))
    cfg.distill.tangent_warmup, cfg.distill.student_update_freq, cfg.teacher.guidance = 0, 2, 5.0
    torch.manual_seed(0)
    teacher = build(cfg, device)
    state = build_state(cfg, teacher)
    B = 1
    x0 = torch.randn(B, *latent, device=device)
    ctx = torch.randn(B, L_text, model["text_dim"], device=device).to(teacher.net_dtype)
    batch = LatentBatch(latent=x0, cond=ctx)
    t = torch.full((B,), 0.9, dtype=torch.float64, device=device)
    eps = torch.randn_like(x0)
    x_t = add_noise(x0, eps, t).float()
    g = torch.Generator(device=device).manual_seed(0)
    F_T = torch.randn_like(x0).double()
    L = math.prod(s // p for s, p in zip(latent[1:], cfg.model.patch_size))
    fwd = forward_flops(cfg.model, L, L, L_text) * B
    rows: list[tuple] = []

    def add(name, sec, flops):
        rows.append((name, sec * 1e3, flops / sec / PEAK * 100 if sec == sec and flops else float("nan")))

    with torch.no_grad():
        finite("teacher forward", teacher.F_guided(x_t, t, ctx, 5.0))
        finite("JVP pass", scm_tangent_jvp(state.student, x_t, t, ctx, F_T))
        add("teacher forward ×2 (CFG)", guard(lambda: timed(lambda: teacher.F_guided(x_t, t, ctx, 5.0), device, reps)), 2 * fwd)
        add("JVP pass (fused kernel)", guard(lambda: timed(lambda: scm_tangent_jvp(state.student, x_t, t, ctx, F_T), device, reps)), 3 * fwd)
    orig = katt.use_triton
    katt.use_triton = lambda x: False                 # the PyTorch twin: explicit softmax, L×L tensors
    with torch.no_grad():
        add("JVP pass (PyTorch twin attention)", guard(lambda: timed(lambda: scm_tangent_jvp(state.student, x_t, t, ctx, F_T), device, max(1, reps // 3))), 3 * fwd)
    katt.use_triton = orig

    def fwd_bwd():
        state.student.F(x_t, t, ctx).float().square().mean().backward()
    add("student forward+backward", guard(lambda: timed(fwd_bwd, device, reps)), 3 * fwd)

    opt = make_optimizer(state.student.parameters(), 1e-6, cfg.optim)     # fp32 masters, as training

    def fm_step():
        opt.zero_grad(set_to_none=True)
        flow_matching_loss(state.student, x0, ctx, t=t, eps=eps).loss.backward()
        opt.step()
    fm = guard(lambda: timed(fm_step, device, reps))
    add("flow-matching step (unit of cost)", fm, 3 * fwd)

    def phase(student: bool):
        state.iteration = 0 if student else 1          # freq 2: even iterations are student steps
        finite("rCM iteration", distill_step(state, batch, cfg, g))
    # student iteration: sCM (2 teacher fwd, JVP ≈ 3 fwd, fwd+bwd 3) + DMD (avg 2.5 rollout fwd, last with grad,
    # fake fwd 1, teacher CFG 2, bwd 2): model FLOPs ≈ 15.5 forwards
    s_sec = guard(lambda: timed(lambda: phase(True), device, reps))
    add("rCM student iteration", s_sec, 15.5 * fwd)
    c_sec = guard(lambda: timed(lambda: phase(False), device, reps))
    add("rCM critic iteration", c_sec, 5.5 * fwd)       # rollout ≈ 2.5 fwd no-grad, fake fwd+bwd 3
    avg = (s_sec + 4 * c_sec) / 5
    add("rCM iteration, 1 student : 4 critic (mean)", avg, (15.5 + 4 * 5.5) / 5 * fwd)
    rows.append(("  rCM student iteration / flow-matching step", s_sec / fm, float("nan")))
    rows.append(("  JVP pass / one forward (teacher CFG time / 2)", rows[1][1] / (rows[0][1] / 2), float("nan")))
    if device.type == "cuda":
        rows.append(("  peak memory GiB", torch.cuda.max_memory_allocated() / 2 ** 30, float("nan")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny shape")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["8k", "32k"], help="run one of the two shapes")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shapes = ([("tiny", TINY, (16, 2, 8, 8), 8)] if args.tiny else
              [("1.3B, 21×30×52 latent (8,190 tokens)", WAN_1P3B, (16, 21, 30, 52), 512),
               ("1.3B, 21×60×104 latent (32,760 tokens, 480p×81)", WAN_1P3B, (16, 21, 60, 104), 512)])
    if args.only and not args.tiny:
        shapes = shapes[:1] if args.only == "8k" else shapes[1:]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}")
    for title, model, latent, L_text in shapes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows = run_shape(model, latent, L_text, device, args.reps)
        print(f"\n## {title}, batch 1, bf16 params, text 512 tokens" if not args.tiny else f"\n## {title}")
        print(f"{'part':52s} {'ms (or ratio)':>14s} {'MFU %':>7s}")
        for part, ms, mfu in rows:
            print(f"{part:52s} {ms:14.2f} {mfu:7.1f}")
        del rows
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
