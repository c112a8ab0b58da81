"""Every entry point ends a user's mistake with one line on stderr and a non-zero exit (2 for usage and config
errors), before Ray starts; `--debug` shows the traceback. Also the quiet-output pieces of workflows/console.py
(the short table, the one line per evaluation, the MLflow UI hint) and the comparison figure.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workflows import distill, prepare_latents, ray_session, report, sample, sweep
from workflows.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ray(monkeypatch):
    """A tripwire: starting Ray fails the test (the bad input must be refused before)."""
    def started(*args, **kwargs):
        raise AssertionError("Ray was started for an input that should have been refused first")
    monkeypatch.setattr(distill, "init_ray", started)           # distill binds the name at import
    monkeypatch.setattr(ray_session, "init_ray", started)       # sweep and encode_videos import it when they start Ray


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("main, argv, code, says", [
    (distill.main, ["distill.reg_wieght=0.1"], 2, "unknown key 'distill.reg_wieght'"),
    (distill.main, ["--config", "README.md"], 2, "README.md: not valid YAML (line "),
    (distill.main, ["--config", "experiments/nope.yaml"], 2, "does not exist"),
    (distill.main, ["data.source=dataset", "data.url=/nonexistent/rcm-data"], 1, "/nonexistent/rcm-data: no such folder"),
    (sweep.main, ["--config", "README.md"], 2, "not valid YAML"),
    (prepare_latents.main, ["--config", "Makefile"], 2, "Makefile: not valid YAML"),
    (prepare_latents.main, ["data.source=precomputed", "data.precomputed=/nonexistent.npz"], 2, "/nonexistent.npz"),
    (sample.main, ["--checkpoint", "README.md", "--steps", "1", "--num-samples", "2", "--out", "x.npy"], 1,
     "README.md is not a checkpoint"),
    (sample.main, ["--checkpoint", "no/such.pt", "--steps", "1", "--num-samples", "2", "--out", "x.npy"], 1,
     "no such file"),
    (report.main, ["--run", "abc", "--tracking-uri", "sqlite:////nonexistent/mlflow.db"], 2,
     "no MLflow store at sqlite:////nonexistent/mlflow.db"),
], ids=["typo-key", "config-not-yaml", "config-missing", "data-missing", "sweep-not-yaml", "prepare-not-yaml",
        "prepare-npz-missing", "sample-not-a-checkpoint", "sample-missing", "report-no-store"])
def test_user_errors_are_one_line(main, argv, code, says, capsys, no_ray, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    try:
        status = run_cli(main, argv)
    except SystemExit as e:               # sweep.py reports its config errors through argparse (same line, exit 2)
        status = e.code
    assert status == code
    assert says in _one_line_error(capsys)


def test_debug_shows_the_traceback(no_ray, monkeypatch):
    from rcm_core.config import ConfigError
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="reg_wieght"):
        run_cli(distill.main, ["--debug", "distill.reg_wieght=0.1"])


def test_argparse_usage_errors_keep_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, ["--steps", "1"])
    assert e.value.code == 2 and "required" in capsys.readouterr().err


def test_script_prints_one_line_and_exits_2():
    """The real command line, as a user types it (a subprocess: imports, run_cli, exit status)."""
    r = subprocess.run([sys.executable, "workflows/distill.py", "distill.reg_wieght=0.1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: unknown key 'distill.reg_wieght'") and len(r.stderr.splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------------------------------------
# What a run prints

def _report():
    from rcm_core.eval.metrics import Estimate
    from rcm_core.eval.report import StepCountReport
    est = lambda v: Estimate(v, v - 0.0123, v + 0.0123)  # noqa: E731
    metrics = ["fd_rp2", "kid_rp2", "precision_rp2", "recall_rp2", "density_rp2", "coverage_rp2", "div_ratio_rp2",
               "paired_mse", "gmm_coverage", "gmm_precision", "gmm_mode_kl", "gmm_mode_tv", "gmm_nll"]
    rows = {f"nfe_{n}": {"nfe": est(n), "sec_per_sample": est(2.5e-05 * n), **{m: est(0.1234 * n) for m in metrics}}
            for n in (1, 2, 4)}
    floor = {"nfe": est(99), "sec_per_sample": est(0.002934), **{m: est(-0.1222) for m in metrics}}
    return StepCountReport(rows, "teacher_nfe_99", floor, ("nfe", "sec_per_sample"))


def test_short_table_fits_100_columns_and_keeps_the_floor():
    from rcm_core.eval.report import format_table, short_table
    rep = _report()
    short, full = short_table(rep).splitlines(), format_table(rep).splitlines()
    assert max(map(len, short)) <= 100 < max(map(len, full))
    assert short[0].split() == ["name", "nfe", "sec_per_sample", "gmm_precision", "gmm_mode_tv", "fd_rp2"]
    assert [r.split()[0] for r in short[2:]] == ["nfe_1", "nfe_2", "nfe_4", "teacher_nfe_99"]


def test_eval_line_and_ui_hint():
    from rcm_core.eval.report import mlflow_metrics
    from workflows.console import eval_line, tracking_hint
    line = eval_line(400, {"train/loss": 1.0, **mlflow_metrics(_report())})
    assert line == "step 400: gmm_precision  1 step 0.1234 | 2 steps 0.2468 | 4 steps 0.4936 | teacher -0.1222"
    assert eval_line(25, {"train/loss": 1.0}) is None
    assert tracking_hint("http://127.0.0.1:5000", "3", "abc") == \
        "open http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert "ui --backend-store-uri sqlite:////x/mlflow.db --port 5000, then open http://127.0.0.1:5000/#/experiments/1?" \
        in tracking_hint("sqlite:////x/mlflow.db", "1")


def test_comparison_figure_has_a_column_per_sampler(tmp_path):
    from PIL import Image

    from rcm_core.eval.samples import save_comparison_figure
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 3
    videos = {k: torch.rand(12, 1, 4, 8, 8, generator=g) for k in ("nfe_2", "teacher_reference", "nfe_1")}
    png, gif = save_comparison_figure(videos, None, tmp_path / "c.png", labels=labels, report=None, title="t")
    a = Image.open(png)
    # 3 rows (one per class) of 3 columns, each a strip of 4 frames of 8 px drawn at 2x with 1 px gaps
    assert a.width >= 3 * (4 * 17 + 1) and a.height >= 3 * 17
    b = Image.open(gif)
    assert b.n_frames == 4 and b.size == (a.width, b.height)
    toy = {k: torch.randn(50, 2, 1, 1, 1, generator=g) for k in ("nfe_1", "teacher_reference")}
    (one,) = save_comparison_figure(toy, None, tmp_path / "toy.png", labels=torch.arange(50) % 4, report=_report(),
                                    title="demo")
    assert Image.open(one).width >= 2 * 240


def test_job_env_vars_are_left_to_the_submitted_job(monkeypatch):
    """Under `ray job submit --runtime-env …` Ray refuses a ray.init runtime_env that sets an env var the job's own
    runtime env sets (ValueError at ray.init, seen with cluster/runtime_env.yaml): init_ray leaves those keys out."""
    import json
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert ray_session.job_env_vars() == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_session.job_env_vars() == {}


def test_outputs_of_a_submitted_job_land_outside_rays_temporary_working_dir(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in .../runtime_resources/working_dir_files/_ray_pkg_<hash>,
    which Ray deletes: the run folder and the default MLflow file go under RCM_HOME instead, inputs stay relative
    to the job's folder (they were shipped with it)."""
    from rcm_core.config import load_config
    from workflows.driver import absolute_paths

    job = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    monkeypatch.setenv("RCM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = absolute_paths(load_config(REPO / "experiments" / "smoke.yaml", ["data.url=data/x", "train.run_dir=runs/s"]))
    assert cfg.train.run_dir == str(tmp_path / "home" / "runs" / "s")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'runs' / 'mlflow.db'}"
    assert cfg.data.url == str(job / "data" / "x")
    monkeypatch.chdir(tmp_path)                       # an ordinary folder: everything relative to it
    cfg = absolute_paths(load_config(REPO / "experiments" / "smoke.yaml", ["train.run_dir=runs/s"]))
    assert cfg.train.run_dir == str(tmp_path / "runs" / "s")
