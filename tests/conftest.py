"""Shared pytest fixtures: the local stack's real services (S3 server, PostgreSQL-backed MLflow, Ray head).

    .venv/bin/python -m pytest tests/test_data.py tests/test_stack.py -q

Services start lazily, once per session, through `cluster/local_stack.py`'s `Stack` (the same code as
`make stack-up`), in a private state folder with free ports, and stop at the end of the session:
    s3_endpoint   "http://127.0.0.1:PORT"  (moto server; buckets mlflow-artifacts, rcm-data, rcm-checkpoints;
                  also exported as AWS_ENDPOINT_URL for the session, credentials "testing")
    mlflow_uri    "http://127.0.0.1:PORT"  (MLflow server on PostgreSQL, artifacts in s3://mlflow-artifacts, basic
                  auth: the stack's account is exported as MLFLOW_TRACKING_USERNAME/PASSWORD for the session)
    ray_address   "127.0.0.1:PORT"         (a Ray head with dashboard; `stack.env()["RAY_API_SERVER_ADDRESS"]`
                  is the job-submission URL)
    ray_connected ray.init(address=ray_address) for one test module, ray.shutdown() after it
    local_stack   the `Stack` itself (state_dir, env(), urls(), status())
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Before anything imports ray or botocore (reference §7): no token auth (P11), no usage stats, quiet Ray Data,
# dummy S3 credentials and no EC2 metadata look-ups (which hang for seconds off-cloud).
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller takes a worker's report off its queue (of size 1) only
# when it polls the workers, every 2 s by default, so each ray.train.report waited up to 2 s: with train.log_every=1
# that was 2.4 s per step of a tiny model (tests/test_faults_ray.py: 250 s -> 133 s at 0.2 s). Every Ray process the
# tests start (local Ray, the stack's head, `ray job submit`) inherits it from here. Only timing changes: same data,
# noise and losses (test_faults_ray compares its fast reference run bit for bit against the killed one).
for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                   "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                   "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(key, value)

# `make test` runs the suite in two pytest-xdist workers (the scheduler at the end of this file says which worker
# takes what). Each worker gets its own Ray temp folder: a local Ray's `session_latest` (read by
# tests/test_workflow_distill.py) and the `ray_current_cluster` record are then always the worker's own, never the
# other worker's; every Ray process a worker starts (local Ray, distill.py subprocesses) inherits it.
# And one torch (OpenMP) thread per worker, set before torch is imported (subprocesses and Ray workers inherit it):
# two workers of two threads each on 2 cores spin in each other's OpenMP barriers. Measured on this project's 2-core
# box (2026-12-04): a small 2-thread training loop took 3-5 s alone and 34 s beside a second copy; at one thread each,
# two copies took 5.5 s side by side.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _ray_tmp = Path(tempfile.gettempdir()) / f"rcm-ray-{os.environ['PYTEST_XDIST_WORKER']}"
    _ray_tmp.mkdir(exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", str(_ray_tmp))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _import_triton_for_the_interpreter() -> None:
    """On CPU, the kernel tests run Triton's interpreter. triton.jit fixes a function's mode when it is
    decorated, and triton's own standard library (tl.zeros, …) is decorated when triton is first imported: if
    anything imports triton first in compiled mode, interpreted kernels later fail ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). So import it once here, in interpreter mode, before any test runs."""
    import importlib.util

    import torch
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None or "triton" in sys.modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_the_interpreter()


@pytest.fixture(scope="session")
def local_stack():
    from cluster.local_stack import Stack

    # Not under pytest's tmp_path: that is 0700, and PostgreSQL runs as the `postgres` user when tests run as root.
    state = Path(tempfile.mkdtemp(prefix="rcm-stack-", dir="/tmp"))
    state.chmod(0o755)
    stack = Stack(state)
    yield stack
    stack.down()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint(local_stack):
    url = local_stack.up(["s3"])["s3_endpoint"]
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


def postgres_missing() -> str | None:
    """Why the MLflow server's PostgreSQL cannot start here, or None. CI has it; a laptop may not."""
    from cluster.local_stack import PG_BIN

    missing = [name for name in ("initdb", "postgres") if not (PG_BIN / name).is_file()]
    return (f"needs PostgreSQL 15's {' and '.join(missing)} in {PG_BIN} (Debian: apt-get install postgresql-15, "
            f"or set RCM_PG_BIN)") if missing else None


needs_postgres = pytest.mark.skipif(postgres_missing() is not None, reason=postgres_missing() or "")


