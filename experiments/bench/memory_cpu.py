"""The planner's activation estimate against the allocator, on the CPU (issue 28's memory bar): the peak of live
bytes in one flow-matching forward + backward of a small bf16 Wan-shaped DiT, per recomputation mode and token
count, beside `rcm_core.run.plan.activation_estimate` for the same network, tokens and mode (one graph).

    python experiments/bench/memory_cpu.py                  # CPU, ~2 min

How: the gradients are made by one step first, so the measured step accumulates into them in place and what the
allocator adds during it is activations and the backward's temporaries alone; torch.profiler's memory events give
the allocator's running total ("Total Allocated", bytes live since the profile began), whose maximum is the peak.
The per-token bytes a block keeps are already exact (`tests/test_plan.py` counts saved tensors); what this adds is
the whole network's peak, i.e. the planner's allowance for the block recomputed in the backward and its gradients
(`activation_estimate`: `plan.BACKWARD_BLOCKS` blocks' worth of `block_saved_bytes`, set from this bench's
measurements; sharded meshes keep the earlier 2 with checkpointing, 1 without). Read the slope
between two token counts: it drops what does not grow with tokens (the text's keys and values, weight-gradient
temporaries). On a GPU the attention runs SDPA's CUDA kernels instead of the CPU's, and the caching allocator
rounds; `experiments/bench/rcm_step.py` prints the GPU's iteration peaks beside the planner's.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from rcm_core.config import ModelCfg
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.losses import flow_matching_loss
from rcm_core.networks import build_network
from rcm_core.run.plan import activation_estimate, attention_keepable, block_saved_bytes, selective_saved_bytes

MODES = (False, True, "attention_only", "mm_only")
MiB = 2 ** 20


def peak_allocated(fn) -> int:
    """The most bytes the CPU allocator held at once during `fn()`, counted from the start of the call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    return max((e["args"]["Total Allocated"] for e in events), default=0)


def measure(model: ModelCfg, frames: int, text_len: int) -> tuple[int, int]:
    """(latent tokens, peak bytes of one flow-matching forward + backward beyond the states)."""
    torch.manual_seed(0)
    denoiser = TrigFlowDenoiser(build_network(model), "rf_velocity")
    x0 = torch.randn(1, model.in_channels, frames, 16, 32)
    ctx = torch.randn(1, text_len, model.text_dim).bfloat16()
    t = torch.full((1,), 0.9, dtype=torch.float64)
    eps = torch.randn_like(x0)

    def step():
        flow_matching_loss(denoiser, x0, ctx, t=t, eps=eps).loss.backward()

    step()                                  # gradients exist: the measured step accumulates into them in place
    pt, ph, pw = model.patch_size
    return frames // pt * (16 // ph) * (32 // pw), peak_allocated(step)


def kept_per_token(model: ModelCfg, mode) -> int:
    """Bytes per latent token the whole network keeps for its backward under `mode` (the planner's rule)."""
    D, F, H, L = model.dim, model.ffn_dim, model.num_heads, model.num_layers
    if mode is False:
        return L * block_saved_bytes(D, F, H)
    if mode is True:
        return L * 2 * D                                # each block's bf16 input
    return L * selective_saved_bytes(D, F, H, mode, attention_keepable(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1536, help="ffn_dim (Wan2.1-1.3B's ratio F/D is 5.83)")
    ap.add_argument("--heads", type=int, default=2, help="head dim = dim / heads (Wan: 128)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", default="8,16", help="two latent frame counts (tokens = frames × 128)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    frames = [int(f) for f in args.frames.split(",")]
    text_len = 32
    print(f"# CPU, torch {torch.__version__}, bf16 DiT D={args.dim} F={args.ffn} heads={args.heads} "
          f"layers={args.layers}, text {text_len} tokens, attention sdpa_grad (SDPA with grad), one graph\n")
    print("| mode | tokens | measured peak MiB | planner MiB | measured ÷ planner | growth with tokens beyond what the "
          "policy keeps, in blocks (`block_saved_bytes`): measured | the planner's |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        model = ModelCfg(kind="dit", in_channels=16, dim=args.dim, ffn_dim=args.ffn, num_heads=args.heads,
                         num_layers=args.layers, text_dim=64, dtype="bfloat16", activation_checkpointing=mode,
                         attention="sdpa_grad")
        rows = []
        for f in frames:
            tokens, got = measure(model, f, text_len)
            _, planned = activation_estimate(model, batch=1, tokens=tokens, text_len=text_len, checkpointing=mode,
                                             graphs=1, jvp=False)
            rows.append((tokens, got, planned))
        per_block = block_saved_bytes(args.dim, args.ffn, args.heads)
        (n0, g0, p0), (n1, g1, p1) = rows
        kept = kept_per_token(model, mode) * (n1 - n0)

        def extra(total: int) -> float:             # the growth beyond what the policy keeps, in blocks
            return (total - kept) / (per_block * (n1 - n0))
        for i, (n, g, p) in enumerate(rows):
            slope = f"{extra(g1 - g0):.2f}" if i else ""
            planner = f"{extra(p1 - p0):.2f}" if i else ""
            print(f"| {mode} | {n:,} | {g / MiB:.1f} | {p / MiB:.1f} | {g / p:.2f} | {slope} | {planner} |")


if __name__ == "__main__":
    main()
