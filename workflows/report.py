"""Per-step-count comparison of a run or a sweep, from MLflow alone: a table on stdout and a quality-vs-steps plot.

    python workflows/report.py --sweep <parent run id> [--tracking-uri URI] [--metric gmm_precision] [--out plot.png]
    python workflows/report.py --run <run id> [--csv table.csv]

The tracking URI defaults to MLFLOW_TRACKING_URI, else runs/mlflow.db (where `workflows/distill.py` logs by
default). A sweep's table has one row per trial (its swept values, how it ended, the step of its last evaluation
and the metric at each student step count, then the teacher); a run's table has one row per step count and a
column per metric, each value with its bootstrap half-width. The plot draws the metric against the number of
sampling steps, one line per trial, with the teacher as a dashed reference line.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workflows.cli import add_debug_flag, run_cli  # noqa: E402

KEY = re.compile(r"^eval/(teacher_)?nfe_(\d+)/([A-Za-z0-9_.-]+)$")
RUN_COLUMNS = ("gmm_precision", "gmm_coverage", "gmm_mode_tv", "fd_rp2", "precision_rp2", "recall_rp2",
               "coverage_rp2", "paired_mse")
DEFAULT_METRIC = "gmm_precision"
LOWER_IS_BETTER = ("fd_", "kid_", "gmm_mode_", "gmm_nll", "paired_mse")


@dataclass
class Report:
    table: str
    csv: str
    rows: list[dict[str, Any]]
    plot: Path | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Reading metrics

def step_count_values(metrics: dict[str, float], metric: str) -> tuple[dict[int, float], dict[int, float]]:
    """`eval/nfe_<N>/<metric>` → {N: value} for the student and for the teacher (`eval/teacher_nfe_<N>/...`)."""
    student: dict[int, float] = {}
    teacher: dict[int, float] = {}
    for key, value in metrics.items():
        m = KEY.match(key)
        if m and m.group(3) == metric:
            (teacher if m.group(1) else student)[int(m.group(2))] = value
    return student, teacher


def child_runs(client, parent_run_id: str) -> list:
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    latest: dict[str, Any] = {}
    for run in runs:   # a restarted trial may have left an older run of the same name: keep the newest
        latest[run.data.tags.get("mlflow.runName", run.info.run_id)] = run
    return list(latest.values())


def outcome(run) -> str:
    return run.data.tags.get("rcm.sweep.outcome") or run.info.status.lower()


def last_eval_step(client, run, metric: str) -> int | None:
    student, _ = step_count_values(run.data.metrics, metric)
    if not student:
        return None
    history = client.get_metric_history(run.info.run_id, f"eval/nfe_{min(student)}/{metric}")
    return max(m.step for m in history) if history else None


# ----------------------------------------------------------------------------------------------------------
# Tables

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_rows(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Fixed-width text table: first column left-aligned, the rest right-aligned."""
    body = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in [c, *(b[i] for b in body)]) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *map(line, body)])


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _better_first(rows: list[dict[str, Any]], key: str, mode: str) -> list[dict[str, Any]]:
    """Rows with a finite value at `key` best first, the rest (diverged, never evaluated) after them."""
    ok = [r for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    rest = [r for r in rows if r not in ok]
    return sorted(ok, key=lambda r: r[key], reverse=mode == "max") + rest


def _short(key: str) -> str:
    return key.split(".")[-1]


def sweep_rows(client, parent, runs: list, metric: str) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    keys = json.loads(parent.data.tags.get("rcm.sweep.keys", "[]"))
    nfes = sorted({n for r in runs for n in step_count_values(r.data.metrics, metric)[0]})
    teacher_nfes = sorted({n for r in runs for n in step_count_values(r.data.metrics, metric)[1]})
    rows = []
    for run in runs:
        student, teacher = step_count_values(run.data.metrics, metric)
        row: dict[str, Any] = {"trial": run.data.tags.get("mlflow.runName", run.info.run_id[:8]),
                               "outcome": outcome(run), "step": last_eval_step(client, run, metric)}
        row.update({_short(k): run.data.params.get(k) for k in keys})
        row.update({f"nfe_{n}": student.get(n) for n in nfes})
        row.update({f"teacher_nfe_{n}": teacher.get(n) for n in teacher_nfes})
        row["run_id"] = run.info.run_id
        rows.append(row)
    columns = ["trial", *[_short(k) for k in keys], "outcome", "step", *[f"nfe_{n}" for n in nfes],
               *[f"teacher_nfe_{n}" for n in teacher_nfes]]
    return rows, columns, nfes


def sweep_report(client, parent_run_id: str, metric: str | None = None, out: Path | None = None) -> Report:
    """Table (and plot, if `out`) of every trial of the sweep whose MLflow parent run is `parent_run_id`."""
    parent = client.get_run(parent_run_id)
    sweep_metric = parent.data.tags.get("rcm.sweep.metric", "")
    mode = parent.data.tags.get("rcm.sweep.mode", "max")
    metric = metric or (KEY.match(sweep_metric).group(3) if KEY.match(sweep_metric) else DEFAULT_METRIC)
    runs = child_runs(client, parent_run_id)
    rows, columns, _ = sweep_rows(client, parent, runs, metric)
    m = KEY.match(sweep_metric)
    if m and m.group(3) == metric:
        rows = _better_first(rows, f"{'teacher_' if m.group(1) else ''}nfe_{m.group(2)}", mode)
    title = f"sweep {parent.data.tags.get('mlflow.runName', parent_run_id)} ({len(runs)} trials): {metric} " \
            f"by student step count" + (f"; sweep metric {sweep_metric} ({mode})" if sweep_metric else "")
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    plot = None
    if out is not None:
        curves = {_label(r, columns): step_count_values(run.data.metrics, metric)[0]
                  for r, run in zip(rows, _ordered(runs, rows))}
        teacher = [v for run in runs for v in step_count_values(run.data.metrics, metric)[1].items()]
        plot = plot_quality(curves, teacher, metric, title, out)
    return Report(title + "\n" + format_rows(rows, columns), to_csv(rows, [*columns, "run_id"]), rows, plot, outcomes)


def _ordered(runs: list, rows: list[dict[str, Any]]) -> list:
    by_id = {r.info.run_id: r for r in runs}
    return [by_id[row["run_id"]] for row in rows]


def _label(row: dict[str, Any], columns: list[str]) -> str:
    swept = [c for c in columns if c not in ("trial", "outcome", "step") and not c.startswith(("nfe_", "teacher_"))]
    values = ", ".join(f"{c}={row[c]}" for c in swept)
    return f"{row['trial']}" + (f" ({values})" if values else "") + (
        f" [{row['outcome']}]" if row["outcome"] != "finished" else "")


def run_report(client, run_id: str, metric: str | None = None, out: Path | None = None) -> Report:
    """One row per step count, a column per metric (value ± bootstrap half-width); plot of `metric`."""
    run = client.get_run(run_id)
    metric = metric or DEFAULT_METRIC
    metrics = run.data.metrics
    present = {KEY.match(k).group(3) for k in metrics if KEY.match(k)}
    cols = [metric, *[c for c in RUN_COLUMNS if c != metric and c in present]]
    names = sorted({(bool(m.group(1)), int(m.group(2))) for k in metrics if (m := KEY.match(k))})
    rows = []
    for teacher, n in names:
        name = f"{'teacher_' if teacher else ''}nfe_{n}"
        row: dict[str, Any] = {"name": name}
        for c in cols:
            v, lo, hi = (metrics.get(f"eval/{name}/{c}{s}") for s in ("", "_ci_low", "_ci_high"))
            row[c] = None if v is None else (f"{v:.4g} ± {(hi - lo) / 2:.2g}" if lo is not None and hi is not None
                                             and math.isfinite(hi - lo) else f"{v:.4g}")
        rows.append(row)
    title = f"run {run.data.tags.get('mlflow.runName', run_id)} ({run_id}), status {run.info.status}"
    plot = None
    if out is not None:
        student, teacher = step_count_values(metrics, metric)
        plot = plot_quality({run.data.tags.get("mlflow.runName", run_id[:8]): student}, list(teacher.items()),
                            metric, title, out)
    return Report(title + "\n" + format_rows(rows, ["name", *cols]), to_csv(rows, ["name", *cols]), rows, plot)


# ----------------------------------------------------------------------------------------------------------
# Plot

def plot_quality(curves: dict[str, dict[int, float]], teacher: list[tuple[int, float]], metric: str, title: str,
                 out: Path) -> Path:
    """Metric against student sampling steps (log2 axis), a line per trial, the teacher as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")          # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    steps = sorted({n for c in curves.values() for n in c})
    for label, points in curves.items():
        xs = sorted(n for n in points if math.isfinite(points[n]))
        if xs:
            ax.plot(xs, [points[n] for n in xs], marker="o", label=label)
    if teacher:
        nfe = sorted({n for n, _ in teacher})
        ax.axhline(median(v for _, v in teacher), color="black", linestyle="--",
                   label=f"teacher ({'/'.join(map(str, nfe))} NFE)")
    if steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
    better = "lower is better" if metric.startswith(LOWER_IS_BETTER) else "higher is better"
    ax.set(xlabel="student sampling steps (NFE)", ylabel=f"{metric} ({better})")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, f"no {metric} values logged", ha="center", transform=ax.transAxes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------

def default_tracking_uri() -> str:
    from rcm_core.config import ExperimentCfg
    from workflows.tracking import tracking_uri
    return tracking_uri(ExperimentCfg())


def check_run(client, run_id: str, flag: str) -> None:
    """A UsageError (exit 2, one line) when the tracking store has no such run, instead of MLflow's traceback."""
    from mlflow.exceptions import MlflowException

    from rcm_core.config import redact_url
    from workflows.cli import UsageError
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise UsageError(f"{flag} {run_id}: no such run at {redact_url(client.tracking_uri)} (give the run id "
                         f"the run printed, or --tracking-uri of the store it logged to)") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Per-step-count comparison table and plot of a run or a sweep, "
                                             "read from MLflow.")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id of one distillation run")
    which.add_argument("--sweep", help="MLflow run id of a sweep's parent run")
    ap.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    ap.add_argument("--metric", default=None, help=f"metric per step count (default: the sweep's, else "
                                                   f"{DEFAULT_METRIC})")
    ap.add_argument("--out", default=None, help="plot file (default: runs/reports/<sweep|run>-<id>.png)")
    ap.add_argument("--csv", default=None, help="also write the table as CSV here")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        from workflows.cli import UsageError         # MLflow would create an empty store there and find no run
        raise UsageError(f"no MLflow store at {uri} (pass --tracking-uri, e.g. the one the run printed)")
    client = MlflowClient(uri)
    run_id = args.sweep or args.run
    check_run(client, run_id, "--sweep" if args.sweep else "--run")
    out = Path(args.out or Path("runs", "reports", f"{'sweep' if args.sweep else 'run'}-{run_id[:12]}.png"))
    make = sweep_report if args.sweep else run_report
    rep = make(client, run_id, args.metric, out)
    print(rep.table)
    if args.csv:
        Path(args.csv).write_text(rep.csv)
    print(f"\nplot: {rep.plot}" + (f"\ncsv:  {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
