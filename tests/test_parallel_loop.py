"""The training loop under a mesh from config: `run_training` with parallel.dp_shard / parallel.cp set, on gloo
CPU processes, against the plain data-parallel loop (no mesh) with the same batches.

    .venv/bin/python -m pytest tests/test_parallel_loop.py -q      # ~1 min on 2 shared cores

What the wiring must get right, and what each test pins down:
- FSDP2 (dp_shard=2): the mesh is built, the state sharded, and four rCM iterations (sCM, critic, sCM + DMD)
  give the parameters of the replicated run; a distributed checkpoint written mid-run resumes to the same end.
- Ulysses CP (cp=2): only the group's first rank reads batches (the other rank's source raises if asked),
  both ranks draw noise and times with the group's data-parallel rank, and the result equals one process.
Tiny DiT in float64; tolerance 1e-9 absolute (observed ~1e-15; Adam's 1/√v amplifies round-off).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from test_parallel import LATENT, TINY, full, sample_batch, spawn, tiny_denoiser

from rcm_core.config import from_dict
from rcm_core.run.loop import run_training
from rcm_core.parallel.mesh import MeshShape

STEPS = 4


def _cfg(run_dir: Path, shape: MeshShape | None, steps: int = STEPS):
    parallel = {} if shape is None else {"dp_replicate": shape.dp_replicate, "dp_shard": shape.dp_shard,
                                         "cp": shape.cp}
    return from_dict({"model": TINY, "teacher": {"guidance": 3.0}, "parallel": parallel,
                      "distill": {"mode": "rcm", "tangent_warmup": 1, "student_update_freq": 2,
                                  "max_rollout_steps": 2},
                      "optim": {"lr": 1e-3, "fake_lr": 1e-3, "lr_warmup": 0},
                      "train": {"steps": steps, "checkpoint_every": 2, "log_every": 1, "run_dir": str(run_dir),
                                "device": "cpu"},
                      "resources": {"num_workers": 1 if shape is None else shape.world_size}})


def _source(cp: int):
    """Batches of this rank's data-parallel group; a CP rank other than the group's first must never read."""
    rank = dist.get_rank() if dist.is_initialized() else 0

    def batches(start: int):
        if rank % cp:
            raise AssertionError(f"rank {rank} read data, but only the first rank of its CP group may")
        return (sample_batch(it * 10 + rank // cp) for it in range(start, 10 ** 6))
    return batches


def _train(directory: str, name: str, shape: MeshShape | None, steps: int = STEPS, resume=None) -> None:
    cfg = _cfg(Path(directory) / name, shape, steps)
    reports: list[int] = []
    state = run_training(cfg, _source(shape.cp if shape else 1), lambda s, m, c: reports.append(s), resume,
                         teacher=tiny_denoiser(1), latent_shape=LATENT)
    params = {f"{k}.{n}": full(p).detach().clone() for k, mod in (("student", state.student),
                                                                  ("fake", state.fake),
                                                                  ("ema", state.ema.module))
              for n, p in mod.named_parameters()}
    if shape is not None and shape.dp_shard > 1:
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in state.student.parameters())
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"params": params, "iteration": state.iteration, "reports": reports},
                   Path(directory) / f"{name}.pt")


def _load(directory: Path, name: str) -> dict:
    return torch.load(directory / f"{name}.pt", weights_only=True)


def _assert_same(a: dict, b: dict, moved_from: dict | None = None) -> None:
    assert a["iteration"] == b["iteration"] == STEPS
    assert a["params"].keys() == b["params"].keys()
    for k, v in b["params"].items():
        torch.testing.assert_close(a["params"][k], v, atol=1e-9, rtol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    if moved_from is not None:     # the comparison is not vacuous: training changed the weights
        moved = max((v - moved_from[k]).abs().max().item() for k, v in b["params"].items() if k.startswith("student"))
        assert moved > 1e-4


def _initial() -> dict:
    t = tiny_denoiser(1)
    return {f"student.{n}": p.detach().clone() for n, p in t.named_parameters()}


def test_fsdp_from_config_matches_replicated_and_resumes(tmp_path):
    fsdp = MeshShape(1, 2, 1)
    spawn(_train, 2, str(tmp_path), "replicated", None)
    spawn(_train, 2, str(tmp_path), "fsdp", fsdp)
    _assert_same(_load(tmp_path, "fsdp"), _load(tmp_path, "replicated"), moved_from=_initial())
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_2"
    assert (ckpt / ".metadata").is_file() and not (ckpt / "state.pt").exists()   # sharded: DCP, not rank-0 save

    # Stop after 2 iterations, then resume from the latest (distributed) checkpoint to the end.
    spawn(_train, 2, str(tmp_path), "fsdp_resumed", fsdp, 2)
    spawn(_train, 2, str(tmp_path), "fsdp_resumed", fsdp, STEPS, "latest")
    resumed = _load(tmp_path, "fsdp_resumed")
    assert resumed["reports"] == [3, 4]           # it started at iteration 2
    _assert_same(resumed, _load(tmp_path, "fsdp"))


def test_context_parallel_from_config_reads_once_per_group_and_matches_one_process(tmp_path):
    spawn(_train, 2, str(tmp_path), "cp", MeshShape(1, 1, 2))
    _train(str(tmp_path), "single", None)          # this process, no group: batch 0 of every iteration
    _assert_same(_load(tmp_path, "cp"), _load(tmp_path, "single"), moved_from=_initial())


def test_unsharded_checkpoint_cannot_resume_a_sharded_run(tmp_path):
    import pytest
    _train(str(tmp_path), "plain", None, 2)
    with pytest.raises(Exception, match="unsharded checkpoint"):
        spawn(_train, 2, str(tmp_path), "plain", MeshShape(1, 2, 1), STEPS, "latest")
