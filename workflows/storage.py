"""Where a run keeps its checkpoints (Ray Train storage: a local folder or s3://), and resuming: the latest
checkpoint of a run, the config it was trained with, and whether the same command may continue it."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from rcm_core.config import ExperimentCfg


def output_root() -> Path:
    """Where relative output paths (train.run_dir, the default MLflow file, built-in data sets) resolve: the
    current folder, except under `ray job submit --working-dir`, whose driver runs in a temporary copy of the
    working dir that Ray deletes when the job ends. There they resolve under RCM_HOME (default ~/rcm), so the run
    folder, checkpoints and MLflow file the job prints still exist afterwards, and a resubmitted job resumes."""
    cwd = Path.cwd()
    if "working_dir_files" in cwd.parts or any(part.startswith("_ray_pkg_") for part in cwd.parts):
        return Path(os.environ.get("RCM_HOME", "~/rcm")).expanduser().resolve()
    return cwd


def _strip_scheme(storage: str, fs) -> str:
    """With an explicit filesystem Ray wants `bucket/path`, not `s3://bucket/path`."""
    return storage.split("://", 1)[1] if fs is not None else storage

def storage_filesystem(storage: str, endpoint: str = ""):
    """pyarrow's S3 client for s3:// storage, with the endpoint from `endpoint` (the config's data.s3_endpoint),
    else AWS_ENDPOINT_URL (moto, MinIO…); None for other storage and for AWS itself."""
    if not storage.startswith("s3://"):
        return None
    import pyarrow.fs as pafs
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
    if not endpoint:
        return None                      # real AWS: Ray resolves the filesystem from the URI itself
    scheme, host = endpoint.split("://", 1)
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme,
                             region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))

def run_storage(cfg: ExperimentCfg) -> tuple[str, object]:
    """Where Ray Train keeps the run's checkpoints: (path as Ray wants it, filesystem or None)."""
    storage = cfg.train.storage_path or str(Path(cfg.train.run_dir).resolve().parent / "ray_results")
    fs = storage_filesystem(storage, cfg.data.s3_endpoint)
    return _strip_scheme(storage, fs), fs

RESUMED_TAG, FORCED_TAG = "rcm.resume.changed", "rcm.resume.forced"

# Ray Train's checkpoint manager logs three lines at INFO whenever it reads a run's snapshot ("A run snapshot was
# found … configure a new, unique `RunConfig(name)` or delete the existing folder"): advice for a trainer about to
# start, printed twice on every resumed or finished run by the driver's two read-only looks below (seen in `make
# demo` run again, 2026-12-03, and in the front door's resubmitted job). The driver says what it found in its own
# line (workflows/distill.py); the trainer's own read, on the controller, still logs it when --verbose shows Ray.
_SNAPSHOT_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


@contextlib.contextmanager
def _reading_snapshot():
    log = logging.getLogger(_SNAPSHOT_LOGGER)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def latest_ray_checkpoint(cfg: ExperimentCfg):
    """The newest checkpoint of the Ray Train run `{name}-ray` (what a run of this config resumes from) and the
    metrics reported with it, or None when there is none yet. Read only, without Ray's snapshot notice."""
    from ray.train.v2.api.result import Result

    path, fs = run_storage(cfg)
    try:
        with _reading_snapshot():
            result = Result.from_path(f"{path.rstrip('/')}/{cfg.name}-ray", storage_filesystem=fs)
    except RuntimeError:                       # no run folder, or no checkpoint written yet
        return None
    return None if result.checkpoint is None else (result.checkpoint, result.metrics or {})

def latest_run_config(cfg: ExperimentCfg) -> dict | None:
    """The config saved in the checkpoint a run of `cfg` would resume from, {} for a checkpoint without one
    (written before configs were saved), None when there is no checkpoint."""
    from rcm_core.run.checkpoint import RUN_CONFIG_FILE

    latest = latest_ray_checkpoint(cfg)
    if latest is None:
        return None
    ckpt = latest[0]
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{RUN_CONFIG_FILE}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return {}

def finished_checkpoint(cfg: ExperimentCfg) -> str | None:
    """The path of the run's checkpoint if it already reached train.steps (the same command run again): then
    there is nothing to train, and no worker needs to start. Otherwise, when a checkpoint exists, says in one line
    where the run resumes from."""
    latest = latest_ray_checkpoint(cfg)
    if latest is None:
        return None
    step = latest[1].get("step", -1)
    if step >= cfg.train.steps:
        return latest[0].path
    print(f"run '{cfg.name}' resumes from its checkpoint at step {step}: {latest[0].path}", flush=True)
    return None

def check_resume(cfg: ExperimentCfg, *, allow_changed: bool = False) -> dict[str, str]:
    """Before a run resumes its checkpoint, compare the config it was trained with: keys that shape training must
    be the same (a different λ must not continue a run whose MLflow params say another); steps, logging and
    evaluation keys may change. Returns the MLflow tags that record what changed; raises ConfigError naming the
    differing keys unless `allow_changed` (--resume-changed), which is then recorded as a tag too."""
    from rcm_core.config import check_resume_config, show_changes as show

    shaping, free = check_resume_config(
        latest_run_config(cfg), cfg, allow_changed=allow_changed,
        fixes=f"Either give this run a new name (name=NEW), or continue the old run anyway with --resume-changed "
              f"(recorded as the MLflow tag {FORCED_TAG})")
    tags = {RESUMED_TAG: show(free)[:5000]} if free else {}
    if free:
        print(f"run '{cfg.name}' resumes with: {show(free)}", flush=True)
    if shaping:
        tags[FORCED_TAG] = show(shaping)[:5000]
        print(f"run '{cfg.name}' resumes despite (--resume-changed): {show(shaping)}", flush=True)
    return tags
