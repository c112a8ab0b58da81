"""Will this run fit on my GPUs? Memory and time per GPU for every mesh, before anything is launched.

    python workflows/plan.py --config experiments/wan21_t2v_14b_rcm.yaml --gpus 8 --gpu-memory 80GiB
    python workflows/plan.py --config experiments/wan21_t2v_1p3b_rcm.yaml --gpus 8 --gpu-memory 80GiB \\
        --latent 16,20,60,104 data.batch_size=8
    python workflows/plan.py --config X.yaml --address auto        # GPUs and their memory read from Ray

For each (dp_replicate, dp_shard, cp) whose product is the GPU count, with activation checkpointing off and
on (and in the config's own selective mode, if it sets one), prints parameter + gradient + optimiser bytes per GPU
of student, fake score, EMA and teacher, the activation peaks of the JVP pass and of the backward, the total
against the card, the seconds per iteration scaled from the measured step table most like the row
(docs/results/gpu/step_tables/, `--step-table`), and the recommended mesh; meshes that cannot run
(cp not dividing the heads or tokens, a batch the data-parallel groups cannot split) are listed with the
reason. The arithmetic is `rcm_core.run.plan`. `workflows/distill.py` runs the same check (`preflight`) before
its workers start and stops with the plan's message when the configured mesh cannot fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rcm_core.config import ExperimentCfg, load_config, redact_url  # noqa: E402
from rcm_core.run.plan import (  # noqa: E402
    GiB,
    check_fits,
    configured_plan,
    describe_memory,
    format_plan,
    plan_run,
    read_step_tables,
)

# Where the planner's s/iteration comes from: one file per measured variant, as experiments/bench/rcm_step.py
# writes them to $OUT (step_table_<variant>.json); a re-measured variant's file is copied in here.
STEP_TABLES = ROOT / "docs" / "results" / "gpu" / "step_tables"
WAN_480P = (16, 21, 60, 104)     # Wan2.1 VAE latent of 832×480×81 frames: 21·30·52 = 32,760 tokens
WAN_TEXT = 512                   # umT5 context length Wan zero-pads to


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '80G' or '80' (GiB) → bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB|TB|TiB)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--gpu-memory {text!r}: give e.g. 80GiB, 80GB or 141GB")
    unit = {"GiB": GiB, "G": GiB, None: GiB, "GB": 1e9, "MiB": 2 ** 20, "MB": 1e6, "TB": 1e12, "TiB": 2 ** 40}
    return float(m.group(1)) * unit[m.group(2)]


def data_shape(cfg: ExperimentCfg) -> tuple[tuple[int, ...] | None, int, str | None]:
    """(latent [C, T, H, W], text length, None) from the data set's manifest when it can be read, else
    (None, default, why not): the caller decides, and says so (planning before the data exists is normal)."""
    text_len = cfg.model.label_tokens if cfg.model.num_classes > 0 else WAN_TEXT
    if not cfg.data.url:
        return None, text_len, "data.url is empty"
    try:
        from rcm_core.data.latents import read_manifest

        m = read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint, check_shards=False)
    except Exception as e:                # whatever the reason, it is named to the user, never swallowed
        return None, text_len, f"cannot read the data set's manifest at {redact_url(cfg.data.url)} ({e})"
    return tuple(m.latent_shape), (m.cond_shape[0] if m.cond_shape else text_len), None


def ray_gpus(address: str | None) -> tuple[int, float]:
    """(GPU count, memory of one GPU in bytes) of the connected Ray cluster; a one-GPU task reads the memory."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        raise SystemExit("the Ray cluster has no GPUs; pass --gpus and --gpu-memory to plan for GPUs elsewhere")
    return gpus, gpu_memory_from_ray()


