"""The local stack (cluster/local_stack.py): every service answers a real client, and `down` leaves nothing.

    .venv/bin/python -m pytest tests/test_stack.py -q          # ~3–4 min on a 2-core machine

test_cli_up_status_down_leaves_no_process is docs/SCALE_OUT.md's local-stack walk-through: `make stack-up`,
`ray job submit` of experiments/smoke.yaml with cluster/runtime_env.yaml, the run read back from the MLflow
server, its Ray Train checkpoints in the S3 server's bucket, the same command again resuming at the saved step in the
same MLflow run, `make stack-down`, and no process left.

The MLflow server runs MLflow's basic-auth app (issue 27): both tests check that a request without the account, or
with a wrong password, is refused with 401 and that the account logs a run; the CLI test also checks that no
password is on any stack process's command line (`ps`) or in any log of the stack and of Ray, after a real job.
These checks reuse the stacks the two tests start anyway (about 2 s added).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
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


def check_mlflow_asks_who_you_are(env: dict, monkeypatch) -> None:
    """No credentials, or a wrong password: 401 with a Basic challenge, from the REST API and through MLflow's own
    client; the stack's account (MLFLOW_TRACKING_USERNAME/PASSWORD in `env`) answers 200. Leaves the account in
    os.environ, where MLflow's client reads it, for the checks that follow."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    assert http_status(url) == 401 and http_status(url, (user, password[::-1])) == 401
    assert http_status(url, (user, password)) == 200
    assert http_status(f"{env['MLFLOW_TRACKING_URI']}/health") == 200         # the probe needs no account
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments(max_results=1)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def http_status(url: str, account: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET, with basic auth when `account` is given."""
    import base64

    headers = {"Authorization": "Basic " + base64.b64encode(":".join(account).encode()).decode()} if account else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        assert e.code != 401 or e.headers["WWW-Authenticate"].startswith("Basic"), e.headers
        return e.code


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
def test_fixture_services_answer(local_stack, s3_endpoint, mlflow_uri, ray_address, tmp_path, monkeypatch):
    env = local_stack.env()
    assert env["AWS_ENDPOINT_URL"] == s3_endpoint and env["MLFLOW_TRACKING_URI"] == mlflow_uri
    assert env["RAY_ADDRESS"] == ray_address
    check_s3(env)
    check_mlflow_asks_who_you_are(env, monkeypatch)
    check_mlflow(env, local_stack.urls()["postgres_uri"])
    check_ray_job(env, tmp_path)
    assert all(s["healthy"] for s in local_stack.status().values())


@pytest.mark.services
@needs_postgres
@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")   # MLflow's server, imported here
def test_kubernetes_account_script_sets_the_accounts_from_secrets(local_stack, mlflow_uri, monkeypatch, capsys,
                                                                  tmp_path):
    """cluster/tracking/mlflow.yaml's accounts.py (run in the MLflow pod before `mlflow server`), here on the stack's
    real auth database with the environment the pod gives it (PGUSER/PGPASSWORD, the admin's and the Ray account's
    Secrets): the Ray account is created and logs in; run again with a rotated Secret, the new password works and the
    old one is refused; the admin keeps the password of its Secret. Nothing secret is printed. (In this process:
    a subprocess would pay MLflow's import twice, ~20 s on the loaded 2-core box.)

    The logins go to an MLflow server started here on the same databases with the ConfigMap's own basic_auth.ini
    (MLflow's default: no credential cache), as in the pod: the stack's server caches a verified password for 60 s
    (cluster/local_stack.py), so it would still take the old password of a rotation written straight into the
    database, which in the pod happens only before its server starts."""
    import re
    import runpy

    from cluster.local_stack import AUTH_DB, free_port, http_ok, spawn, stop_session, wait_until

    maps = {d["metadata"]["name"]: d for d in yaml.safe_load_all((REPO / "cluster/tracking/mlflow.yaml").read_text())
            if d and d["kind"] == "ConfigMap"}
    script = local_stack.state_dir / "accounts.py"
    script.write_text(maps["mlflow-auth"]["data"]["accounts.py"])
    ini = maps["mlflow-auth"]["data"]["basic_auth.ini"]
    assert "auth_cache_ttl_seconds" not in ini
    pg = f"127.0.0.1:{local_stack.state['postgres']['port']}"
    (tmp_path / "basic_auth.ini").write_text(re.sub(r"//[^/@]+:5432/", f"//{pg}/", ini))   # the pod's, on this PostgreSQL
    assert f"{pg}/{AUTH_DB}" in (tmp_path / "basic_auth.ini").read_text()
    sec, user = local_stack.secrets(), f"ray-{uuid.uuid4().hex[:8]}"
    for k, v in {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "PGUSER": "postgres",
                 "PGPASSWORD": sec["postgres_password"], "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                 "MLFLOW_AUTH_ADMIN_PASSWORD": sec["mlflow_admin_password"], "RCM_RAY_MLFLOW_USERNAME": user}.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = spawn([str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
                    "--backend-store-uri", f"postgresql+psycopg2://{pg}/mlflow", "--artifacts-destination",
                    str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                   tmp_path / "mlflow.log", {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                                             "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["mlflow_flask_secret_key"]})
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        first, rotated = uuid.uuid4().hex, uuid.uuid4().hex
        for password in (first, rotated):
            monkeypatch.setenv("RCM_RAY_MLFLOW_PASSWORD", password)
            runpy.run_path(str(script), run_name="__main__")
            printed = capsys.readouterr()
            assert f"MLflow account {user!r}" in printed.out
            assert password not in printed.out + printed.err and sec["mlflow_admin_password"] not in printed.out
            wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), "mlflow server", 120, server)
            assert http_status(url, (user, password)) == 200
        assert http_status(url, (user, first)) == 401
        assert http_status(url, ("admin", sec["mlflow_admin_password"])) == 200
    finally:
        stop_session(server)


@pytest.mark.services
@needs_postgres
def test_a_refused_account_ends_in_one_line(mlflow_uri, monkeypatch, capsys, tmp_path):
    """workflows/ against the authenticated server: without an account, or with a wrong password, the distill
    command stops before any work with one `error:` line naming the variables to set (and never the password),
    and the Tracker a Ray worker builds raises the same error; with the account it opens its run."""
    from rcm_core.config import ExperimentCfg
    from workflows.cli import UserError, run_cli
    from workflows.distill import main
    from workflows.tracking import Tracker

    password = os.environ["MLFLOW_TRACKING_PASSWORD"]
    argv = ["--config", str(REPO / "experiments/smoke.yaml"), f"tracking.tracking_uri={mlflow_uri}",
            f"train.run_dir={tmp_path / 'run'}", f"data.url={tmp_path / 'data'}"]
    for account, who in ((None, "a request without an account"), ("wrong-password-1", "the account 'rcm'")):
        if account:
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", account)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
            monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        assert run_cli(main, argv) == 1
        printed = capsys.readouterr()
        assert printed.err.strip().splitlines() == [
            f"error: the MLflow server {mlflow_uri} refused {who} (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to one of its accounts, where the driver runs and on every Ray node (local "
            "stack: source .stack/stack.env; Kubernetes: the Secret rcm-mlflow-ray)"], printed.err[-3000:]
        assert password not in printed.out + printed.err
        assert not (tmp_path / "data").exists()                       # stopped before any work
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rcm")
    cfg = ExperimentCfg()
    cfg.tracking.tracking_uri, cfg.tracking.experiment = mlflow_uri, f"auth-{uuid.uuid4().hex[:8]}"
    cfg.train.run_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"refused the account 'rcm' \(HTTP 401\)"):
        Tracker(cfg)                                     # still the wrong password
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    tracker = Tracker(cfg)
    tracker.finish()
    assert tracker.client.get_run(tracker.run_id).info.experiment_id == tracker.experiment_id


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


def passwords_in_argv(records: dict, passwords) -> list[str]:
    """Command lines (what `ps` shows every user) of the stack's processes that contain a password."""
    out = []
    for rec in records.values():
        for pid in session_members(rec["pid"]):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out += [f"{pid}: {cmd[:120]}" for p in passwords if p in cmd]
    assert sum(len(session_members(rec["pid"])) for rec in records.values()) >= 8     # sanity: it saw them
    return out


def files_holding(passwords, *folders: Path) -> list[str]:
    """Files under `folders` (the services' logs, Ray's session folder with every Ray process's log) that contain
    a password."""
    found = []
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file() and not f.is_symlink() and f.stat().st_size < 200 * 2**20:
                data = f.read_bytes()
                found += [str(f) for p in passwords if p.encode() in data]
    return found


def make(target: str, state: Path, timeout: float) -> subprocess.CompletedProcess:
    """`make <target>` on the stack in `state` (RCM_STACK_DIR), with this interpreter as the Makefile's PY. `-o`
    counts the venv stamp as up to date: this checks the stack targets, not the install."""
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", f"PY={sys.executable}", target],
                          cwd=REPO, env={**os.environ, "RCM_STACK_DIR": str(state)}, capture_output=True, text=True,
                          timeout=timeout)


def submit_smoke_job(env: dict, runtime_env: dict, steps: int) -> subprocess.CompletedProcess:
    """`ray job submit` of experiments/smoke.yaml for `steps` steps (a checkpoint every 10)."""
    r = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(REPO),
                        "--runtime-env-json", json.dumps(runtime_env), "--",
                        "python", "workflows/distill.py", "--config", "experiments/smoke.yaml", f"train.steps={steps}",
                        "train.checkpoint_every=10", "eval.num_samples=100", "eval.bootstrap=5"],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    return r


def check_smoke_job(env: dict) -> None:
    """docs/SCALE_OUT.md's local submission: experiments/smoke.yaml through `ray job submit` with
    cluster/runtime_env.yaml, then the run as the MLflow server reports it; its Ray Train checkpoints are objects
    in the S3 server's bucket, and the same command with more steps resumes at the saved step, in the same MLflow
    run. (The resume was tests/test_services_distill.py's own two submissions to the session's stack; here it reuses
    the stack and the first job this test runs anyway: one submission instead of three, ~60 s less on 2 cores.)"""
    import s3fs
    from mlflow.tracking import MlflowClient

    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    # The head already runs in this venv, and Ray would clone the whole venv to install `pip` (GBs, offline):
    # everything else of the cluster's runtime_env is used as it is.
    runtime_env.pop("pip")
    runtime_env.pop("working_dir")          # "." relative to the caller; --working-dir names the checkout instead
    home = Path(tempfile.mkdtemp(prefix="rcm-job-home-"))   # where the job's outputs go (workflows.storage.output_root)
    runtime_env.setdefault("env_vars", {})["RCM_HOME"] = str(home)
    steps = 20
    r = submit_smoke_job(env, runtime_env, steps)
    assert "nfe_2" in r.stdout                                   # the step-count table printed at the end
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
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"])
    assert [p for p in fs.find("rcm-checkpoints/smoke") if p.endswith("state.pt")], "no checkpoint objects in the bucket"

    submit_smoke_job(env, runtime_env, steps + 10)              # the same command, 10 steps more: resumes
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run.info.run_id     # resumed the same MLflow run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]


@pytest.mark.services
@pytest.mark.slow
@needs_postgres
def test_cli_up_status_down_leaves_no_process(monkeypatch):
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
        passwords = json.loads((state / "secrets.json").read_text()).values()
        assert len(passwords) == 4 and all(len(p) >= 32 for p in passwords)
        shown = up.stdout + up.stderr + json.dumps(urls) + json.dumps(records)
        assert not [p for p in passwords if p in shown]          # printed, stack.json, state.json: none of them
        assert urls["postgres_uri"].startswith("postgresql+psycopg2://***@127.0.0.1:")
        assert all((state / f).stat().st_mode & 0o077 == 0 for f in ("stack.env", "secrets.json"))
        check_s3(env)
        check_mlflow_asks_who_you_are(env, monkeypatch)
        check_mlflow(env, env["RCM_STACK_POSTGRES_URI"])
        check_smoke_job(env)            # its Ray workers log as the account they inherit from the head
        assert processes_mentioning(str(state))                           # sanity: the check sees the services
        assert not passwords_in_argv(records, passwords)
        assert not files_holding(passwords, state / "logs", state / "ray")
    finally:
        down = make("stack-down", state, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert json.loads((state / "state.json").read_text()) == {}
    assert all(session_members(rec["pid"]) == [] for rec in records.values())
    assert processes_mentioning(str(state)) == []
    import shutil

    shutil.rmtree(state, ignore_errors=True)
