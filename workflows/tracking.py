"""MLflow tracking for distillation runs: rank 0 logs, one run per distillation, resumable by run id.

Params are the flattened resolved config, tags the git commit and config hash. Metrics are buffered and
sent in batches; if the tracking server is unreachable the buffer is kept and re-sent on the next call
(a warning says how many are waiting), so an outage never stops training. With no tracking URI in the
config or MLFLOW_TRACKING_URI, runs go to an SQLite file `runs/mlflow.db` with artifacts in `runs/mlartifacts`.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
import warnings
from pathlib import Path

from rcm_core.config import ExperimentCfg, config_hash, flatten

SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|access_key|api_key)", re.I)
DEFAULT_DB = "runs/mlflow.db"




def tracking_uri(cfg: ExperimentCfg) -> str:
    """Config, else MLFLOW_TRACKING_URI, else runs/mlflow.db under the current folder, made absolute."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def default_artifact_root(uri: str) -> str | None:
    """Beside an SQLite file: <db folder>/mlartifacts; servers choose their own artifact root."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


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
        out[k] = re.sub(r"//[^/@\s]+:[^/@\s]+@", "//***@", v) if isinstance(v, str) else v
    return out


class Tracker:
    """Rank-0 MLflow logger. `run_id` resumes an existing run (a restarted or re-submitted job)."""

    def __init__(self, cfg: ExperimentCfg, run_id: str | None = None, parent_run_id: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        if self.uri.startswith("sqlite:"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(cfg.tracking.experiment,
                                                   artifact_location=default_artifact_root(self.uri))
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        if run_id is None:
            tags = {"git_commit": git_commit(), "config_hash": config_hash(cfg), "algo": cfg.distill.mode,
                    "mlflow.runName": cfg.tracking.run_name or cfg.name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(exp_id, tags=tags)
            run_id = run.info.run_id
            self._log_params(cfg, run_id)
        self.run_id = run_id
        self._pending: list = []
        self._mlflow = mlflow

    def _log_params(self, cfg: ExperimentCfg, run_id: str) -> None:
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in redact(flatten(cfg)).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.flush()

    def flush(self) -> bool:
        try:
            for i in range(0, len(self._pending), 500):
                self.client.log_batch(self.run_id, metrics=self._pending[i:i + 500])
            self._pending = []
            return True
        except Exception as e:   # any transport error: keep the metrics, try again next time
            warnings.warn(f"MLflow at {self.uri} unreachable ({type(e).__name__}); "
                          f"{len(self._pending)} metric values kept and re-sent later", stacklevel=2)
            return False

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
