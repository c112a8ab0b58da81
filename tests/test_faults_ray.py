"""Processes killed mid-run, on the product path (`python workflows/distill.py` in a subprocess, local Ray):

  1. a Ray Train worker SIGKILLed after a checkpoint: Ray Train restarts the worker group from the latest
     reported checkpoint (FailureConfig(max_failures=2)), the run reaches its last step, one MLflow run;
  2. later in the same run the driver itself SIGKILLed, and the same command run again: it resumes from the
     checkpoint step, in the same MLflow run.

One uninterrupted run with the same seed is the reference for the loss trajectory, which must match bit for bit:
the same data order (Ray Data's preserve_order, kept through Ray Train by workflows.data_config.GroupReaderDataConfig),
the same noise (seeded per step and rank) and the data stream replayed to the checkpoint's step on resume
(workflows.data.resumable_batches). All invocations share one module fixture (about 3 minutes on 2 loaded cores
with the reference beside the killed run, 3.8 with the two in a row; 4.2 before the reference and the re-run used the
session's 0.2 s Ray Train poll, tests/conftest.py). Numbers measured here are in docs/RELIABILITY.md.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local_stack import session_members

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
RAY_AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
STEPS, EVERY = 16, 4
TINY = ["teacher.train_steps=50", "model.hidden=32", "model.depth=2", "data.num_rows=1024", "data.batch_size=64",
        "data.rows_per_shard=256", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
        "eval.num_samples=64", "eval.bootstrap=5", "sampler.teacher_steps=4", "distill.tangent_warmup=5",
        "resources.num_workers=1", "tracking.experiment=faults"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def left_only_agents(session: int) -> bool:
    """Whether all that is left of a killed driver's session is Ray's agents (which outlive it, see below)."""
    return {_cmdline(p).strip() for p in session_members(session)} <= RAY_AGENTS


class Run:
    """`python workflows/distill.py` for one run folder, in its own process session."""

    def __init__(self, base: Path, name: str):
        self.dir = base / name
        self.uri = f"sqlite:///{self.dir}/mlflow.db"
        self.args = [sys.executable, str(ROOT / "workflows" / "distill.py"), "--config",
                     str(ROOT / "experiments" / "smoke.yaml"), *TINY, f"data.url={base}/data",
                     f"tracking.tracking_uri={self.uri}", f"train.run_dir={self.dir}/run",
                     f"train.storage_path={self.dir}/ray_results"]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.env.pop("RAY_ADDRESS", None)              # a local Ray per invocation, owned by its driver
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, *, ray_train_poll: str | None = None) -> None:
        """ray_train_poll: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for this invocation, None = the session's (0.2 s,
        tests/conftest.py); "" = Ray's default (2 s)."""
        env = dict(self.env)
        if ray_train_poll == "":
            env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
        elif ray_train_poll is not None:
            env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = ray_train_poll
        log = open(self.dir / "driver.log", "ab")
        self.proc = subprocess.Popen(self.args, cwd=self.dir.parent, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, folder: Path, pattern: str, timeout: float = 600) -> None:
        """Until `folder` holds a path matching `pattern` (written whole: renamed into place) while this run lives."""
        deadline = time.monotonic() + timeout
        while not list(folder.glob(pattern)):
            assert self.proc.poll() is None, (f"run ended (rc {self.proc.returncode}) before {folder}/{pattern} "
                                              f"appeared:\n" + (self.dir / "driver.log").read_text()[-3000:])
            assert time.monotonic() < deadline, f"no {folder}/{pattern} after {timeout} s"
            time.sleep(0.2)

    def wait_for_checkpoint(self, step: int, timeout: float = 600) -> None:
        # the loop writes it into Ray's run folder (workflows.trainer.managed_checkpoint_root), renamed when whole
        self.wait_for(self.dir, f"ray_results/*-ray/checkpoints/step_{step}", timeout)

    def processes(self, title: str) -> list[int]:
        return [p for p in session_members(self.proc.pid) if _cmdline(p).startswith(title)]

    def finish(self, timeout: float = 900) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """SIGKILL whatever is left of this invocation's session (only processes this test started)."""
        if self.proc is not None:
            for p in session_members(self.proc.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def history(self) -> tuple[list[tuple[int, float]], list]:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(self.uri)
        runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
        hist = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
        return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.timestamp, m.step))], runs


