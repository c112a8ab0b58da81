"""The front-door bench (`experiments/bench/ray_job_gpu.py`) reads job states from `ray job status` output, in the
forms Ray 2.60's CLI prints: a sentence once the job ended ("Job '<id>' succeeded" was seen on 2026-12-02, when the
old upper-case-only match made the bench wait 5 minutes for a finished job), "Status for job '<id>': RUNNING" while
it is alive. A failed job's free-text status message must not be read as another state."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
from ray_job_gpu import parse_job_status  # noqa: E402

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
