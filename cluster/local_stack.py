"""The real stack on one machine: S3-compatible server, PostgreSQL, MLflow server, Ray head — all on loopback.

    python cluster/local_stack.py up        # start everything (or: up --services s3,ray), print the URLs
    source .stack/stack.env                 # AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS, ...
    python cluster/local_stack.py status    # each service: pid, alive, healthy, URL
    python cluster/local_stack.py down      # stop exactly what `up` started

What runs (every port picked free at start, so parallel stacks and test sessions never collide):
  s3        `moto_server` (moto's server mode), buckets mlflow-artifacts, rcm-data, rcm-checkpoints; any credentials
  postgres  PostgreSQL from `initdb` into <state>/postgres/data (as the `postgres` user when run as root, since
            initdb refuses root), TCP on 127.0.0.1 only, no unix socket, scram password in <state>/secrets.json;
            databases `mlflow` (runs) and `mlflow_auth` (MLflow's users and permissions)
  mlflow    `mlflow server --app-name basic-auth` (MLflow's built-in HTTP basic authentication, as in
            cluster/tracking/mlflow.yaml): every request but /health and /static needs a user and password, else
            401. PostgreSQL backend store, proxied artifacts in s3://mlflow-artifacts (a local folder when s3 is
            not part of the stack); job runner off, 1 worker (reference P12). Two accounts: `admin` (creates the
            other; its password stays in secrets.json) and `rcm`, the non-admin account clients log runs with.
            A verified password is cached for 60 s (MLflow's auth_cache_ttl_seconds; each check costs ~0.5 s).
            Every secret reaches the server through its environment (PGPASSWORD, MLFLOW_AUTH_ADMIN_PASSWORD,
            MLFLOW_FLASK_SERVER_SECRET_KEY), never its command line, which `ps` shows to every user: both store
            URIs name no password.
  ray       `ray start --head --block` with the dashboard (so `ray job submit` works), RAY_AUTH_MODE=disabled
            (P11), PYTHONPATH = this checkout (P10), 4 logical CPUs (P6), session files under <state>/ray.
            Ray refuses 127.0.0.1 as a node IP, so GCS/raylet listen on the machine's address too; the dashboard
            (job submission) listens on 127.0.0.1 only. Ray worker ports: a random window in 20000–31999.
            Healthy (and `up` done) once the job API and the head's dashboard agent, which runs a job's driver,
            both answer: the first `ray job submit` is then never refused for want of an agent.
            The head's environment holds the MLflow account (MLFLOW_TRACKING_USERNAME/PASSWORD, which MLflow's
            client reads), so every Ray worker inherits it from its node, as the KubeRay pods get it from a
            Secret: never through a job's runtime_env, which Ray keeps in its job table and writes to its logs.

Every service runs in its own process session; <state>/state.json records the leader PID and its start time, and
`down` signals only processes of those sessions (never `ray stop`, which would kill every Ray on the machine).
Logs: <state>/logs/<service>.log. URLs: <state>/stack.env (shell, mode 600: also the MLflow account as
MLFLOW_TRACKING_USERNAME/PASSWORD and the PostgreSQL URI with its password as $RCM_STACK_POSTGRES_URI) and
<state>/stack.json (no password; the printout neither). The passwords are made once, at the first `up`, into
<state>/secrets.json (mode 600), which `down` keeps: PostgreSQL's data and MLflow's users outlive a `down`, and the
next `up` must present the same passwords.
The state folder defaults to <checkout>/.stack (or $RCM_STACK_DIR). The pytest fixtures in tests/conftest.py use
this module's `Stack` class.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:                       # `python cluster/local_stack.py` from a checkout
    sys.path.insert(0, str(REPO))
from rcm_core.config import redact_url  # noqa: E402

PG_URI_VAR = "RCM_STACK_POSTGRES_URI"                # only in stack.env (mode 600), never printed
AUTH_DB = "mlflow_auth"                              # MLflow's users and permissions, beside the runs' `mlflow`
MLFLOW_ADMIN = "admin"
MLFLOW_CLIENT = "rcm"                                # the account tests, jobs and Ray workers log runs with
MLFLOW_AUTH_CACHE_S = 60                             # how long the server trusts a verified password
SERVICES = ("s3", "postgres", "mlflow", "ray")
NEEDS = {"mlflow": ("postgres",)}                   # mlflow without its backend store makes no sense
BUCKETS = ("mlflow-artifacts", "rcm-data", "rcm-checkpoints")
S3_KEY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PG_BIN = Path(os.environ.get("RCM_PG_BIN", "/usr/lib/postgresql/15/bin"))


class StackError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Processes: start in a new session, find every member of a session, stop them.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name may contain spaces: fields after the last ')' are well-formed
    return raw[raw.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    f = _stat(pid)
    return None if f is None else int(f[19])          # field 22 (starttime) of proc(5)


def session_members(sid: int) -> list[int]:
    """PIDs in the session `sid` (the leader we started) plus all their descendants, zombies excluded.

    Descendants count too because some services leave the session: every PostgreSQL backend calls setsid()."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat(int(d.name))
            if f is not None and f[0] != "Z":              # f[0] = state, f[1] = parent, f[3] = session
                procs[int(d.name)] = (int(f[1]), int(f[3]))
    out = {pid for pid, (_, s) in procs.items() if s == sid}
    grew = True
    while grew:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in out and pid not in out}
        out |= new
        grew = bool(new)
    return sorted(out)


