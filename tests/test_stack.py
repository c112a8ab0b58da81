"""The local stack (cluster/local_stack.py): every service answers a real client, and `down` leaves nothing.

    .venv/bin/python -m pytest tests/test_stack.py -q          # ~1.5–2 min on a 2-core machine
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from cluster.local_stack import session_members

REPO = Path(__file__).resolve().parents[1]
STACK = [sys.executable, str(REPO / "cluster" / "local_stack.py")]


def check_s3(env: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"])
    key = f"rcm-data/smoke/{uuid.uuid4().hex}.bin"
    fs.pipe(key, b"\x00latent\xff")
    assert fs.cat(key) == b"\x00latent\xff"
    assert {"mlflow-artifacts", "rcm-data", "rcm-checkpoints"} <= {b.rstrip("/") for b in fs.ls("", refresh=True)}


def check_mlflow(env: dict, postgres_uri: str) -> None:
    """Experiment, metric and artifact through the server; the metric is in PostgreSQL, the artifact in S3."""
    import psycopg2
    import s3fs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment(f"stack-smoke-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "eval/nfe_1/mean_prob", 0.75, step=3)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "resolved.yaml").write_text("name: smoke\n")
        client.log_artifact(run.info.run_id, str(Path(d, "resolved.yaml")), "config")
    client.set_terminated(run.info.run_id)
    found = client.search_runs([exp], "metrics.`eval/nfe_1/mean_prob` > 0.5")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/nfe_1/mean_prob")] == [(3, 0.75)]
    with psycopg2.connect(postgres_uri.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = %s", (run.info.run_id, "eval/nfe_1/mean_prob"))
        assert cur.fetchall() == [(0.75,)]
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
    assert any(p.endswith(f"{run.info.run_id}/artifacts/config/resolved.yaml") for p in fs.find("mlflow-artifacts"))


def check_ray_job(env: dict, tmp: Path) -> None:
    """`ray job submit --working-dir` of a trivial entrypoint that runs a Ray task and imports the project."""
    (tmp / "job.py").write_text(
        "import ray, rcm_core.data\n"
        "ray.init()\n"
        "print('RESULT', ray.get(ray.remote(lambda: 6 * 7).remote()))\n")
    r = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(tmp),
                        "--", "python", "job.py"], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0 and "RESULT 42" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.services
@pytest.mark.slow
def test_fixture_services_answer(local_stack, s3_endpoint, mlflow_uri, ray_address, tmp_path):
    env = local_stack.env()
    assert env["AWS_ENDPOINT_URL"] == s3_endpoint and env["MLFLOW_TRACKING_URI"] == mlflow_uri
    assert env["RAY_ADDRESS"] == ray_address
    check_s3(env)
    check_mlflow(env, local_stack.urls()["postgres_uri"])
    check_ray_job(env, tmp_path)
    assert all(s["healthy"] for s in local_stack.status().values())


def processes_mentioning(text: str) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state != "Z" and d.name != str(os.getpid()):
            out.append(f"{d.name}: {cmd[:200]}")
    return out


@pytest.mark.services
@pytest.mark.slow
def test_cli_up_status_down_leaves_no_process(tmp_path):
    state = Path(tempfile.mkdtemp(prefix="rcm-cli-stack-", dir="/tmp"))
    state.chmod(0o755)                      # PostgreSQL runs as `postgres` when tests run as root
    try:
        up = subprocess.run(STACK + ["up", "--state-dir", str(state)], capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        records = json.loads((state / "state.json").read_text())
        assert set(records) == {"s3", "postgres", "mlflow", "ray"}
        status = subprocess.run(STACK + ["status", "--state-dir", str(state)], capture_output=True, text=True,
                                timeout=120)
        assert status.returncode == 0 and status.stdout.count("healthy=True") == 4, status.stdout
        env = dict(line.removeprefix("export ").split("=", 1) for line in (state / "stack.env").read_text().split("\n")
                   if line)
        urls = json.loads((state / "stack.json").read_text())
        check_s3(env)
        check_mlflow(env, urls["postgres_uri"])
        check_ray_job(env, tmp_path)
        assert processes_mentioning(str(state))                           # sanity: the check sees the services
    finally:
        down = subprocess.run(STACK + ["down", "--state-dir", str(state)], capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert json.loads((state / "state.json").read_text()) == {}
    assert all(session_members(rec["pid"]) == [] for rec in records.values())
    assert processes_mentioning(str(state)) == []
    import shutil

    shutil.rmtree(state, ignore_errors=True)
