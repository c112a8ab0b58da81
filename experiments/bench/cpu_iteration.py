"""CPU time of one rCM iteration on the tiny configs (issue 2's benchmark). Prints one table.

    .venv/bin/python experiments/bench/cpu_iteration.py [--iters 30] [--threads 1]

Medians over `--iters` iterations after 3 warm-ups, each phase timed separately: a student iteration
(sCM with JVP + DMD rollout and loss + backward + AdamW + EMA) and a critic iteration.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rcm_core.config import load_config  # noqa: E402
from rcm_core.data.latents import LatentBatch  # noqa: E402
from rcm_core.method.denoiser import TrigFlowDenoiser  # noqa: E402
from rcm_core.method.distill import build_state, distill_step, is_student_phase  # noqa: E402
from rcm_core.run.loop import step_generator  # noqa: E402
from rcm_core.networks import build_network  # noqa: E402

CASES = {
    "toy MLP (debug_cpu), batch 256": (["model.kind=mlp", "model.in_channels=2", "model.num_classes=4",
                                        "model.hidden=128", "model.depth=3"], (256, 2, 1, 1, 1)),
    "tiny DiT 2×64, latent 16×4×8×8, batch 8": (["model.kind=dit", "model.in_channels=16", "model.num_classes=10",
                                                 "model.dim=64", "model.ffn_dim=256", "model.num_heads=4",
                                                 "model.num_layers=2"], (8, 16, 4, 8, 8)),
}


def bench(overrides: list[str], shape: tuple, iters: int) -> dict[str, float]:
    cfg = load_config(None, [*overrides, "distill.tangent_warmup=0", "distill.student_update_freq=2",
                             "teacher.guidance=2.0", "optim.lr_warmup=0"])
    torch.manual_seed(0)
    state = build_state(cfg, TrigFlowDenoiser(build_network(cfg.model), "rf_velocity"))
    batch = LatentBatch(latent=torch.randn(shape), label=torch.arange(shape[0]) % cfg.model.num_classes)
    times: dict[str, list[float]] = {"student": [], "critic": []}
    for i in range(2 * (iters + 3)):
        phase = "student" if is_student_phase(state.iteration, cfg.distill) else "critic"
        t0 = time.perf_counter()
        distill_step(state, batch, cfg, step_generator(0, 0, i, torch.device("cpu")))
        if i >= 6:
            times[phase].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared boxes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'config':45s} {'student ms':>11s} {'critic ms':>10s} {'rCM iter ms (1 student + 4 critic)/5':>38s}")
    for name, (ov, shape) in CASES.items():
        r = bench(ov, shape, args.iters)
        mean_iter = (r["student"] + 4 * r["critic"]) / 5
        print(f"{name:45s} {r['student']:11.1f} {r['critic']:10.1f} {mean_iter:38.1f}")


if __name__ == "__main__":
    main()
