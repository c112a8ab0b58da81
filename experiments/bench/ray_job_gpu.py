"""The front door on a multi-GPU host: `ray job submit` of workflows/distill.py with the Wan2.1-1.3B config.

    NCCL_NVLS_ENABLE=0 python3 experiments/bench/ray_job_gpu.py --gpus 2 --steps 6 --out $OUT

What it does, as a user would (nothing can be downloaded there, so teacher and data are made here):
1. a random-initialised teacher of the Wan2.1-1.3B shape, saved in the project's teacher format (bf16);
2. random 480p × 81 latents [16, 21, 60, 104] with umT5-shaped text embeddings [512, 4096], written as Parquet
   shards + manifest by `workflows/prepare_latents.py --from-npz` on this machine's disk;
3. `ray start --head --num-gpus N`, then `ray job submit --working-dir . -- python3 workflows/distill.py --config
   experiments/wan21_t2v_1p3b_rcm.yaml …` with one Train worker per GPU, FSDP2 over all of them
   (`parallel.dp_shard=N`), batch 1 per GPU, MLflow on a local SQLite store; `ray stop` at the end.
It prints the job's last lines, its wall time, and the run's metrics read back from MLflow.

Status (2026-11-28): written and imported, NOT YET RUN on a GPU host (the session's device time went to the
FSDP2 scaling table). It needs Ray and MLflow there: carry the bundle of shared/reference/gpu_ray.md, built with
the dashboard's index.html kept (job submission needs the dashboard) and mlflow-skinny + SQLAlchemy + alembic for
the SQLite store.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from rcm_core.config import load_config
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.networks import build_network
from rcm_core.run.teacher import save_teacher

CONFIG = "experiments/wan21_t2v_1p3b_rcm.yaml"


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, **kw)


def make_teacher(path: Path) -> None:
    cfg = load_config(ROOT / CONFIG)
    with torch.device("meta"):
        net = build_network(cfg.model)
    net = net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.reset_parameters()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(std=0.02)
    save_teacher(TrigFlowDenoiser(net, "rf_velocity"), cfg, path)


def make_latents(npz: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    np.savez(npz, latents=rng.standard_normal((rows, 16, 21, 60, 104), dtype=np.float32).astype(np.float16),
             cond=(0.1 * rng.standard_normal((rows, 512, 4096), dtype=np.float32)).astype(np.float16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--work", default="/tmp/rcm_job")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher, data = work / "teacher_1p3b_random.pt", work / "latents"
    t0 = time.perf_counter()
    if not teacher.is_file():
        make_teacher(teacher)
    if not (data / "manifest.json").is_file():
        make_latents(work / "latents.npz", args.rows)
        r = sh([sys.executable, "workflows/prepare_latents.py", "--from-npz", str(work / "latents.npz"),
                f"data.url={data}", "data.rows_per_shard=4"])
        print(r.stdout[-600:], r.stderr[-1500:])
    print(f"teacher + data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "RAY_AUTH_MODE": "disabled"}
    sh(["ray", "stop", "--force"], env=env)
    r = sh(["ray", "start", "--head", f"--num-gpus={args.gpus}", "--disable-usage-stats", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1"], env=env)
    print(r.stdout[-800:], r.stderr[-800:])
    run_dir = work / f"run_{args.gpus}gpu"
    overrides = [f"teacher.checkpoint={teacher}", f"data.url={data}", f"train.steps={args.steps}",
                 f"train.checkpoint_every={args.steps}", f"train.eval_every={args.steps}", "train.log_every=1",
                 f"train.run_dir={run_dir}", f"resources.num_workers={args.gpus}", "resources.cpus_per_worker=2",
                 f"parallel.dp_shard={args.gpus}", "parallel.dp_replicate=1", f"data.batch_size={args.gpus}",
                 "distill.tangent_warmup=0", "optim.lr_warmup=0", "eval.num_samples=2", "eval.bootstrap=10",
                 "sampler.teacher_steps=2", f"tracking.tracking_uri=sqlite:///{run_dir}/mlflow.db",
                 f"name=wan1p3b_{args.gpus}gpu"]
    t1 = time.perf_counter()
    r = sh(["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
            "python3", "workflows/distill.py", "--config", CONFIG, *overrides], env=env, timeout=480)
    wall = time.perf_counter() - t1
    log = r.stdout + r.stderr
    print(log[-5000:])
    print(f"ray job submit: exit {r.returncode}, {wall:.0f} s wall for {args.steps} iterations on {args.gpus} GPUs")
    sh(["ray", "stop", "--force"], env=env)
    summary = {"gpus": args.gpus, "steps": args.steps, "exit": r.returncode, "wall_s": wall}
    try:
        import mlflow
        mlflow.set_tracking_uri(f"sqlite:///{run_dir}/mlflow.db")
        runs = mlflow.search_runs(search_all_experiments=True)
        summary["mlflow_runs"] = len(runs)
        if len(runs):
            cols = [c for c in runs.columns if c.startswith("metrics.train/")][:12]
            summary["metrics"] = {c: float(runs.iloc[0][c]) for c in cols}
    except Exception as exc:          # report, don't hide: the job's own exit code is the verdict
        summary["mlflow_error"] = repr(exc)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out, f"ray_job_{args.gpus}gpu.json").write_text(json.dumps(summary, indent=1))
        Path(args.out, f"ray_job_{args.gpus}gpu.log").write_text(log[-200_000:])


if __name__ == "__main__":
    main()