def spawn(cmd: list[str], log: Path, env: dict[str, str], user: str | None = None) -> dict:
    """Start `cmd` as a session leader with output appended to `log`; return its record for state.json."""
    if user:
        cmd = ["runuser", "-u", user, "--"] + cmd
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:    # opened here (as the caller) so a service running as another user can log
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True)
    return {"pid": proc.pid, "start_time": start_time(proc.pid), "cmd": cmd, "log": str(log)}


def alive(rec: dict) -> bool:
    """The recorded leader still runs (same PID *and* start time, so a reused PID does not count; zombies don't)."""
    f = _stat(rec["pid"])
    return f is not None and f[0] != "Z" and int(f[19]) == rec.get("start_time")


# Seconds each service gets between SIGTERM and SIGKILL. Ray 2.60's GCS server does not exit on SIGTERM (seen
# 2026-12-04: the head's session still held it after the full 15 s, every time), so waiting longer only delays
# the SIGKILL that ends it; its raylet and workers exit within a second. The rest shut down cleanly on SIGTERM.
GRACE_S = {"ray": 2.0}


def stop_session(rec: dict, sig: int = signal.SIGTERM, grace: float = 15.0) -> list[int]:
    """Signal every process of the session `rec` started, wait, then SIGKILL what is left. Returns the PIDs."""
    sid = rec["pid"]
    if not alive(rec) and not session_members(sid):
        return []
    members = session_members(sid)
    for pid in members:
        _kill(pid, sig)
    deadline = time.monotonic() + grace
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_members(sid):
        _kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_until(check, what: str, timeout: float, rec: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rec is not None and not alive(rec):
            raise StackError(f"{what}: the process exited; see {rec['log']}")
        try:
            if check():
                return
        except Exception:     # noqa: BLE001 — not up yet; any error is retried until the deadline
            pass
        time.sleep(0.25)
    raise StackError(f"{what}: not healthy after {timeout:.0f} s" + (f"; see {rec['log']}" if rec else ""))


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def http_status(url: str) -> int:
    """The HTTP status a GET of `url` answers with (an error status too); raises when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# ----------------------------------------------------------------------------------------------------------
# The stack.

@dataclass
class Stack:
    state_dir: Path = field(default_factory=lambda: Path(os.environ.get("RCM_STACK_DIR", REPO / ".stack")))
    state: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=1))
        # Passwords live in secrets.json and stack.env only (both mode 600); stack.json and the printout show the
        # PostgreSQL URI redacted and name no MLflow password.
        env = {**self.env(), **({PG_URI_VAR: self._pg_uri(sqlalchemy=True)} if "postgres" in self.state else {})}
        env_file = self.state_dir / "stack.env"
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
        env_file.chmod(0o600)
        (self.state_dir / "stack.json").write_text(json.dumps(self.shown_urls(), indent=1))

    # --- what clients need ---------------------------------------------------------------------------------
    def urls(self) -> dict[str, str]:
        s, out = self.state, {}
        if "s3" in s:
            out["s3_endpoint"] = f"http://127.0.0.1:{s['s3']['port']}"
        if "postgres" in s:
            out["postgres_uri"] = self._pg_uri(sqlalchemy=True)
        if "mlflow" in s:
            out["mlflow_uri"] = f"http://127.0.0.1:{s['mlflow']['port']}"
        if "ray" in s:
            out["ray_address"] = f"127.0.0.1:{s['ray']['port']}"
            out["ray_dashboard"] = f"http://127.0.0.1:{s['ray']['dashboard_port']}"
        return out

    def shown_urls(self) -> dict[str, str]:
        """urls() with the password replaced by *** (for printing and stack.json)."""
        return {k: redact_url(v) for k, v in self.urls().items()}

    def env(self) -> dict[str, str]:
        """Environment variables for clients (tests, users' shells, Ray jobs)."""
        u, env = self.urls(), {}
        if "s3_endpoint" in u:
            env.update(AWS_ENDPOINT_URL=u["s3_endpoint"], MLFLOW_S3_ENDPOINT_URL=u["s3_endpoint"], **S3_KEY,
                       AWS_EC2_METADATA_DISABLED="true")
        if "mlflow_uri" in u:
            env["MLFLOW_TRACKING_URI"] = u["mlflow_uri"]
            env.update(self.mlflow_client_env())
        if "ray_address" in u:
            # ray.init() reads RAY_ADDRESS (GCS host:port); `ray job submit` reads RAY_API_SERVER_ADDRESS first
            env.update(RAY_ADDRESS=u["ray_address"], RAY_API_SERVER_ADDRESS=u["ray_dashboard"],
                       RAY_AUTH_MODE="disabled")
        return env

    def mlflow_client_env(self) -> dict[str, str]:
        """The non-admin MLflow account, as the variables MLflow's client reads."""
        return {"MLFLOW_TRACKING_USERNAME": MLFLOW_CLIENT,
                "MLFLOW_TRACKING_PASSWORD": self.secrets()["mlflow_client_password"]}

    @property
    def secrets_file(self) -> Path:
        return self.state_dir / "secrets.json"

    def secrets(self) -> dict[str, str]:
        """The stack's passwords: made at the first call (mode 600 from the start), then read back."""
        if self.secrets_file.exists():
            return json.loads(self.secrets_file.read_text())
        made = {"postgres_password": secrets.token_hex(16), "mlflow_admin_password": secrets.token_hex(16),
                "mlflow_client_password": secrets.token_hex(16), "mlflow_flask_secret_key": secrets.token_hex(32)}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(made, f, indent=1)
        return made

    def _pg_uri(self, db: str = "mlflow", sqlalchemy: bool = False, password: bool = True) -> str:
        """libpq URI (psycopg2); sqlalchemy=True names the driver, since SQLAlchemy 2.1 defaults to psycopg 3.
        password=False leaves out the user and password: for `mlflow server`, whose libpq reads them from PGUSER
        and PGPASSWORD, as in cluster/tracking/mlflow.yaml."""
        port = self.state["postgres"]["port"]
        scheme = "postgresql+psycopg2" if sqlalchemy else "postgresql"
        user = f"postgres:{self.secrets()['postgres_password']}@" if password else ""
        return f"{scheme}://{user}127.0.0.1:{port}/{db}"

    # --- up / down / status ---------------------------------------------------------------------------------
    def up(self, services: tuple[str, ...] | list[str] = SERVICES) -> dict[str, str]:
        wanted = _with_dependencies(services)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:                        # fixed order: s3 and postgres before mlflow
            if name in wanted and not (name in self.state and alive(self.state[name])):
                t0 = time.monotonic()
                self.state[name] = getattr(self, f"_start_{name}")()
                self.state[name]["startup_s"] = round(time.monotonic() - t0, 1)
                self._save()
        return self.urls()

    def down(self) -> dict[str, list[int]]:
        stopped = {}
        for name in reversed(SERVICES):             # clients first: ray and mlflow before postgres and s3
            if name in self.state:
                rec = self.state[name]
                if name == "postgres" and alive(rec):
                    self._pg_ctl_stop(rec)           # a clean, fast shutdown before any signal
                stopped[name] = stop_session(rec, grace=GRACE_S.get(name, 15.0))
                left = session_members(rec["pid"])
                if left:
                    raise StackError(f"{name}: processes {left} survived SIGKILL; they stay in {self.state_file}")
                del self.state[name]
                self._save()
        return stopped

    def status(self) -> dict[str, dict]:
        out = {}
        for name, rec in self.state.items():
            ok = alive(rec)
            out[name] = {"pid": rec["pid"], "alive": ok, "healthy": ok and _safe(getattr(self, f"_health_{name}")),
                         "processes": len(session_members(rec["pid"])), "log": rec["log"]}
        return out

    # --- s3 -----------------------------------------------------------------------------------------------
    def _start_s3(self) -> dict:
        port = free_port()
        exe = str(Path(sys.executable).with_name("moto_server"))
        rec = spawn([exe, "-H", "127.0.0.1", "-p", str(port)], self.logs / "s3.log", _env())
        rec["port"] = port
        self.state["s3"] = rec
        wait_until(self._health_s3, "s3 (moto_server)", 60, rec)
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        for b in BUCKETS:
            s3.create_bucket(Bucket=b)
        return rec

    def _health_s3(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.state['s3']['port']}/")

    # --- postgres -----------------------------------------------------------------------------------------
    def _start_postgres(self) -> dict:
        user = "postgres" if os.geteuid() == 0 else None      # initdb refuses to run as root
        data = self.state_dir / "postgres" / "data"
        if (data / "PG_VERSION").exists() and not self.secrets_file.exists():
            raise StackError(f"{data} holds a database whose password is not in {self.secrets_file} (made by an "
                             f"older local_stack.py): delete {data.parent} and run `up` again")
        password = self.secrets()["postgres_password"]
        if not (data / "PG_VERSION").exists():
            self._initdb(data, password, user)
        port = free_port()
        rec = spawn([str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                     "-c", "unix_socket_directories=", "-c", "max_connections=50"],
                    self.logs / "postgres.log", _env(), user)
        rec.update(port=port, data=str(data), user=user)
        self.state["postgres"] = rec
        wait_until(lambda: self._health_postgres(db="postgres"), "postgres", 60, rec)
        self._create_db("mlflow")
        return rec

    def _initdb(self, data: Path, password: str, user: str | None) -> None:
        data.parent.mkdir(parents=True, exist_ok=True)
        pwfile = data.parent / "pwfile"
        pwfile.write_text(password + "\n")
        if user:
            pw = pwd.getpwnam(user)
            for p in (data.parent, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            # the service user must reach its folder through every parent of the state folder
            probe = subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(data.parent)])
            if probe.returncode != 0:
                raise StackError(f"user {user} cannot write {data.parent}: put the stack's state folder where "
                                 f"{user} can reach it (RCM_STACK_DIR), e.g. under the checkout or /tmp/<dir> 0755")
        cmd = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-host=scram-sha-256",
               "--auth-local=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"]
        if user:
            cmd = ["runuser", "-u", user, "--"] + cmd
        with open(self.logs / "postgres.log", "ab") as log:
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        pwfile.unlink()
        if r.returncode != 0:
            raise StackError(f"initdb failed (exit {r.returncode}); see {self.logs / 'postgres.log'}")

    def _health_postgres(self, db: str = "mlflow") -> bool:
        import psycopg2

        with psycopg2.connect(self._pg_uri(db), connect_timeout=2) as conn:   # in-process: argv never sees it
            return conn.cursor() is not None

    def _create_db(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self._pg_uri("postgres"))
        conn.autocommit = True           # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()

    def _pg_ctl_stop(self, rec: dict) -> None:
        cmd = [str(PG_BIN / "pg_ctl"), "stop", "-D", rec["data"], "-m", "fast", "-w", "-t", "20"]
        if rec.get("user"):
            cmd = ["runuser", "-u", rec["user"], "--"] + cmd
        with open(self.logs / "postgres.log", "ab") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)

    # --- mlflow -------------------------------------------------------------------------------------------
    def _start_mlflow(self) -> dict:
        port, sec = free_port(), self.secrets()
        self._create_db(AUTH_DB)
        auth_ini = self.state_dir / "mlflow_auth.ini"            # no secret in it: the URI names no password
        # auth_cache_ttl_seconds: MLflow checks the password of every request against its scrypt hash, which took
        # 0.56 s of the server's one worker per request on the 2-core box (0.04 s with the cache, 2026-12-04): a
        # Ray Train run's metrics and artifacts queued behind it. MLflow's own cache remembers a verified account
        # for 60 s; a password changed through the server's API (as `_ensure_mlflow_client` does) drops it at once,
        # only a change written straight into the user database waits out the 60 s. (cluster/tracking/mlflow.yaml
        # keeps MLflow's default, no cache: its account script rewrites the database before the server starts.)
        auth_ini.write_text(f"[mlflow]\ndefault_permission = READ\n"
                            f"database_uri = {self._pg_uri(AUTH_DB, sqlalchemy=True, password=False)}\n"
                            f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                            f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_S}\n")
        env = _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",          # P12: no huey job consumers
                   PGUSER="postgres", PGPASSWORD=sec["postgres_password"],   # libpq reads them for both stores
                   MLFLOW_AUTH_CONFIG_PATH=str(auth_ini), MLFLOW_AUTH_ADMIN_USERNAME=MLFLOW_ADMIN,
                   MLFLOW_AUTH_ADMIN_PASSWORD=sec["mlflow_admin_password"],   # used when the admin does not exist
                   MLFLOW_FLASK_SERVER_SECRET_KEY=sec["mlflow_flask_secret_key"])
        if "s3" in self.state:
            env.update({k: v for k, v in self.env().items() if not k.startswith("MLFLOW_TRACKING")})  # S3 + keys
            artifacts = "s3://mlflow-artifacts"
        else:
            artifacts = str(self.state_dir / "mlartifacts")
        exe = str(Path(sys.executable).with_name("mlflow"))
        rec = spawn([exe, "server", "--app-name", "basic-auth",
                     "--backend-store-uri", self._pg_uri(sqlalchemy=True, password=False),
                     "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1"], self.logs / "mlflow.log", env)
        rec.update(port=port, artifacts=artifacts)
        self.state["mlflow"] = rec
        wait_until(self._health_mlflow, "mlflow server", 120, rec)     # first start runs the DB migrations
        self._ensure_mlflow_client()
        return rec

    def _ensure_mlflow_client(self) -> None:
        """The non-admin account of stack.env: created by the admin on the first start, its password set again on
        later ones (the user database outlives `down`)."""
        body = {"username": MLFLOW_CLIENT, "password": self.secrets()["mlflow_client_password"]}
        try:
            self._mlflow_admin("GET", f"/api/2.0/mlflow/users/get?username={MLFLOW_CLIENT}")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise StackError(f"mlflow server: looking up user {MLFLOW_CLIENT!r} as {MLFLOW_ADMIN!r} gave HTTP "
                                 f"{e.code}; see {self.logs / 'mlflow.log'}") from None
            self._mlflow_admin("POST", "/api/2.0/mlflow/users/create", body)
            return
        self._mlflow_admin("PATCH", "/api/2.0/mlflow/users/update-password", body)

    def _mlflow_admin(self, method: str, path: str, body: dict | None = None) -> dict:
        import base64

        token = base64.b64encode(f"{MLFLOW_ADMIN}:{self.secrets()['mlflow_admin_password']}".encode()).decode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.state['mlflow']['port']}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def _health_mlflow(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.state['mlflow']['port']}/health")

    # --- ray ----------------------------------------------------------------------------------------------
    def _start_ray(self) -> dict:
        ports = {k: free_port() for k in ("port", "dashboard_port", "node_manager_port", "object_manager_port",
                                          "ray_client_server_port", "dashboard_agent_listen_port",
                                          "dashboard_agent_grpc_port", "runtime_env_agent_port",
                                          "metrics_export_port")}
        lo = 20000 + 100 * secrets.randbelow(120)       # a random window of worker ports below the ephemeral range
        env = _env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   # Ray Data's Parquet reader would start 32 footer-reader processes per read; one, as
                   # workflows/data.py's FOOTER_ACTORS says why
                   RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=os.environ.get("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   # `ray job submit -- python x.py` runs through a shell: `python` must be this environment's
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        env.update({k: v for k, v in self.env().items() if not k.startswith("RAY_")})   # S3/MLflow for jobs
        # The MLflow account even when the head starts before the MLflow server: workers inherit it from here.
        env.update(self.mlflow_client_env())
        tmp = self.state_dir / "ray"
        tmp.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               f"--num-cpus={os.environ.get('RCM_STACK_RAY_CPUS', '4')}",
               f"--object-store-memory={512 * 2**20}", f"--temp-dir={tmp}", "--disable-usage-stats",
               f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}"]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in ports.items()]
        rec = spawn(cmd, self.logs / "ray.log", env)
        rec.update(ports)
        self.state["ray"] = rec
        wait_until(self._health_ray, "ray head", 240, rec)      # its agent took 72 s on a loaded 2-core box
        return rec

    def _health_ray(self) -> bool:
        # `ray job submit` needs the head's job API (/api/jobs/ answers once its job manager is up) and the head
        # node's dashboard agent, which starts the job's driver: the head waits only 10 s for the agent to
        # register, and on a loaded 2-core box the agent came up 72 s after `ray start` (2026-12-04), so the
        # first submission failed with "No available agent to submit job". The agent also listens on 127.0.0.1;
        # once its job module serves, it answers a job it does not know with 404.
        rec = self.state["ray"]
        agent = f"http://127.0.0.1:{rec['dashboard_agent_listen_port']}/api/job_agent/jobs/rcm-stack-health/logs"
        return http_ok(f"http://127.0.0.1:{rec['dashboard_port']}/api/jobs/") and http_status(agent) == 404


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _safe(check) -> bool:
    try:
        return bool(check())
    except Exception:     # noqa: BLE001 — unhealthy, whatever the reason
        return False


