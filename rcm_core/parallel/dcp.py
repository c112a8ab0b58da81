"""Distributed checkpoints of the distillation state (torch.distributed.checkpoint), reloadable on any
number of ranks and any mesh: each rank writes its own shards, and the metadata lets a loader with a
different sharding (or a single process with plain modules) read exactly the pieces it needs.

    .venv/bin/python -m pytest tests/test_parallel.py -q -k checkpoint

What is saved: student, fake score and EMA weights, both optimisers (AdamW moments), the iteration
counters, and `extra` (data position, run ids; JSON, so that a
loader need not know its keys in advance: DCP only fills keys the target dict already has). The global RNG state is not: every iteration draws from a
generator seeded by (seed, rank, iteration) (rcm_core.run.loop), so nothing else needs restoring.
The folder is written as `<dir>.tmp` and renamed by rank 0 after every rank has finished, so a crash
mid-write never leaves a partial checkpoint under the final name (as rcm_core.run.checkpoint does).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from rcm_core.parallel.precision import MasterWeightOptimizer

META_KEYS = ("iteration", "student_iter", "critic_iter")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def state_dict_of(state, extra: dict | None = None) -> dict:
    """The nested dict DCP saves; DTensor (FSDP) and plain modules give the same keys.

    get_state_dict fills an optimiser that has not stepped yet by running one zero-gradient step, which
    advances AdamW's step count and so changes its later bias correction (the critic has not stepped before
    the first checkpoint when the tangent warm-up is long). Such optimisers are emptied again here and
    recorded in meta["fresh_optimizers"], so that a resumed run empties them too."""
    fresh = [name for name, opt in (("opt_student", state.opt_student), ("opt_fake", state.opt_fake))
             if opt is not None and not opt.state]
    student, opt_student = get_state_dict(state.student, state.opt_student)
    out = {"student": student, "opt_student": opt_student, "ema": get_model_state_dict(state.ema.module),
           "meta": {**{k: getattr(state, k) for k in META_KEYS}, "counters": dict(state.counters),
                    "ema_num_updates": state.ema.num_updates, "extra": json.dumps(extra or {}),
                    "fresh_optimizers": json.dumps(fresh)}}
    if state.fake is not None:
        out["fake"], out["opt_fake"] = get_state_dict(state.fake, state.opt_fake)
    _empty(state, fresh)
    return out


def _empty(state, names: list[str]) -> None:
    for name in names:
        getattr(state, name).state.clear()


def save_distributed(state, directory: str | Path, extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if not _distributed() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(state_dict_of(state, extra), checkpoint_id=str(tmp), no_dist=not _distributed())
    _barrier()
    if not _distributed() or dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    _barrier()
    return directory


def load_distributed(state, directory: str | Path) -> dict:
    """Collective: restore `state` in place from a DCP folder saved on any number of ranks; returns `extra`.

    `state` must already have its final layout (parallelize_state applied, or plain modules on one process).
    """
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"no distributed checkpoint at {directory} (expected DCP's .metadata file)")
    if isinstance(state.opt_student, MasterWeightOptimizer):
        # bf16 without FSDP keeps its fp32 masters outside the module (rcm_core.parallel.precision), where DCP's
        # state-dict helpers cannot map them to parameter names.
        raise ValueError(f"{directory} is a sharded checkpoint and this run computes in bf16 without FSDP2: resume "
                         "it on 2 or more GPUs with parallel.dp_shard > 1 (or context parallelism), where the fp32 "
                         "masters are the sharded parameters")
    sd = state_dict_of(state)
    dcp.load(sd, checkpoint_id=str(directory), no_dist=not _distributed())
    set_state_dict(state.student, state.opt_student, model_state_dict=sd["student"],
                   optim_state_dict=sd["opt_student"])
    set_model_state_dict(state.ema.module, sd["ema"])
    if state.fake is not None:
        set_state_dict(state.fake, state.opt_fake, model_state_dict=sd["fake"], optim_state_dict=sd["opt_fake"])
    meta = sd["meta"]
    for k in META_KEYS:
        setattr(state, k, int(meta[k]))
    state.counters.update(meta["counters"])
    state.ema.num_updates = int(meta["ema_num_updates"])
    _empty(state, json.loads(meta.get("fresh_optimizers", "[]")))
    return json.loads(meta["extra"])
