"""MLflow tracking for distillation runs: rank 0 logs, one run per distillation, resumable by run id.

Params are the flattened resolved config, tags the git commit and config hash. Metrics go into a buffer that
a background thread sends in batches, so `log_metrics` never waits on the network: MLflow's HTTP client retries
a refused connection for about 4 minutes before it gives up (measured, docs/RELIABILITY.md), which would stall
training for that long at every log step. While the server is unreachable the buffer grows and a warning says
so (once per outage); when it answers again everything is sent, each value once, in order. `finish()` waits
for the buffer to drain; what still cannot be sent then is written to `<run_dir>/mlflow_unsent_metrics.jsonl`
with a loud warning, never silently dropped. With no tracking URI in the
config or MLFLOW_TRACKING_URI, runs go to an SQLite file `runs/mlflow.db` with artifacts in `runs/mlartifacts`.

A tracking server that asks who you are (MLflow's basic-auth app: the local stack, cluster/tracking/mlflow.yaml) is
given an account only through the environment, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which MLflow's
client reads itself: never through the config (it would be logged as a param) or a Ray runtime_env (Ray keeps it in
its job table and writes it to its logs). Ray workers inherit it from their node: the local stack's Ray head and the
KubeRay pods carry it. `check_tracking_access` asks the server once before any work, so a missing or wrong account
ends the command in one line; the Tracker turns the same refusal on a worker into the same line.
"""
from __future__ import annotations

import os
import re
import json
import logging
import subprocess
import threading
import time
import warnings
from pathlib import Path

from rcm_core.config import ExperimentCfg, config_hash, flatten, redact_url

SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|access_key|api_key)", re.I)
DEFAULT_DB = "runs/mlflow.db"
UNSENT_FILE = "mlflow_unsent_metrics.jsonl"
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, evaluation runs); this one is model
# training. (The UI's own workflowType switch, `?workflowType=machine_learning`, overrides the tag when it is shown.)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
log = logging.getLogger(__name__)


def tracking_uri(cfg: ExperimentCfg, base: Path | None = None) -> str:
    """Config, else MLFLOW_TRACKING_URI, else runs/mlflow.db under `base` (default: the current folder), absolute."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{(Path(base or '.') / DEFAULT_DB).resolve()}"


def default_artifact_root(uri: str) -> str | None:
    """Beside an SQLite file: <db folder>/mlartifacts; servers choose their own artifact root."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


ACCOUNT_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")     # read by MLflow's client itself


def _user_error():
    from workflows.cli import UserError
    return UserError


def access_refused(status: int, shown_uri: str, experiment: str) -> Exception:
    """The one-line error for a tracking server's refusal: 401 (no account, or a wrong one) or 403 (an account
    without the permission). Names the account, never its password."""
    user = os.environ.get(ACCOUNT_VARS[0])
    if status == 401:
        who = f"the account {user!r}" if user else "a request without an account"
        return _user_error()(
            f"the MLflow server {shown_uri} refused {who} (HTTP 401): set {ACCOUNT_VARS[0]} and {ACCOUNT_VARS[1]} to "
            f"one of its accounts, where the driver runs and on every Ray node (local stack: source .stack/stack.env; "
            f"Kubernetes: the Secret rcm-mlflow-ray)")
    return _user_error()(
        f"the MLflow server {shown_uri} does not let the account {user!r} write to experiment '{experiment}' (HTTP "
        f"403): ask an MLflow admin to grant it EDIT there, or log to an experiment of its own (tracking.experiment=...)")


def check_tracking_access(cfg: ExperimentCfg) -> None:
    """Before any work: one request to a tracking server with this environment's account. A refusal (401/403)
    raises `access_refused`'s one-line error here, not as a Ray worker's traceback minutes later. A local SQLite
    store has no accounts; a server that does not answer is left to the Tracker's outage handling."""
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        answer = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                              params={"experiment_name": cfg.tracking.experiment}, max_retries=0, timeout=30,
                              raise_on_status=False)
    except MlflowException:            # no answer at all: not an account problem
        return
    if answer.status_code in (401, 403):
        raise access_refused(answer.status_code, redact_url(uri), cfg.tracking.experiment)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def redact(params: dict) -> dict:
    """Drop anything that looks like a credential, and strip user:password@ from URLs."""
    out = {}
    for k, v in params.items():
        if SECRET_KEY.search(k):
            continue
        out[k] = redact_url(v) if isinstance(v, str) else v
    return out


