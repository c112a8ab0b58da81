"""The product path against real services on loopback: `ray job submit` of workflows/distill.py to a Ray head,
data and Ray Train checkpoints on the S3 server, MLflow on its PostgreSQL-backed server (tests/conftest.py
starts them through cluster/local_stack.py). A second submission resumes at the saved step, in the same run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.services, pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def submit(local_stack, env_vars: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **local_stack.env()}
    runtime_env = json.dumps({"env_vars": env_vars})
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(ROOT),
           "--runtime-env-json", runtime_env, "--", "python", "workflows/distill.py",
           "--config", "experiments/smoke.yaml", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_job_submit_tracks_checkpoints_in_s3_and_resumes(local_stack, s3_endpoint, mlflow_uri, ray_address, tmp_path):
    import s3fs
    from mlflow.tracking import MlflowClient

    env_vars = {k: v for k, v in local_stack.env().items()
                if k.startswith(("AWS_", "MLFLOW_")) or k == "RAY_AUTH_MODE"}
    env_vars["RCM_HOME"] = str(tmp_path)             # the job's run folder (workflows.storage.output_root), not ~/rcm
    first = submit(local_stack, env_vars, "train.steps=20")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "nfe_2" in first.stdout                       # the step-count table printed at the end

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("rcm-smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for name in ("nfe_1", "nfe_2", "nfe_4"):
        assert f"eval/{name}/gmm_precision" in runs[0].data.metrics
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    ckpts = [p for p in fs.find("rcm-checkpoints/smoke") if p.endswith("state.pt")]
    assert ckpts, "no checkpoint objects in the bucket"

    second = submit(local_stack, env_vars, "train.steps=30")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("rcm-smoke").experiment_id])
    assert len(runs) == 1                                 # resumed the same MLflow run
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [5, 10, 15, 20, 25, 30]