@pytest.fixture(scope="module")
def killed_and_reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    ref, run = Run(base, "reference"), Run(base, "killed")
    out = {}
    try:
        # The reference runs beside the killed run, not before it: the killed run spends most of its time waiting
        # on Ray Train's 2 s poll (below), so the reference's steps fit into its idle core (the fixture: 230 s with
        # the two in a row, 180 s side by side, 2026-12-03, loaded 2-core box). The two invocations share the data
        # set and the cached teacher (data.url and .cache/teachers under `base`), which the reference writes; the
        # killed run starts once the teacher file is there (written whole, by rename), so it reads both, as it did
        # when the reference had finished. Timing only: each run's losses are its own, compared bit for bit below.
        t0 = time.monotonic()
        ref.start()
        ref.wait_for(base / ".cache" / "teachers", "teacher-*.pt")

        t1 = time.monotonic()
        # Ray's default 2 s poll for the invocation whose driver is killed: after a driver's SIGKILL its Ray Train
        # controller still takes reports for about 2-3 s (fate sharing is not instant). At the session's 0.2 s poll a
        # step takes ~0.2 s, so the run reported 8 more steps, its step-32 checkpoint included, after a kill at 24
        # (measured, STEPS=32 EVERY=8): the re-run then had nothing to resume. At 2 s a step takes ~2.4 s and no
        # further checkpoint is reported (the assertion on the resume step checks that).
        run.start(ray_train_poll="")
        run.wait_for_checkpoint(2 * EVERY)        # step 2·EVERY written, so an earlier one is reported to Ray
        workers = run.processes("ray::RayTrainWorker")
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        out["worker_killed_after"] = 2 * EVERY
        run.wait_for_checkpoint(STEPS - EVERY)    # recovered and went on: now the driver
        os.killpg(run.proc.pid, 0)                # (the session still exists)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        deadline = time.monotonic() + 20          # its local Ray dies with it (Ray's fate sharing) ...
        while not left_only_agents(run.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        out["orphans_after_driver_kill"] = sorted(_cmdline(p).strip() for p in session_members(run.proc.pid))
        run.cleanup()
        out["driver_killed_after"] = STEPS - EVERY
        run.start()                               # the same command again
        assert run.finish() == 0, (run.dir / "driver.log").read_text()[-3000:]
        out["killed_s"] = time.monotonic() - t1
        assert ref.finish() == 0, (ref.dir / "driver.log").read_text()[-3000:]
        out["reference_s"] = time.monotonic() - t0
        out["reference"], out["reference_runs"] = ref.history()
        out["killed"], out["killed_runs"] = run.history()
        yield out
    finally:
        ref.cleanup()
        run.cleanup()


def _restarts(history: list[tuple[int, float]]) -> list[int]:
    """Steps at which the logged step went back (a resume): the first step logged after each restart."""
    return [s for (p, _), (s, _) in zip(history, history[1:]) if s <= p]


def test_worker_and_driver_kill_resume_from_checkpoints_in_one_mlflow_run(killed_and_reference):
    r = killed_and_reference
    runs = r["killed_runs"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [s for s, _ in r["killed"]]
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))
    restarts = _restarts(r["killed"])
    assert len(restarts) == 2, r["killed"]                    # the worker restart, then the re-run driver
    for first, killed_after in zip(restarts, (r["worker_killed_after"], r["driver_killed_after"])):
        assert (first - 1) % EVERY == 0 and first - 1 <= killed_after   # resumed right after a checkpoint step
    redone = len(steps) - STEPS
    # ... except two agents the raylet started (measured: reparented to init and alive 60 s later; Ray's, not
    # ours, and harmless to the re-run, which starts its own Ray). Nothing else of the killed session may survive.
    assert set(r["orphans_after_driver_kill"]) <= RAY_AGENTS, r["orphans_after_driver_kill"]
    print(f"\nleft of the killed driver's session: {r['orphans_after_driver_kill']}; reference {r['reference_s']:.0f} s, "
          f"killed run {r['killed_s']:.0f} s; resumed at steps {restarts}; "
          f"{redone} steps computed twice")


def test_loss_trajectory_through_both_restarts_is_bit_exact(killed_and_reference):
    """Every value the killed run logged, before a kill, redone after a restart, or new, equals the uninterrupted
    run's at that step exactly (CPU, one worker: same data order, same noise, same arithmetic)."""
    r = killed_and_reference
    ref = dict(r["reference"])
    assert sorted(ref) == list(range(1, STEPS + 1))
    wrong = [(s, v, ref[s]) for s, v in r["killed"] if v != ref[s]]
    assert not wrong, wrong