class Tracker:
    """Rank-0 MLflow logger. `run_id` resumes an existing run (a restarted or re-submitted job)."""

    def __init__(self, cfg: ExperimentCfg, run_id: str | None = None, parent_run_id: str | None = None,
                 retry_s: float = 2.0, warn_after_s: float = 30.0):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        self.shown_uri = redact_url(self.uri)          # the URI in messages and logs: without credentials
        if self.uri.startswith("sqlite:"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        from mlflow.exceptions import MlflowException
        try:
            self.experiment_id, self.run_id = self._open_run(cfg, run_id, parent_run_id)
        except MlflowException as e:   # the server's auth refused this process's account: say so in one line
            status = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(e.error_code)
            if status is None:
                raise
            raise access_refused(status, self.shown_uri, cfg.tracking.experiment) from None
        self._unsent_dir = Path(cfg.train.run_dir)
        self.retry_s, self.warn_after_s = retry_s, warn_after_s
        self.outages = 0                               # separate periods with the server unreachable
        self._pending: list = []
        self._lock = threading.Lock()                  # guards _pending; the client itself is used by both threads
        self._wake = threading.Event()
        self._closing = False
        # One outage detector, shared by both threads under _state_lock: a send that failed, or one that has
        # waited longer than warn_after_s (MLflow's client retries a refused connection for minutes before it
        # raises, so waiting is how an outage shows first). It ends at the first success of a send that began
        # after it was declared (a send already in flight may succeed on a server that was only slow).
        self._state_lock = threading.Lock()
        self._down_since: float | None = None
        self._inflight_since: float | None = None
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._sender.start()

    def _open_run(self, cfg: ExperimentCfg, run_id: str | None, parent_run_id: str | None) -> tuple[str, str]:
        """(experiment id, run id): the experiment made if new, and a new run unless `run_id` resumes one."""
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(cfg.tracking.experiment,
                                                   artifact_location=default_artifact_root(self.uri))
        else:
            exp_id = exp.experiment_id
        if exp is None or EXPERIMENT_KIND[0] not in exp.tags:
            self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        if run_id is None:
            tags = {"git_commit": git_commit(), "config_hash": config_hash(cfg), "algo": cfg.distill.mode,
                    "mlflow.runName": cfg.tracking.run_name or cfg.name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=tags)
            run_id = run.info.run_id
            self._log_params(cfg, run_id)
        return exp_id, run_id

    def _log_params(self, cfg: ExperimentCfg, run_id: str) -> None:
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in redact(flatten(cfg)).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue the values and return at once; the sender thread delivers them."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        with self._lock:
            self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
            waiting = len(self._pending)
        self._wake.set()
        started = self._inflight_since
        if started is not None and time.monotonic() - started > self.warn_after_s:
            self._outage_started(f"no answer for {time.monotonic() - started:.0f} s", waiting)

    def _outage_started(self, why: str, waiting: int) -> None:
        with self._state_lock:
            if self._down_since is not None:
                return                                 # already declared (by the other thread, or earlier)
            self._down_since = time.monotonic()
            self.outages += 1
        msg = (f"MLflow at {self.shown_uri} unreachable ({why}); training goes on, {waiting} metric values are "
               f"kept and sent when it answers again")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(timeout=self.retry_s)
            self._wake.clear()
            ok = self._send_pending()
            if self._closing and (ok or not self.pending):
                return
            if not ok:
                time.sleep(self.retry_s)

    def _send_pending(self) -> bool:
        """Send what is queued, oldest first, 500 values a request; a value leaves the queue only once the server
        has accepted it. False if the server could not be reached (the rest stays queued)."""
        while True:
            with self._lock:
                chunk = self._pending[:500]
            if not chunk:
                return True
            began = self._inflight_since = time.monotonic()
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as e:   # any transport or server error: keep the values, try again later
                self._inflight_since = None
                self._outage_started(type(e).__name__, self.pending)
                return False
            self._inflight_since = None
            with self._lock:
                del self._pending[:len(chunk)]
            with self._state_lock:
                down, recovered = self._down_since, self._down_since is not None and began >= self._down_since
                if recovered:
                    self._down_since = None
            if recovered:
                log.warning("MLflow at %s answers again after %.0f s; queued metric values are being sent",
                            self.shown_uri, time.monotonic() - down)

    def close(self, timeout: float = 300.0) -> int:
        """Drain the queue (up to `timeout` s) and stop the sender. Whatever is left is written to
        <run_dir>/mlflow_unsent_metrics.jsonl (one JSON object a line) with a loud warning; returns that count."""
        self._closing = True
        self._wake.set()
        self._sender.join(timeout)
        with self._lock:
            left, self._pending = self._pending, []
        if left:
            self._unsent_dir.mkdir(parents=True, exist_ok=True)
            path = self._unsent_dir / UNSENT_FILE
            with open(path, "a") as fh:
                for m in left:
                    fh.write(json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value,
                                         "timestamp": m.timestamp, "step": m.step}) + "\n")
            msg = (f"MLflow at {self.shown_uri} still unreachable after {timeout:.0f} s: {len(left)} metric values of run "
                   f"{self.run_id} were NOT sent; they are in {path}")
            log.error(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return len(left)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED", timeout: float = 300.0) -> None:
        self.close(timeout)
        self.client.set_terminated(self.run_id, status=status)
