"""Convergence curves: the EMA student's metrics at evenly spaced iterations of one distillation (issue 29).

    rec = CurveRecorder(evaluator, curve_steps(cfg.train.steps, 8))     # evaluator: a StepCountEvaluator
    cfg.train.eval_every = 1                                            # the recorder picks its own iterations
    run_training(cfg, batches, reporter, teacher=teacher, evaluator=rec)
    write_curve_files(rec.points, out / "curves", "rCM"); plot_curves({"rCM": rec.points}, out / "curves.png")

A point holds the evaluator's metrics under their MLflow keys (`eval/nfe_<N>/<metric>`, `eval/teacher_nfe_<N>/…`,
with `_ci_low` / `_ci_high`), so the same numbers can be logged with `mlflow.log_metrics(point["metrics"],
step=point["iteration"])` by a process that has MLflow. The figure is drawn with Pillow (a core dependency;
matplotlib is not one). Used by experiments/bench/fashion_results.py and causal_results.py.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The metrics issue 29 asks to follow: quality (FD), class fidelity, motion, diversity.
CURVE_METRICS = ("fd_feat", "class_acc", "motion_ratio", "recall_feat")
# The same prefixes as workflows/report.py's, which stays free of torch (importing rcm_core.eval loads it);
# tests/test_curves.py holds the two equal.
LOWER_IS_BETTER = ("fd_", "kid_", "gmm_mode_", "gmm_nll", "paired_mse")
AIM_AT_ONE = ("motion_ratio", "div_ratio")          # ratios to the teacher: 1 is the teacher's value
# Line colours per row (matplotlib's first three, then more); the teacher's line is black and dashed.
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_ROW = re.compile(r"^eval/((?:teacher_)?nfe_\d+)/(.+)$")


def curve_steps(total: int, points: int) -> list[int]:
    """`points` iterations spread evenly over 1..total, the last one `total`: round(k·total/points), k = 1..points.
    (`train.eval_every = total // points` would add an extra point at `total` whenever it does not divide.)"""
    if points < 1 or points > total:
        raise ValueError(f"curve points {points}: need 1 ≤ points ≤ the run's {total} iterations "
                         f"(lower --curve-points or raise train.steps / --student-seconds)")
    return [round(k * total / points) for k in range(1, points + 1)]


Evaluator = Callable[[object, int], dict[str, float]]


@dataclass
class CurveRecorder:
    """An evaluator for `run_training` that evaluates only at `steps` and keeps every point it made.

    The loop calls it whenever `train.eval_every` says so; with eval_every = 1 that is every iteration, and
    the iterations not in `steps` return no metrics (a membership test, no forward pass)."""
    evaluate: Evaluator
    steps: Sequence[int]
    points: list[dict] = field(default_factory=list)
    on_point: Callable[[list[dict]], None] | None = None    # e.g. write the files, so a cut run keeps its points

    def __call__(self, state, step: int) -> dict[str, float]:
        if step not in self.steps:
            return {}
        metrics = self.evaluate(state, step)
        self.points.append({"iteration": int(step), "metrics": {k: float(v) for k, v in metrics.items()}})
        if self.on_point is not None:
            self.on_point(self.points)
        return metrics


def rows_of(points: list[dict]) -> tuple[list[str], str | None]:
    """(the student rows nfe_<N> in step order, the teacher's floor row or None) found in the points' keys."""
    rows = {m.group(1) for p in points for k in p["metrics"] if (m := _ROW.match(k))}
    students = sorted((r for r in rows if r.startswith("nfe_")), key=lambda r: int(r.split("_")[1]))
    teacher = sorted(r for r in rows if r.startswith("teacher_"))
    return students, (teacher[0] if teacher else None)


def series(points: list[dict], row: str, metric: str) -> list[tuple[int, float]]:
    """(iteration, value) of one row's metric, in iteration order; points without it are left out."""
    key = f"eval/{row}/{metric}"
    return sorted((p["iteration"], p["metrics"][key]) for p in points if key in p["metrics"])


def teacher_value(points: list[dict], metric: str) -> float | None:
    """The teacher-vs-teacher floor of `metric` (the same at every point: the teacher is sampled once per run)."""
    _, teacher = rows_of(points)
    values = [v for _, v in series(points, teacher, metric)] if teacher else []
    return values[-1] if values else None


def curve_csv(points: list[dict], metrics: Sequence[str] = CURVE_METRICS) -> str:
    """Long form, one line per (iteration, row, metric): iteration,row,metric,value,ci_low,ci_high."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["iteration", "row", "metric", "value", "ci_low", "ci_high"])
    students, teacher = rows_of(points)
    for p in sorted(points, key=lambda p: p["iteration"]):
        for row in [*students, *([teacher] if teacher else [])]:
            for metric in metrics:
                key = f"eval/{row}/{metric}"
                if key in p["metrics"]:
                    w.writerow([p["iteration"], row, metric, repr(p["metrics"][key]),
                                repr(p["metrics"].get(key + "_ci_low", math.nan)),
                                repr(p["metrics"].get(key + "_ci_high", math.nan))])
    return buf.getvalue()


def write_curve_files(points: list[dict], folder: Path, name: str, **info) -> list[Path]:
    """<folder>/<name>.json (every metric of every point, plus `info`) and <name>.csv (CURVE_METRICS)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, cs = folder / f"{name}.json", folder / f"{name}.csv"
    js.write_text(json.dumps({"name": name, **info, "points": points}, indent=1))
    cs.write_text(curve_csv(points))
    return [js, cs]


def load_curve_file(path: Path) -> tuple[str, list[dict]]:
    """(the run's method name, its points) from a write_curve_files JSON."""
    data = json.loads(Path(path).read_text())
    return data.get("method", data["name"]), data["points"]


def curve_table(curves: dict[str, list[tuple[int, float]]]) -> str:
    """A metric against iterations, one column per curve (blank where a curve has no point at that iteration)."""
    lines = ["iteration  " + "  ".join(f"{k:>12s}" for k in curves)]
    steps = sorted({s for pts in curves.values() for s, _ in pts})
    for s in steps:
        vals = [dict(pts).get(s) for pts in curves.values()]
        lines.append(f"{s:9d}  " + "  ".join(f"{v:12.4g}" if v is not None else f"{'':12s}" for v in vals))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The figure: one row of panels per run, one panel per metric, a line per step count, the teacher dashed


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo, (lo + hi) / 2, hi]


