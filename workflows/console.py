"""What a run prints: Ray kept quiet unless `--verbose`, one line per evaluation, a short table, where results are.

    python workflows/distill.py > run.log 2>&1                # about 30 lines: bars, evaluations, table, locations
    python workflows/distill.py --verbose                     # plus Ray's own logs and Ray Data's progress bars

Quiet (the default), passed to every Ray process of the job through its runtime_env (so a cluster's workers and
Tune trial processes see it too): MLflow's INFO logs off (MLFLOW_LOGGING_LEVEL, the driver's too), Ray Data's progress bars off (`DataContext.enable_progress_bars` in the driver,
its environment variable in Tune trials), Ray Data and Ray Train logs on the console from WARNING up (their log
files under the Ray session folder keep everything), the driver's `ray` logger at WARNING, Python's deprecation
warnings off in Ray's processes, and workers' progress bars redrawn every 20 s.
Test: `.venv/bin/python -m pytest -q tests/test_cli.py` (and the printout in tests/test_workflow_distill.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

VERBOSE_VAR = "RCM_VERBOSE"          # "1": --verbose was given (read again in Tune trial processes)
QUIET_WORKER_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",            # a DataContext set in the driver does not reach Tune trials
    "RAY_DATA_LOG_LEVEL": "WARNING",                  # "Starting execution of Dataset …", "✔️ Dataset … finished"
    "PYTHONWARNINGS": "ignore::DeprecationWarning",   # Ray's own RayDeprecationWarnings from its actors
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # MLflow's own logger (read when mlflow is imported): "Creating initial MLflow database tables…" and
    # "Updating database tables" at INFO whenever a new SQLite store is made (the demo's first run).
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # A worker's progress bar reaches the driver through Ray's log forwarding, one line per redraw (in a terminal as
    # in a log file): redraw it every 20 s instead of every 0.1 s. The driver's own bars are not affected.
    "TQDM_MININTERVAL": "20",
}


# Ray Train patches print() in its workers to send each line to the root logger and, since Ray wraps a worker's
# stdout, to print it as well: every print of a worker reached the console twice (the teacher check's line in the
# demo). Off, verbose or not: a worker's print is one line, forwarded by Ray like any worker output.
ONE_PRINT_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_VAR, "") not in ("", "0")


def setup_output(verbose: bool) -> None:
    """Call at the start of main(), before Ray starts or any Dataset is built. Ray's processes get the quiet
    settings from `worker_env()` (the runtime_env), so only RCM_VERBOSE is set here."""
    os.environ[VERBOSE_VAR] = "1" if verbose else "0"
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", QUIET_WORKER_ENV["MLFLOW_LOGGING_LEVEL"])     # before mlflow loads
    from ray.data import DataContext
    # The Dataset copies the driver's context when it is built; the environment variable alone is read only when
    # ray.data is first imported, which may already have happened.
    DataContext.get_current().enable_progress_bars = False


def worker_env() -> dict[str, str]:
    """Environment for every Ray process of the job (runtime_env env_vars): the quiet settings unless verbose."""
    if is_verbose():
        return {VERBOSE_VAR: "1", **ONE_PRINT_ENV}
    return {VERBOSE_VAR: "0", **ONE_PRINT_ENV, **{k: os.environ.get(k, v) for k, v in QUIET_WORKER_ENV.items()}}


def quiet_worker_logs() -> None:
    """In a Ray Train worker: Ray Train 2.60 logs 'Reporting training result N: TrainingReport(…every metric…)' at
    INFO through a logger named by its file path (`logging.getLogger(__file__)` in its execution/context.py), which
    escapes RunConfig's logging_config and reaches the console through the root logger. Raise that one logger to
    WARNING unless verbose."""
    if is_verbose():
        return
    from ray.train.v2._internal.execution import context
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ray_init_kwargs() -> dict:
    """ray.init arguments: the driver's `ray` logger at WARNING when quiet ("Started a local Ray instance …")."""
    return {} if is_verbose() else {"logging_level": logging.WARNING}


def train_logging_config():
    """Ray Train's console logs (resource requests, worker group, 'Reporting training result …') from WARNING up
    when quiet; its system log files keep every level."""
    import ray.train
    return ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


# ----------------------------------------------------------------------------------------------------------
# Lines and tables

def eval_line(step: int, metrics: dict[str, float]) -> str | None:
    """One line per evaluation, e.g. `step 400: gmm_precision 1 step 0.127 | 2 steps 0.422 | 4 steps 0.838 |
    teacher 0.978`; None when `metrics` hold no evaluation."""
    from rcm_core.eval.report import headline_metric
    from workflows.report import step_count_values

    names = {k.split("/")[-1] for k in metrics if k.startswith("eval/")}
    metric = headline_metric(names)
    if metric is None:
        return None
    student, teacher = step_count_values(metrics, metric)
    parts = [f"{n} step{'s' if n > 1 else ''} {student[n]:.4g}" for n in sorted(student)]
    parts += [f"teacher {teacher[n]:.4g}" for n in sorted(teacher)]
    return f"step {step}: {metric}  " + " | ".join(parts)


