"""The local stack (cluster/local_stack.py): every service answers a real client, and `down` leaves nothing.

    .venv/bin/python -m pytest tests/test_stack.py -q          # ~3–4 min on a 2-core machine

test_cli_up_status_down_leaves_no_process is docs/SCALE_OUT.md's local-stack walk-through: `make stack-up`,
`ray job submit` of experiments/smoke.yaml with cluster/runtime_env.yaml, the run read back from the MLflow
server, `make stack-down`, and no process left.
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
import yaml
from conftest import needs_postgres

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
        "import ray, rcm_core.data.latents\n"
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
    """Live processes whose command line or working folder contains `text` (a Ray job's driver and workers run in
    its unpacked working dir under the stack's Ray temp folder, with command lines that do not name it)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        try:
            cwd = os.readlink(d / "cwd")
        except OSError:
            cwd = ""
        if (text in cmd or text in cwd) and state != "Z" and d.name != str(os.getpid()):
            out.append(f"{d.name}: {cmd[:200]} (cwd {cwd})")
    return out


def make(target: str, state: Path, timeout: float) -> subprocess.CompletedProcess:
    """`make <target>` on the stack in `state` (RCM_STACK_DIR), with this interpreter as the Makefile's PY. `-o`
    counts the venv stamp as up to date: this checks the stack targets, not the install."""
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", f"PY={sys.executable}", target],
                          cwd=REPO, env={**os.environ, "RCM_STACK_DIR": str(state)}, capture_output=True, text=True,
                          timeout=timeout)


def check_smoke_job(env: dict) -> None:
    """docs/SCALE_OUT.md's local submission: experiments/smoke.yaml through `ray job submit` with
    cluster/runtime_env.yaml, then the run as the MLflow server reports it."""
    from mlflow.tracking import MlflowClient

    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    # The head already runs in this venv, and Ray would clone the whole venv to install `pip` (GBs, offline):
    # everything else of the cluster's runtime_env is used as it is.
    runtime_env.pop("pip")
    runtime_env.pop("working_dir")          # "." relative to the caller; --working-dir names the checkout instead
    home = Path(tempfile.mkdtemp(prefix="rcm-job-home-"))   # where the job's outputs go (workflows.storage.output_root)
    runtime_env.setdefault("env_vars", {})["RCM_HOME"] = str(home)
    steps = 10
    r = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(REPO),
                        "--runtime-env-json", json.dumps(runtime_env), "--",
                        "python", "workflows/distill.py", "--config", "experiments/smoke.yaml", f"train.steps={steps}",
                        "train.checkpoint_every=10", "eval.num_samples=100", "eval.bootstrap=5"],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert f"MLflow:        {env['MLFLOW_TRACKING_URI']}" in r.stdout, r.stdout[-2000:]   # the server, not SQLite
    assert f"MLflow UI:     open {env['MLFLOW_TRACKING_URI']}/#/experiments/" in r.stdout    # its page, not `mlflow ui`
    # the printed run folder outlives the job: not inside Ray's temporary working dir, which it deletes
    run_folder = Path(next(line for line in r.stdout.splitlines() if line.startswith("run folder:")).split(":", 1)[1].strip())
    assert run_folder.is_relative_to(home) and (run_folder / "eval_table.txt").is_file(), run_folder

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("rcm-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["train.steps"] == str(steps)
    assert all(f"eval/nfe_{n}/gmm_precision" in run.data.metrics for n in (1, 2, 4))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")][-1] == steps
    assert "config/resolved.yaml" in [f.path for f in client.list_artifacts(run.info.run_id, "config")]


@pytest.mark.services
@pytest.mark.slow
@needs_postgres
def test_cli_up_status_down_leaves_no_process():
    state = Path(tempfile.mkdtemp(prefix="rcm-cli-stack-", dir="/tmp"))
    state.chmod(0o755)                      # PostgreSQL runs as `postgres` when tests run as root
    try:
        up = make("stack-up", state, timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr
        records = json.loads((state / "state.json").read_text())
        assert set(records) == {"s3", "postgres", "mlflow", "ray"}
        status = subprocess.run(STACK + ["status", "--state-dir", str(state)], capture_output=True, text=True,
                                timeout=120)
        assert status.returncode == 0 and status.stdout.count("healthy=True") == 4, status.stdout
        env = dict(line.removeprefix("export ").split("=", 1) for line in (state / "stack.env").read_text().split("\n")
                   if line)
        urls = json.loads((state / "stack.json").read_text())
        password = records["postgres"]["password"]
        assert password not in up.stdout and password not in json.dumps(urls)    # printed and stack.json: redacted
        assert urls["postgres_uri"].startswith("postgresql+psycopg2://***@127.0.0.1:")
        assert (state / "stack.env").stat().st_mode & 0o077 == 0
        check_s3(env)
        check_mlflow(env, env["RCM_STACK_POSTGRES_URI"])
        check_smoke_job(env)
        assert processes_mentioning(str(state))                           # sanity: the check sees the services
    finally:
        down = make("stack-down", state, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert json.loads((state / "state.json").read_text()) == {}
    assert all(session_members(rec["pid"]) == [] for rec in records.values())
    assert processes_mentioning(str(state)) == []
    import shutil

    shutil.rmtree(state, ignore_errors=True)