def gpu_memory_from_ray(timeout_s: float = 120.0) -> float | None:
    """Total memory of one cluster GPU, read by a tiny task holding one GPU; None if none is scheduled in time."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> float:
        import torch
        return float(torch.cuda.get_device_properties(0).total_memory)

    ref = probe.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return ray.get(ref)


def preflight(cfg: ExperimentCfg, gpu_memory: float | None = None) -> None:
    """Stop a GPU run whose mesh cannot fit before any worker loads a teacher (workflows/distill.py, after
    Ray is up). Runs only for DiT models on GPUs whose memory is known: `gpu_memory`, else this machine's
    CUDA device, else one Ray task on a cluster GPU."""
    if not cfg.resources.use_gpu or cfg.model.kind != "dit":
        return
    latent, text_len, why = data_shape(cfg)
    if latent is None:
        print(f"plan: memory check skipped: {why}; nothing checks that this mesh fits before the workers load the "
              f"teacher (run `python workflows/plan.py --config …` once the data set is readable)", flush=True)
        return
    import torch

    memory = gpu_memory or (float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available()
                            else gpu_memory_from_ray())
    if memory is None:
        print("plan: GPU memory unknown (no GPU task scheduled within 120 s); memory check skipped", flush=True)
        return
    problem = check_fits(cfg, gpus=max(cfg.resources.num_workers, 1), gpu_memory=memory, latent=latent,
                         text_len=text_len)
    if problem:
        raise SystemExit(f"plan: {problem}")


def step_tables(path: str | None) -> tuple:
    """The step tables at `path` (a file or a folder; default the shipped folder), each named in the plan's footer
    as the user would type it (relative to the repository when it lies in it). A path that holds none is an error:
    a plan without times would look like one with them missing by accident."""
    where = Path(path) if path else STEP_TABLES
    tables = read_step_tables(where)
    if path and not tables:
        raise SystemExit(f"plan: --step-table {path}: no step table there (a JSON file experiments/bench/rcm_step.py "
                         f"writes as step_table_<variant>.json, or a folder of them)")

    def shown(source: str) -> str:
        resolved = Path(source).resolve()
        return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else source
    return tuple(dataclasses.replace(t, source=shown(t.source)) for t in tables)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Memory and time per GPU of a distillation run, for every mesh.")
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("--gpus", type=int, default=None, help="GPU count (default: read from Ray)")
    ap.add_argument("--gpu-memory", type=parse_memory, default=None, help="memory per GPU, e.g. 80GiB (default: Ray)")
    ap.add_argument("--address", default=None, help="Ray cluster to read GPUs from (e.g. auto)")
    ap.add_argument("--latent", default=None,
                    help="latent C,T,H,W (default: the data set's manifest, else Wan 480p×81: 16,21,60,104)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default: manifest, else 512)")
    ap.add_argument("--step-table", default=None,
                    help="a step table file, or a folder of them, for s/iteration (default: "
                         "docs/results/gpu/step_tables/; each row is timed by the table measured most like it)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=8")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if (args.gpus is None) != (args.gpu_memory is None):
        ap.error("give both --gpus and --gpu-memory, or neither (then both are read from Ray)")
    gpus, memory = (args.gpus, args.gpu_memory) if args.gpus else ray_gpus(args.address)
    if memory is None:
        raise SystemExit("could not read the GPUs' memory from Ray within 120 s; pass --gpus and --gpu-memory")
    latent, text_len, why = data_shape(cfg)
    if latent is None and not args.latent:
        print(f"plan: {why}; planning for Wan 480p×81 ({','.join(map(str, WAN_480P))}; --latent to choose)")
    if args.latent:
        latent = tuple(int(v) for v in args.latent.split(","))
        if len(latent) != 4:
            ap.error(f"--latent {args.latent!r}: give C,T,H,W, e.g. 16,21,60,104")
    latent = latent or WAN_480P
    text_len = args.text_len or text_len
    tables = step_tables(args.step_table)
    try:
        plans = plan_run(cfg, gpus=gpus, gpu_memory=memory, latent=latent, text_len=text_len, tables=tables)
    except ValueError as e:
        raise SystemExit(f"plan: {e}") from None
    print(format_plan(cfg, plans, gpus=gpus, gpu_memory=memory, latent=latent, text_len=text_len))
    own = check_fits(cfg, gpus=gpus, gpu_memory=memory, latent=latent, text_len=text_len)
    if own:
        print(f"configured: {own}")
    else:
        mine = configured_plan(cfg, gpus=gpus, gpu_memory=memory, latent=latent, text_len=text_len)
        print(f"configured mesh (parallel.*, model.activation_checkpointing="
              f"{str(cfg.model.activation_checkpointing).lower()}): fits, {describe_memory(mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
