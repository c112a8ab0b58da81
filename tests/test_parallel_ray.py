"""The FSDP2 and context-parallel checks of tests/test_parallel.py, run by Ray Train workers instead of a plain
process group: Ray Train (V2) starts 2 CPU workers and their gloo group; the workers run the same functions.

    .venv/bin/python -m pytest tests/test_parallel_ray.py -q     # ~1-3 min on 2 shared cores (Ray start-up)
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _train_loop(config: dict) -> None:
    """Runs inside each Ray Train worker, whose torch process group Ray Train has already set up."""
    import test_parallel as tp
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == 2
    tp._context_parallel_worker(tp.MeshShape(1, 1, 2))
    tp._fsdp_worker(tp.MeshShape(1, 2, 1), 3, config["ref"])


def test_fsdp_and_context_parallel_under_ray_train():
    import ray
    import test_parallel as tp
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ref = tp.fsdp_reference(2)
    # Ray workers import test_parallel by name (pickled by reference, pitfall P10): put tests/ on their path.
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    # address="local": its own instance, not the newest `ray start` cluster recorded on the machine (a stale
    # record made ray.init refuse num_cpus on a shared box, 2026-12-02)
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        trainer = TorchTrainer(_train_loop, train_loop_config={"ref": ref},
                               torch_config=TorchConfig(backend="gloo"),
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                                            resources_per_worker={"CPU": 0.5}))
        result = trainer.fit()                   # a failed assertion in a worker raises here
        assert result.error is None
    finally:
        ray.shutdown()