def mlflow_command() -> str:
    """The mlflow executable beside this Python (`.venv/bin/mlflow` after `make demo`, which is not on PATH)."""
    import sys
    exe = Path(sys.executable).with_name("mlflow")
    if not exe.is_file():
        return "mlflow"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def tracking_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to look at the run: a tracking server's own page, or the `mlflow ui` command for a local store.
    `uri` must already be redacted (it is printed)."""
    query = "?workflowType=machine_learning"       # MLflow 3 opens experiments in its GenAI view otherwise
    page = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") if experiment_id else "/"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page}{query}"
    if uri.startswith("sqlite:///"):
        ui = f"{mlflow_command()} ui --backend-store-uri {uri} --port 5000"
        return f"{ui}, then open http://127.0.0.1:5000{page}{query}"
    return f"mlflow ui --backend-store-uri {uri}"


def final_printout(*, table: str, run_dir: Path, uri: str, experiment: str, checkpoint: str,
                   experiment_id: str | None = None, run_id: str | None = None, figure: str | None = None,
                   full_table: Path | None = None) -> str:
    """The lines after the run: the table, then where everything is. `uri` must already be redacted."""
    lines = ["", table, ""]
    if full_table is not None and full_table.is_file():
        lines.append(f"every metric:  {full_table}  (or --full-table; MLflow: comparison/step_counts.csv)")
    if figure:
        lines.append(f"figure:        {figure}")
    lines += [f"MLflow:        {uri}  (experiment '{experiment}'" + (f", run {run_id})" if run_id else ")"),
              f"MLflow UI:     {tracking_hint(uri, experiment_id, run_id)}",
              f"run folder:    {run_dir}",
              f"checkpoint:    {checkpoint}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Rank 0 at the end of a run: tables and the comparison figure, beside the run and in MLflow

RUN_INFO = "mlflow_run.json"          # in the run folder: the run's MLflow ids, for the driver's printout


class Phases:
    """Seconds per named phase of work that prints nothing while it runs (a run's end: samples through the VAE,
    the EMA student), for one line and MLflow metrics `timing/final_<phase>_seconds` afterwards."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def line(self) -> str:
        return "final artifacts: " + " · ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())

    def metrics(self) -> dict[str, float]:
        return {f"timing/final_{k.replace(' ', '_')}_seconds": v for k, v in self.seconds.items()}


def print_eval_line(step: int, metrics: dict[str, float]) -> None:
    line = eval_line(step, metrics)
    if line is not None:
        from tqdm import tqdm
        tqdm.write(line)                  # above the training bar, not through it


def write_step_count_tables(run_dir: str | Path, tracker, report) -> None:
    """<run_dir>/eval_table.txt (the short table the driver prints), eval_table_full.txt (every metric), and in
    MLflow comparison/step_counts.txt and .csv (the UI renders a CSV artifact as a table)."""
    import csv
    import io
    import json

    from rcm_core.eval.report import format_table, short_table, table_rows

    if report is None:                    # a finished run submitted again: nothing was evaluated this time
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    full = format_table(report)
    (run_dir / "eval_table.txt").write_text(short_table(report) + "\n")
    (run_dir / "eval_table_full.txt").write_text(full + "\n")
    rows = table_rows(report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    tracker.log_text(full + "\n", "comparison/step_counts.txt")
    tracker.log_text(buf.getvalue(), "comparison/step_counts.csv")
    figure = (run_dir / "comparison" / "samples.png").is_file()
    tracker.client.set_tag(tracker.run_id, "mlflow.note.content", run_description(report, tracker.run_id, figure))
    (run_dir / RUN_INFO).write_text(json.dumps({"run_id": tracker.run_id, "experiment_id": tracker.experiment_id}))


def run_description(report, run_id: str, figure: bool) -> str:
    """The run page's description (markdown, shown on MLflow's Overview tab): the short step-count table and the
    comparison figure, so the comparison is there at a glance."""
    from rcm_core.eval.report import short_columns, table_cells

    cells = table_cells(report, columns=short_columns(report))
    md = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0]),
          *("| " + " | ".join(row) + " |" for row in cells[1:]), "",
          ("Student step counts against the teacher (last row: the teacher on other seeds, its noise floor); ± = 95 % "
           "bootstrap half-width; every metric: artifact `comparison/step_counts.csv`.")]
    if figure:
        md += ["", (f"![teacher and students on the same noise and labels]"
                    f"(get-artifact?path=comparison%2Fsamples.png&run_uuid={run_id})")]
    return "\n".join(md)


def log_comparison_figure(cfg, tracker, evaluator, manifest: dict, labels) -> list[Path]:
    """<run_dir>/comparison/samples.png (+ .gif for video): the teacher and every student step count side by side
    on the evaluation bank's noise and labels, logged to MLflow under comparison/."""
    from rcm_core.eval.samples import save_comparison_figure

    if not evaluator.last_samples:
        return []
    try:
        paths = save_comparison_figure(evaluator.last_samples, manifest, Path(cfg.train.run_dir) / "comparison" /
                                       "samples.png", labels=labels, report=evaluator.last_report, title=cfg.name)
    except Exception as e:               # a picture is not worth the trained student logged after it
        logging.getLogger(__name__).warning("comparison figure not drawn: %s: %s", type(e).__name__, e)
        return []
    for path in paths:
        tracker.log_artifact(path, "comparison")
    return paths


def run_info(run_dir: str | Path) -> dict:
    import json
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}
