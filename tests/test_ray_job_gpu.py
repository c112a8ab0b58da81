"""The front-door bench (`experiments/bench/ray_job_gpu.py`) reads job states from `ray job status` output, in the
forms Ray 2.60's CLI prints: a sentence once the job ended ("Job '<id>' succeeded" was seen on 2026-12-02, when the
old upper-case-only match made the bench wait 5 minutes for a finished job), "Status for job '<id>': RUNNING" while
it is alive. A failed job's free-text status message must not be read as another state."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
from ray_job_gpu import job2_steps, job_command, parse_job_status, wait_budget  # noqa: E402

JOB = "raysubmit_LnRbSXwBV6x2ygfS"
HEAD = "2026-12-02 17:03:24,230\tINFO cli.py:42 -- Job submission server address: http://127.0.0.1:42181\n"


def test_ended_and_running_jobs_are_read():
    assert parse_job_status(HEAD + f"SUCC cli.py:67 -- Job '{JOB}' succeeded\n", JOB) == "SUCCEEDED"
    assert parse_job_status(HEAD + f"ERR cli.py:67 -- Job '{JOB}' failed\nStatus message: the driver succeeded "
                            "in nothing; was stopped? RUNNING\n", JOB) == "FAILED"
    assert parse_job_status(HEAD + f"INFO cli.py:67 -- Job '{JOB}' was stopped\n", JOB) == "STOPPED"
    assert parse_job_status(HEAD + f"INFO cli.py:83 -- Status for job '{JOB}': RUNNING\n"
                            "INFO cli.py:85 -- Status message: Job is currently running.\n", JOB) == "RUNNING"
    assert parse_job_status(HEAD + f"INFO cli.py:83 -- Status for job '{JOB}': PENDING\n", JOB) == "PENDING"
    assert parse_job_status(HEAD, JOB) == "UNKNOWN"


def test_waits_leave_the_reserve_before_the_deadline():
    """`--deadline-s`: each wait is cut so the head's stop, the MLflow read and the table fit before the deadline
    (2026-12-03 a device call's limit killed the bench inside a wait, and nothing it had measured came back)."""
    assert wait_budget(330, now=100, deadline=None) == 330                 # no deadline: the wait's own timeout
    assert wait_budget(330, now=100, deadline=1000, reserve=90) == 330     # room to spare
    assert wait_budget(330, now=700, deadline=1000, reserve=90) == 210     # cut to leave the reserve
    assert wait_budget(330, now=950, deadline=1000, reserve=90) == 0       # past it: poll no more


def test_job_2_steps_are_those_logged_after_its_submission():
    """Resumed or restarted, read from when each step was logged: with and without steps run again."""
    once = [(s, 1000 * s) for s in range(1, 13)]                   # job 1: 1..6, job 2 from 7, no step twice
    assert job2_steps(once, submitted_ms=6500) == list(range(7, 13))
    rerun = [(s, 1000 * s) for s in range(1, 8)] + [(s, 10_000 + 1000 * s) for s in range(7, 13)]
    assert job2_steps(rerun, submitted_ms=9000) == list(range(7, 13))        # step 7 after the checkpoint at 6
    restarted = [(s, 1000 * s) for s in range(1, 8)] + [(s, 10_000 + 1000 * s) for s in range(1, 13)]
    assert job2_steps(restarted, submitted_ms=9000)[0] == 1                  # began again: not resumed
    assert job2_steps(once, submitted_ms=None) == []


def test_one_job_checkpoints_only_at_its_end():
    """`--jobs one` runs to its end without a stop: its one checkpoint is the final one (a step-2 checkpoint of the
    1.3B config is 26.4 GiB written for nothing); the stop-and-resume modes checkpoint where the stop lands."""
    import argparse

    def every(jobs: str) -> list[str]:
        args = argparse.Namespace(steps=4, stop_at=2, batch=1, tiny=False, jobs=jobs)
        cmd = job_command(args, Path("/w"), Path("/w/teacher"), Path("/w/latents"))
        return [c for c in cmd if c.startswith("train.checkpoint_every=")]
    assert every("one") == ["train.checkpoint_every=4"]
    assert every("both") == every("first") == every("second") == ["train.checkpoint_every=2"]
