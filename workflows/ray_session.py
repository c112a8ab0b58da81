"""Starting Ray for a command: a local instance with the dashboard on loopback, or the cluster a job was submitted
to (`ray job submit` / RAY_ADDRESS), with this checkout on the workers' PYTHONPATH and the quiet-output settings.
Every entry point (distill, sweep, encode_videos) starts Ray through `init_ray`."""
from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def init_ray(address: str | None) -> bool:
    """Connect to Ray, or start a local instance; True when this call started one (then the caller shuts it down
    when done, `shutdown_local_ray`)."""
    import ray

    from workflows.console import ray_init_kwargs, worker_env

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Workers import rcm_core/workflows by module name (pitfall P10): this checkout goes first on their path.
    # The quiet-output settings (workflows/console.py) travel with it, so a cluster's workers get them too.
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` Ray refuses to merge a key the job's own runtime env already sets: keep the job's.
        # A cluster's nodes keep their own PYTHONPATH after ours (Ray expands ${PYTHONPATH} on each node).
        env_vars = {"PYTHONPATH": f"{ROOT}{os.pathsep}${{PYTHONPATH}}", **worker_env()}
        taken = job_env_vars()
        ray.init(address=address or os.environ["RAY_ADDRESS"], **ray_init_kwargs(),
                 runtime_env={"env_vars": {k: v for k, v in env_vars.items() if k not in taken}})
        return False
    # More logical CPUs than cores: the work is small and Ray Data needs slots beside the workers (P6).
    # The dashboard stays on (bound to loopback): it also serves the State API, which Ray Train's
    # PlacementGroupCleaner polls every second; without it each poll logs "Failed to query Ray Train Controller
    # actor state" (measured: 25 such lines in a 60-step run). The State API client finds its server through
    # RAY_API_SERVER_ADDRESS, else by looking for Ray on this machine, which fails when another Ray runs here too
    # ("Found multiple active Ray instances"): name ours. One machine has no node to be preempted: Ray Train's
    # preemption watcher would only add a core_worker error line about its restarts.
    port = free_port()
    env_vars = {"PYTHONPATH": worker_pythonpath(os.environ.get("PYTHONPATH", "")), **worker_env()}
    env_vars.update(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    # address="local": with no address ray.init joins the newest `ray start` cluster recorded on this machine
    # (another user's, or the stale record of one stopped by a signal: seen 2026-12-02 as "When connecting to an
    # existing cluster, num_cpus and num_gpus must not be provided"). A run without --ray-address gets its own.
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env={"env_vars": env_vars}, object_store_memory=512 * 2 ** 20,
             log_to_driver=True, **ray_init_kwargs())
    print(f"Ray: a local instance for this run; its dashboard: http://127.0.0.1:{port}", flush=True)
    return True


def shutdown_local_ray() -> None:
    """Stop the local instance this command started while the driver is whole, rather than at the interpreter's
    exit, where the GCS killed the driver's remaining actors as their processes went away and printed "Failed to
    kill actor … RpcError" into the demo's log (issue 27)."""
    import ray

    ray.shutdown()

def worker_pythonpath(driver_path: str) -> str:
    """The local instance's workers: this checkout, then the driver's own PYTHONPATH. Setting the checkout alone
    replaced the path Ray itself was imported from when Ray lives on PYTHONPATH (a wheel bundle unpacked on an
    air-gapped GPU host): every worker died at `import ray` and Ray Data retried them for minutes."""
    entries = [str(ROOT)] + [e for e in driver_path.split(os.pathsep) if e and e != str(ROOT)]
    return os.pathsep.join(entries)


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env this driver was submitted with (`ray job submit`), else {}."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}
    except (ValueError, AttributeError):
        return {}

def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
