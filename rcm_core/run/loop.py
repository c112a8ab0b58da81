"""The training loop, usable without Ray: `run_training(cfg, batches, reporter, resume)`.

    python -m rcm_core.run [--config experiments/debug_cpu.yaml] [key=value ...]

trains a teacher on the built-in toy (cached), distils it, and prints the step-count table. Ray Train
calls the same function from every worker (workflows/trainer.py) with its own batches and reporter.

Determinism: every iteration draws its randomness from a generator seeded by (seed, rank, iteration), as
EDM2 does, so a resumed run continues the uninterrupted trajectory exactly.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
from tqdm import tqdm

from rcm_core.run.checkpoint import (
    is_distributed,
    latest_checkpoint,
    load_checkpoint,
    load_into_state,
    remove_partial_checkpoints,
    save_checkpoint,
    state_to_dict,
    write_run_config,
)
from rcm_core.config import ExperimentCfg, config_hash, run_config_dict, save_resolved
from rcm_core.data.latents import LatentBatch
from rcm_core.parallel.dcp import load_distributed, save_distributed
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import DistillState, build_state, distill_step, reapply_adamw_kernel
from rcm_core.networks import check_label_path
from rcm_core.parallel.mesh import Mesh
from rcm_core.parallel.sharding import mesh_for_run, parallelize_state, share_batch
from rcm_core.parallel.sharding import rank as dist_rank
from rcm_core.run.teacher import load_teacher


class Reporter(Protocol):
    """Receives each report; a non-empty string returned is a reason to stop the run after this step (e.g. a
    sweep trial that diverged: stopping on the worker is deterministic, a scheduler's stop signal is not).
    A reporter may carry `checkpoint_root` (a folder, or None): where the loop writes checkpoints instead of
    run_dir/checkpoints (Ray Train's own run folder, so that a checkpoint is written once, not written and copied)."""
    def __call__(self, step: int, metrics: dict[str, float], ckpt_dir: Path | None) -> str | None: ...


def print_reporter(step: int, metrics: dict[str, float], ckpt_dir: Path | None) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                      if k in ("train/loss", "train/data_wait_fraction") or k.endswith("/gmm_precision"))
    n_eval = sum(k.startswith("eval/") for k in metrics)
    tqdm.write(f"step {step}: {shown}" + (f" (+{n_eval} eval metrics)" if n_eval else "")
               + (f" [checkpoint {ckpt_dir}]" if ckpt_dir else ""))


Evaluator = Callable[[DistillState, int], dict[str, float]]
BatchSource = Iterable[LatentBatch] | Callable[[int], Iterable[LatentBatch]]


def step_generator(seed: int, rank: int, iteration: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank * 7_919 + iteration)


def _batches_from(source: BatchSource, start_step: int) -> Iterator[LatentBatch]:
    """A callable source is asked for the stream from `start_step` (exact resume); an iterable just continues."""
    return iter(source(start_step) if callable(source) else source)


def _mean(history: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in history for k in m}
    return {f"train/{k}": sum(m[k] for m in history if k in m) / sum(1 for m in history if k in m) for k in keys}


def run_training(cfg: ExperimentCfg, batches: BatchSource, reporter: Reporter = print_reporter,
                 resume: str | Path | None = None, *, teacher: TrigFlowDenoiser,
                 evaluator: Evaluator | None = None, device: str | torch.device | None = None,
                 grad_wrap: Callable[[TrigFlowDenoiser], TrigFlowDenoiser] | None = None,
                 extra_state: dict | None = None,
                 latent_shape: tuple[int, ...] | None = None) -> DistillState:
    """Distil `teacher` for cfg.train.steps iterations; checkpoints go to run_dir/checkpoints/step_<N> (or
    `reporter.checkpoint_root`/step_<N>).

    resume: a checkpoint folder, or "latest" for the newest one under the run dir (None = fresh start).
    extra_state: entries saved in every checkpoint beside the state (e.g. the MLflow run id); after a
    resume it is updated with the loaded values.
    latent_shape: one latent's [C, T, H, W]; with several processes it lets the mesh from `cfg.parallel`
    (FSDP2 / context parallelism, rcm_core.parallel.sharding) be checked against the token count.

    Under a sharded or context-parallel mesh every rank evaluates and checkpoints (those are collectives),
    only rank 0 reports evaluation metrics, and only the first rank of a CP group reads `batches`.
    """
    device = torch.device(device or cfg.train.device)
    rank, run_dir = dist_rank(), Path(cfg.train.run_dir)
    student_init = None
    if cfg.distill.student_checkpoint:           # e.g. Causal rCM's sf_dmd from the tf_dcm student
        student_init = load_teacher(cfg.distill.student_checkpoint, cfg, device)
    state = build_state(cfg, teacher.to(device), student_init)
    mesh = mesh_for_run(cfg, latent_shape, device)
    if mesh is not None:
        parallelize_state(state, mesh)
    dp_rank = mesh.dp_rank if mesh is not None else rank     # a CP group draws the same noise and times
    ckpt_root = Path(getattr(reporter, "checkpoint_root", None) or run_dir / "checkpoints")
    if rank == 0:
        remove_partial_checkpoints(ckpt_root)      # a run killed mid-write left them; they can never be loaded
    resume_dir = latest_checkpoint(ckpt_root) if resume == "latest" else resume
    if resume_dir is not None:
        loaded = _resume(state, Path(resume_dir), mesh, device)
        if extra_state is not None:
            extra_state.update(loaded)
    if rank == 0:
        save_resolved(cfg, run_dir)
    reads = mesh is None or mesh.cp_rank == 0
    stream = _batches_from(batches, state.iteration) if reads else None
    history: list[dict[str, float]] = []
    wait = busy = 0.0
    bar = tqdm(total=cfg.train.steps, initial=state.iteration, desc=f"rCM {cfg.distill.mode}",
               disable=rank != 0, dynamic_ncols=True, file=sys.stderr)
    while state.iteration < cfg.train.steps:
        t0 = time.perf_counter()
        batch = share_batch(next(stream) if reads else None, mesh, device).to(device)
        t1 = time.perf_counter()
        g = step_generator(cfg.train.seed, dp_rank, state.iteration, device)
        metrics = distill_step(state, batch, cfg, g, grad_student=grad_wrap(state.student) if grad_wrap else None,
                               grad_fake=grad_wrap(state.fake) if grad_wrap and state.fake else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)        # the iteration's own time, not its queued kernels'
        t2 = time.perf_counter()
        wait, busy = wait + (t1 - t0), busy + (t2 - t0)
        # per kind of iteration: a student update (JVP + DMD) costs several critic updates
        metrics["seconds_student" if metrics.get("phase_student", 1.0) else "seconds_critic"] = t2 - t1
        history.append(metrics)
        bar.update(1)
        step = state.iteration
        report: dict[str, float] = {}
        log_due = step % cfg.train.log_every == 0 or step == cfg.train.steps
        eval_due = evaluator is not None and _due(step, cfg.train.eval_every, cfg.train.steps)
        if log_due:
            report = _mean(history)
            report["train/data_wait_fraction"] = wait / max(busy, 1e-9)
            report.update({f"train/total_{k}": v for k, v in state.counters.items()})
            if device.type == "cuda":
                report["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            # refresh=False: the bar redraws at its own pace (a Ray worker's redraws are each a line in the log)
            bar.set_postfix(loss=f"{report.get('train/loss', float('nan')):.4g}", refresh=False)
            history, wait, busy = [], 0.0, 0.0
        if eval_due and (rank == 0 or mesh is not None):     # sharded modules: every rank joins the forwards
            eval_metrics = evaluator(state, step)
            if rank == 0:
                report.update(eval_metrics)
        ckpt_dir = None
        if _due(step, cfg.train.checkpoint_every, cfg.train.steps):
            ckpt_dir = ckpt_root / f"step_{step}"
            t_ckpt = time.perf_counter()
            # this step's values last: after a resume extra_state holds the loaded checkpoint's own (older) ones
            extra = {**(extra_state or {}), "config_hash": config_hash(cfg), "data_position": step}
            if mesh is not None and mesh.fsdp_mesh is not None:
                save_distributed(state, ckpt_dir, extra)      # every rank writes its shards
            elif rank == 0:
                save_checkpoint(state_to_dict(state, extra=extra), ckpt_dir)
            if rank == 0:
                write_run_config(run_config_dict(cfg), ckpt_dir)
                report["timing/checkpoint_seconds"] = time.perf_counter() - t_ckpt    # 26.4 GiB at 1.3B
        if log_due or eval_due or ckpt_dir is not None:   # same on every rank: Ray needs equal report counts
            reason = _any_rank(reporter(step, report, ckpt_dir), device)
            if reason:
                state.stopped = reason
                tqdm.write(f"step {step}: stopping: {reason}")
                break
    bar.close()
    return state


def _resume(state: DistillState, directory: Path, mesh: Mesh | None, device: torch.device) -> dict:
    """Load a checkpoint of either kind into the (already parallelised) state; returns its extra entries."""
    if is_distributed(directory):
        from torch.distributed.checkpoint import FileSystemReader

        check_label_path(FileSystemReader(str(directory)).read_metadata().state_dict_metadata, str(directory))
        extra = load_distributed(state, directory)
    elif mesh is not None and mesh.fsdp_mesh is not None:
        raise ValueError(f"{directory} holds an unsharded checkpoint (state.pt) but parallel.dp_shard > 1 shards "
                         "this run; resume with the parallel settings it was written with")
    else:
        extra = load_into_state(state, load_checkpoint(directory, map_location=device))
    for opt in (state.opt_student, state.opt_fake):
        if opt is not None:
            reapply_adamw_kernel(opt)
    return extra


def _any_rank(reason: str | None, device: torch.device) -> str | None:
    """Stop everywhere if any rank asks to (ranks see their own losses; a rank leaving alone would hang the
    others in their next collective). Returns this rank's reason, or a generic one if another rank asked."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return reason
    flag = torch.tensor([1.0 if reason else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return reason or ("another rank asked to stop" if flag.item() > 0 else None)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)
