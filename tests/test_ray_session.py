"""The local Ray instance a command starts (`workflows.ray_session.init_ray`) keeps the driver's PYTHONPATH for
its workers. Seen on 2026-12-02 on a GPU host where Ray itself came from a wheel bundle on PYTHONPATH: the
workers' PYTHONPATH was set to the checkout alone, every worker died at `import ray`, and `prepare_latents.py`
sat for six minutes while Ray Data retried them."""
from __future__ import annotations

import os

import pytest

from workflows import ray_session
from workflows.ray_session import ROOT, worker_pythonpath


def test_worker_path_is_the_checkout_then_the_drivers_path():
    sep = os.pathsep
    assert worker_pythonpath("") == str(ROOT)
    assert worker_pythonpath(f"/opt/site{sep}/x") == sep.join([str(ROOT), "/opt/site", "/x"])
    assert worker_pythonpath(f"{ROOT}{sep}/opt/site{sep}") == sep.join([str(ROOT), "/opt/site"])


@pytest.mark.ray
def test_local_ray_workers_import_what_the_driver_imports(tmp_path, monkeypatch):
    """A module reachable only through the driver's PYTHONPATH imports in a Ray task (as Ray does from a bundle).
    And the instance is this run's own even when the machine records another `ray start` cluster (here a dead
    address, as a head stopped by a signal leaves behind): without address="local" ray.init tried to join it."""
    import ray
    from ray._private import services

    monkeypatch.setattr(services, "get_ray_address_from_environment", lambda *a, **k: "127.0.0.1:9")
    (tmp_path / "rcm_probe_module.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_session.init_ray(None)
    try:
        @ray.remote(num_cpus=0)
        def probe():
            import rcm_probe_module
            import rcm_core
            return rcm_probe_module.VALUE, os.path.dirname(os.path.dirname(rcm_core.__file__))

        value, root = ray.get(probe.remote(), timeout=120)
        assert value == 42 and root == str(ROOT)
    finally:
        ray_session.shutdown_local_ray()
