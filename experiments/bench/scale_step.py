"""Sharded rCM iterations on 1, 2, 4 GPUs of one host: FSDP2 weak scaling and Ulysses CP, at the Wan2.1-1.3B shape.

    NCCL_NVLS_ENABLE=0 python3 experiments/bench/scale_step.py --out $OUT/scale.json      # GPUs: the table below
    python experiments/bench/scale_step.py --tiny                                          # CPU (gloo) smoke run

Each configuration is one process per GPU (torch.multiprocessing, NCCL), the real training code: `build_state`,
`parallelize_state` (FSDP2 per block, fp32 masters, bf16 compute and all-gathers, fp32 reduce-scatter; CP
hooks), `distill_step`. Random-initialised 1.3B-shaped teacher built on the meta device and materialised on
each GPU (the path 14B needs); 480p × 81 latents (16 × 21 × 60 × 104 → 32,760 tokens), text 512 × 4096, batch
1 per data-parallel rank. Every rank gets the same sample and the same noise, so the math of every
configuration equals the one-GPU run's: its first losses are compared with it (bf16 tolerance).

Per configuration: seconds per rCM iteration (the mean over one cycle of 1 student : 4 critic iterations after
a warm-up student+critic pair), samples/s, weak-scaling efficiency t(1 GPU)/t(N GPUs) for FSDP, the CP speed-up
of one sample, peak memory per GPU, and NCCL all-gather / reduce-scatter / all-to-all / all-reduce kernel time as a
share of the cycle (torch.profiler, CUDA activity, over one student and one critic iteration weighted 1 : 4; the
kernels overlap compute, so the shares are upper bounds on what communication costs). Beside the peak: the states
each rank holds, counted (`rcm_core.run.plan.held_state_bytes`), and the rest of the peak (activations, FSDP2's
unsharded blocks, temporaries), which is what the planner estimates rather than counts. Every loss is checked to be finite before any time is
reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rcm_core.config import ExperimentCfg, ModelCfg
from rcm_core.data.latents import LatentBatch
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import build_state, distill_step
from rcm_core.parallel.mesh import MeshShape, build_mesh, latent_tokens
from rcm_core.networks import build_network
from rcm_core.parallel.sharding import parallelize_state
from rcm_core.run.plan import held_state_bytes

WAN_1P3B = dict(kind="dit", in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256,
                text_dim=4096, dtype="bfloat16", activation_checkpointing=True)
TINY = dict(kind="dit", in_channels=16, dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32,
            dtype="bfloat16", activation_checkpointing=True)
COMM = {"all-gather": "allgather", "reduce-scatter": "reducescatter", "all-to-all": "alltoall",
        "all-reduce": "allreduce"}


CHECKPOINTING = {"true": True, "false": False, "mm_only": "mm_only", "attention_only": "attention_only"}


def experiment_cfg(args) -> ExperimentCfg:
    """The 1.3B (or tiny) model with --checkpointing's activation checkpointing and --attention's backend."""
    model = dict(TINY if args.tiny else WAN_1P3B, activation_checkpointing=CHECKPOINTING[args.checkpointing],
                 attention=args.attention)
    return ExperimentCfg(model=ModelCfg(**model))


def planned_gib(args, shape: MeshShape) -> float:
    """What `workflows/plan.py` predicts for this mesh's peak memory per GPU (batch 1 per data-parallel rank)."""
    from rcm_core.run.plan import Workload, count_params, plan_mesh
    cfg = experiment_cfg(args)
    latent = (16, 2, 8, 8) if args.tiny else (16, 21, 60, 104)
    work = Workload.from_config(cfg, latent, 8 if args.tiny else 512)
    work = Workload(work.latent, work.tokens, work.text_len, shape.data_parallel_size)
    gpus = shape.dp_replicate * shape.dp_shard * shape.cp
    p = plan_mesh(cfg, shape, gpus=gpus, gpu_memory=float("inf"), work=work, counts=count_params(cfg.model),
                  checkpointing=cfg.model.activation_checkpointing, table=None)
    return p.total / 2 ** 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_teacher(cfg: ExperimentCfg, device: torch.device) -> TrigFlowDenoiser:
    """Meta-device build, materialised here; every rank seeds alike, so all start from the same weights."""
    with torch.device("meta"):
        net = build_network(cfg.model)
    net = net.to_empty(device=device)
    torch.manual_seed(0)
    net.reset_parameters()
    with torch.no_grad():
        for p in net.parameters():            # off the zero init, so every path does real arithmetic
            if p.dim() > 1:
                p.normal_(std=0.02)
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite parameters after init: {bad[:5]}")
    return TrigFlowDenoiser(net, "rf_velocity")