def _with_dependencies(services) -> set[str]:
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    out = set(services)
    for s in list(out):
        out.update(NEEDS.get(s, ()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--state-dir", default=os.environ.get("RCM_STACK_DIR", str(REPO / ".stack")))
    ap.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of " + ",".join(SERVICES))
    args = ap.parse_args(argv)
    stack = Stack(Path(args.state_dir))
    try:
        if args.command == "up":
            try:
                stack.up([s for s in args.services.split(",") if s])
            except BaseException:
                stack.down()          # never leave half a stack running
                raise
            for name, rec in stack.state.items():
                print(f"{name:9s} pid {rec['pid']:>7d}  up in {rec.get('startup_s', 0):5.1f} s  log {rec['log']}")
            print(json.dumps(stack.shown_urls(), indent=1))
            print(f"source {stack.state_dir / 'stack.env'}   # also the MLflow account (MLFLOW_TRACKING_USERNAME/"
                  f"PASSWORD) and the PostgreSQL URI with its password (${PG_URI_VAR})")
        elif args.command == "down":
            for name, pids in stack.down().items():
                print(f"{name:9s} stopped {len(pids)} process(es)")
        elif args.command == "status":
            st = stack.status()
            for name, s in st.items():
                print(f"{name:9s} pid {s['pid']:>7d}  alive={s['alive']}  healthy={s['healthy']}  "
                      f"processes={s['processes']}  log {s['log']}")
            if not st:
                print("nothing running (no services in", stack.state_file, ")")
            return 0 if all(s["healthy"] for s in st.values()) else 1
        else:
            print("".join(f"export {k}={v}\n" for k, v in stack.env().items()), end="")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