def _dashed(draw, x0: float, x1: float, y: float, colour, dash: int = 6) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=2)
        x += 2 * dash


def _panel(draw, box: tuple[int, int, int, int], points: list[dict], metric: str, font, small) -> None:
    """Axes, lines and the teacher's level of one metric inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    students, _ = rows_of(points)
    lines = {row: [(s, v) for s, v in series(points, row, metric) if math.isfinite(v)] for row in students}
    teacher = teacher_value(points, metric)
    ys = [v for pts in lines.values() for _, v in pts] + ([teacher] if teacher is not None and
                                                          math.isfinite(teacher) else [])
    xs = [s for pts in lines.values() for s, _ in pts]
    better = ("lower is better" if metric.startswith(LOWER_IS_BETTER) else
              "1 = the teacher's" if metric.startswith(AIM_AT_ONE) else "higher is better")
    draw.text((left, top), f"{metric} ({better})", fill="black", font=font)
    ax_l, ax_t, ax_r, ax_b = left + 56, top + 22, right - 8, bottom - 30
    draw.rectangle([ax_l, ax_t, ax_r, ax_b], outline=(120, 120, 120))
    if not ys or not xs:
        draw.text((ax_l + 8, (ax_t + ax_b) // 2), f"no {metric} values", fill="black", font=small)
        return
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.08 * (y_hi - y_lo) if y_hi > y_lo else max(abs(y_hi) * 0.05, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = max(xs)
    px = lambda s: ax_l + (ax_r - ax_l) * s / x_hi  # x axis starts at 0
    py = lambda v: ax_b - (ax_b - ax_t) * (v - y_lo) / (y_hi - y_lo)
    for v in _ticks(y_lo, y_hi):
        draw.line([(ax_l - 3, py(v)), (ax_l, py(v))], fill=(120, 120, 120))
        draw.text((left, py(v) - 6), f"{v:.3g}", fill="black", font=small)
    for s in sorted(set(xs)):
        draw.line([(px(s), ax_b), (px(s), ax_b + 3)], fill=(120, 120, 120))
    draw.text((ax_l, ax_b + 5), "0", fill="black", font=small)
    draw.text((ax_r - 40, ax_b + 5), f"{x_hi}", fill="black", font=small)
    draw.text(((ax_l + ax_r) // 2 - 24, ax_b + 15), "iteration", fill="black", font=small)
    if teacher is not None and math.isfinite(teacher):
        _dashed(draw, ax_l, ax_r, py(teacher), (0, 0, 0))
    for i, (row, pts) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(px(s), py(v)) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def plot_curves(curves: dict[str, list[dict]], path: Path, metrics: Sequence[str] = CURVE_METRICS, *,
                title: str = "", panel: tuple[int, int] = (330, 240)) -> Path:
    """One row of panels per run (name → points), one panel per metric; a line per step count and the teacher's
    floor value as a dashed black line. Written as PNG with Pillow."""
    from PIL import Image, ImageDraw

    from rcm_core.eval.visualize import _font

    if not curves or not any(curves.values()):
        raise ValueError("plot_curves: no curve points to draw (was --curve-points 0?)")
    font, small, head = _font(13), _font(11), _font(15)
    w, h = panel
    label_w, top = 90, 52
    img = Image.new("RGB", (label_w + w * len(metrics) + 10, top + h * len(curves) + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 6), title or "metrics of the EMA student against training iterations", fill="black", font=head)
    students = sorted({r for pts in curves.values() for r in rows_of(pts)[0]}, key=lambda r: int(r.split("_")[1]))
    x = 10
    for i, row in enumerate(students):                       # the legend: one swatch per step count, the teacher
        n = int(row.split("_")[1])
        draw.line([(x, 36), (x + 22, 36)], fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((x + 26, 29), f"{n} step{'s' if n > 1 else ''}", fill="black", font=small)
        x += 90
    _dashed(draw, x, x + 22, 36, (0, 0, 0))
    draw.text((x + 26, 29), "teacher vs teacher (other seeds)", fill="black", font=small)
    for r, (name, points) in enumerate(curves.items()):
        y = top + r * h
        draw.text((10, y + h // 2 - 7), name, fill="black", font=font)
        for c, metric in enumerate(metrics):
            _panel(draw, (label_w + c * w, y, label_w + (c + 1) * w, y + h), points, metric, font, small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