@pytest.fixture(scope="session")
def mlflow_uri(local_stack, s3_endpoint):
    """The stack's MLflow server asks who you are (basic auth): its non-admin account is exported for the session
    as MLFLOW_TRACKING_USERNAME/PASSWORD, which MLflow's client reads, so every client in the tests (and the Ray
    workers they start here, which inherit the environment) logs as that user."""
    if reason := postgres_missing():
        pytest.skip(reason)
    uri = local_stack.up(["mlflow"])["mlflow_uri"]
    account = local_stack.mlflow_client_env()
    old = {k: os.environ.get(k) for k in account}
    os.environ.update(account)
    yield uri
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_address(local_stack, s3_endpoint):
    # after s3 so the head's workers inherit AWS_ENDPOINT_URL and the keys
    return local_stack.up(["ray"])["ray_address"]


@pytest.fixture(scope="module")
def ray_connected(ray_address):
    import ray

    ray.init(address=ray_address, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: float sums happen in one order (the same metrics on every run and
    machine), and no OpenMP oversubscription on the 2-core CI machine. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def scalar_cpu_kernels():
    """Inductor's CPU C++ kernels without explicit SIMD (`cpp.simdlen=1`) for one test. The CPU compile tests check
    what inductor makes of a graph (capture, AOT autograd, lowering, fusion: the same kernels, 53 for the tiny VAE)
    against eager; the vectorised C++ is not what a run uses (GPU runs compile to Triton). Scalar kernels take
    inductor less Python codegen and g++ time: the three compile tests took 133 s instead of 197 s from an empty
    inductor cache (a clean clone) on the idle 2-core box, 2026-12-03."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.simdlen": 1}):
        yield



@pytest.fixture
def random_items(monkeypatch):
    """moving_fashion's items from seeded random images (200, ten classes): no Fashion-MNIST or scikit-learn needed."""
    import numpy as np

    from rcm_core.data import moving_fashion

    def items(split: str = "train"):
        rng = np.random.default_rng(0)
        labels = np.arange(200) % 10
        images = (rng.random((200, 28, 28)) * 255 * (0.3 + labels[:, None, None] / 15)).astype(np.uint8)
        return images, labels.astype(np.int64), "test-random"
    monkeypatch.setattr(moving_fashion, "load_items", items)


# `make test`'s two xdist workers share the files this way: every file whose tests start a Ray cluster or the
# local stack's services (marked `ray` or `services`) is one unit of work, run file after file by one worker; every
# other file is a unit of its own (its tests together, so its module fixtures start once), taken by whichever
# worker is free. Two Ray clusters starting side by side on 2 cores missed Ray's own deadlines (2026-12-04, fresh
# clones: `ray start --head` gave up after its fixed 30 s for the raylet to register, the CLI stack test beside the
# sweep). xdist's own groups (`xdist_group` with --dist loadgroup) do not work with pytest 9.2, which no longer
# reads the node id xdist 3.8 rewrites, hence the scheduler below. The controller does not collect, so it finds
# the cluster files by their mark in the source; each worker checks that against the marks it collected.
CLUSTER_MARKS = ("pytest.mark.ray", "pytest.mark.services")


def cluster_files() -> set[str]:
    """tests/ files (as "tests/test_x.py") whose source marks a test `ray` or `services`."""
    here = Path(__file__).parent
    return {f"{here.name}/{f.name}" for f in here.glob("test_*.py")
            if any(mark in f.read_text() for mark in CLUSTER_MARKS)}


@pytest.hookimpl(optionalhook=True)      # a hook of xdist: without xdist installed, pytest would refuse it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    cluster = cluster_files()

    class ClusterFilesInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "cluster" if path in cluster else path

    return ClusterFilesInOneWorker(config, log)


def pytest_collection_modifyitems(session, config, items):
    """The cluster files first, then the other files with a slow test, each file in its usual order: the short
    files fill the end. Stable, so every xdist worker collects the same order (xdist needs it)."""
    rel = lambda item: item.nodeid.split("::", 1)[0]
    marked = {rel(item) for item in items if item.get_closest_marker("ray") or item.get_closest_marker("services")}
    cluster = cluster_files()
    if not marked <= cluster:
        raise pytest.UsageError(f"tests/conftest.py: {sorted(marked - cluster)} mark tests `ray`/`services` in a way "
                                f"cluster_files() does not see in their source; write it as {' or '.join(CLUSTER_MARKS)}")
    slow = {rel(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (rel(item) not in cluster, rel(item) not in slow))