def _comm_ms(prof) -> dict[str, float]:
    out = {k: 0.0 for k in COMM}
    for e in prof.key_averages():
        name = e.key.lower().replace("_", "")
        for k, tag in COMM.items():
            if "nccl" in name and tag in name:
                out[k] += getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3
    return out


def worker(rank: int, world: int, port: int, shape: MeshShape, args, result_file: str) -> None:
    cuda = not args.tiny
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = experiment_cfg(args)
        cfg.distill.tangent_warmup, cfg.distill.student_update_freq, cfg.teacher.guidance = 0, 5, 5.0
        latent = (16, 2, 8, 8) if args.tiny else (16, 21, 60, 104)
        L_text = 8 if args.tiny else 512
        teacher = build_teacher(cfg, device)
        state = build_state(cfg, teacher)
        mesh = build_mesh(shape, device_type=device.type, num_heads=cfg.model.num_heads,
                          num_tokens=latent_tokens(latent, tuple(cfg.model.patch_size)))
        if world > 1:
            parallelize_state(state, mesh)
        g0 = torch.Generator(device=device).manual_seed(1)
        x0 = torch.randn(1, *latent, generator=g0, device=device)
        ctx = torch.randn(1, L_text, cfg.model.text_dim, generator=g0, device=device).to(torch.bfloat16)
        batch = LatentBatch(latent=x0, cond=ctx)

        def step(i: int) -> float:
            g = torch.Generator(device=device).manual_seed(1000 + i)      # alike on every rank
            m = distill_step(state, batch, cfg, g)
            if not math.isfinite(m["loss"]):
                raise RuntimeError(f"iteration {i}: non-finite loss {m['loss']}")
            return m["loss"]

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        losses = [step(i) for i in range(2)]                 # warm-up: one student, one critic iteration
        state.iteration = 5                                  # the next cycle starts at a student iteration
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        losses += [step(5 + i) for i in range(5)]
        sync()
        sec = (time.perf_counter() - t0) / 5
        comm = {}
        if cuda and world > 1:
            # Communication kernels of one student and one critic iteration (CUDA activity only: cheap to
            # collect), weighted 1 : 4 like the cycle.
            state.iteration = 10
            parts = []
            for i in (10, 11):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step(i)
                    sync()
                parts.append(_comm_ms(prof))
            comm = {k: parts[0][k] + 4 * parts[1][k] for k in COMM}
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
        reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30 if cuda else float("nan")
        states = sum(held_state_bytes(state).values()) / 2 ** 30      # counted: the peak less it is the rest
        rows = [None] * world
        dist.all_gather_object(rows, {"rank": rank, "sec": sec, "peak_gib": peak, "reserved_gib": reserved,
                                      "states_gib": states, "comm_ms": comm, "losses": losses})
        if rank == 0:
            Path(result_file).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run(world: int, shape: MeshShape, args) -> dict:
    path = Path(args.scratch) / f"scale_{world}_{shape.dp_shard}_{shape.cp}.json"
    mp.spawn(worker, args=(world, _free_port(), shape, args, str(path)), nprocs=world, join=True)
    rows = json.loads(path.read_text())
    worst = max(rows, key=lambda r: r["sec"])
    return {"world": world, "dp_shard": shape.dp_shard, "cp": shape.cp, "sec": worst["sec"],
            "peak_gib": max(r["peak_gib"] for r in rows), "states_gib": max(r["states_gib"] for r in rows),
            # per rank (a term that grows with the shard count may sit on one rank): allocated, cached, states
            "ranks": [{k: r[k] for k in ("peak_gib", "reserved_gib", "states_gib")} for r in rows],
            "plan_gib": planned_gib(args, shape),
            "checkpointing": args.checkpointing, "attention": args.attention, "comm_ms": rows[0]["comm_ms"],
            "losses": rows[0]["losses"],
            "samples_per_s": shape.data_parallel_size / worst["sec"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (gloo) at a tiny shape")
    ap.add_argument("--fsdp", default="1,2,4", help="world sizes for FSDP2 weak scaling (dp_shard = world)")
    ap.add_argument("--cp", default="2,4", help="world sizes for context parallelism alone (cp = world)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--scratch", default="/tmp")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no configuration after this many seconds")
    ap.add_argument("--checkpointing", choices=list(CHECKPOINTING), default="true",
                    help="model.activation_checkpointing of every configuration (the shipped 1.3B config: true)")
    ap.add_argument("--attention", choices=["fused", "sdpa_grad", "sdpa"], default="fused",
                    help="model.attention (the shipped 1.3B config: sdpa_grad; this script's earlier rows: fused)")
    args = ap.parse_args()
    have = torch.cuda.device_count() if not args.tiny else 4
    # In the order given (most wanted first); --fsdp 1,4 --cp 4 runs the one-GPU baseline, then 4 GPUs.
    sizes = lambda text: [int(n) for n in text.split(",") if n.strip()]     # --cp "" runs no CP configuration
    plan = [(n, MeshShape(1, n, 1)) for n in sizes(args.fsdp) if n <= have]
    plan += [(n, MeshShape(1, 1, n)) for n in sizes(args.cp) if n <= have]
    name = torch.cuda.get_device_name() if not args.tiny else "cpu (gloo)"
    print(f"{name} ×{have}, torch {torch.__version__}, 1.3B shape, 32,760 tokens, batch 1 per data-parallel rank, "
          f"activation checkpointing {args.checkpointing}, attention {args.attention}")
    results, start = [], time.perf_counter()
    for world, shape in plan:
        if time.perf_counter() - start > args.budget_s:
            print(f"  skipped {shape}: past --budget-s {args.budget_s}", flush=True)
            continue
        t0 = time.perf_counter()
        results.append(run(world, shape, args))
        print(f"  ran {shape} in {time.perf_counter() - t0:.0f} s: {json.dumps(results[-1])}", flush=True)
        if args.out:                                   # after each configuration: a timeout keeps what ran
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    base = next((r for r in results if r["world"] == 1), None)
    print(f"\n{'GPUs':>4} {'FSDP':>4} {'CP':>3} {'s/iter':>7} {'samples/s':>9} {'vs 1 GPU':>9} {'peak GiB':>8} "
          f"{'states':>6} {'rest':>6} {'plan GiB':>8} {'AG %':>5} {'RS %':>5} {'A2A %':>5} {'AR %':>5} "
          f"{'max |Δloss|/|loss| vs 1 GPU':>28}")
    for r in results:
        cyc = 5 * r["sec"] * 1e3
        share = [100 * r["comm_ms"].get(k, 0.0) / cyc for k in COMM]
        if base is None:
            speed = "-"
        elif r["cp"] > 1:                              # one sample: time relative to one GPU's
            speed = f"{r['sec'] / base['sec']:.2f}× t"
        else:                                          # weak scaling efficiency t(1)/t(N)
            speed = f"{100 * base['sec'] / r['sec']:.1f}% eff"
        dl = (max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], base["losses"]))
              if base else float("nan"))
        print(f"{r['world']:>4} {r['dp_shard']:>4} {r['cp']:>3} {r['sec']:7.2f} {r['samples_per_s']:9.3f} {speed:>9} "
              f"{r['peak_gib']:8.1f} {r['states_gib']:6.2f} {r['peak_gib'] - r['states_gib']:6.1f} "
              f"{r['plan_gib']:8.1f} " + " ".join(f"{x:5.1f}" for x in share) + f" {dl:28.2e}")


if __name__ == "__main__":
    main()
