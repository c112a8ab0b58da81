"""rcm_core/eval/curves.py (issue 29): curve iterations, the recorder inside the loop's evaluator slot, the CSV and
the Pillow figure; and StepCountEvaluator.subset, which the curve points use.

    .venv/bin/python -m pytest tests/test_curves.py -q        (a few seconds)
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rcm_core.config import ExperimentCfg
from rcm_core.eval import curves as C
from rcm_core.eval.evaluate import EvalBank, StepCountEvaluator


def test_curve_steps_are_evenly_spaced_and_end_at_the_last_iteration():
    assert C.curve_steps(1000, 8) == [125, 250, 375, 500, 625, 750, 875, 1000]
    assert C.curve_steps(10, 3) == [3, 7, 10]          # round(10/3), round(20/3), 10: gaps 3, 4, 3
    assert C.curve_steps(5, 5) == [1, 2, 3, 4, 5]
    steps = C.curve_steps(1437, 7)
    gaps = np.diff([0, *steps])
    assert steps[-1] == 1437 and len(set(steps)) == 7 and gaps.max() - gaps.min() <= 1
    for total, n in ((10, 0), (10, 11), (10, -1)):
        with pytest.raises(ValueError, match="curve points"):
            C.curve_steps(total, n)


def _metrics(step: int) -> dict[str, float]:
    """What StepCountEvaluator returns, in miniature: a falling FD per step count and a constant teacher row."""
    out = {"timing/eval_seconds": 0.5}
    for n in (1, 2, 4):
        v = 10.0 / n + 100.0 / step
        out.update({f"eval/nfe_{n}/fd_feat": v, f"eval/nfe_{n}/fd_feat_ci_low": v - 1,
                    f"eval/nfe_{n}/fd_feat_ci_high": v + 1, f"eval/nfe_{n}/motion_ratio": 0.5 + 0.1 * n})
    out.update({"eval/teacher_nfe_100/fd_feat": 0.09, "eval/teacher_nfe_100/motion_ratio": 1.0})
    return out


def _recorded(total: int = 12, n: int = 3) -> C.CurveRecorder:
    calls, seen = [], []
    rec = C.CurveRecorder(lambda state, step: calls.append(step) or _metrics(step), C.curve_steps(total, n),
                          on_point=lambda points: seen.append(len(points)))
    returned = [rec(None, step) for step in range(1, total + 1)]     # the loop with train.eval_every = 1
    assert calls == [4, 8, 12] and seen == [1, 2, 3]
    assert [bool(r) for r in returned] == [s in (4, 8, 12) for s in range(1, total + 1)]
    return rec


def test_recorder_scores_only_its_iterations_and_series_read_back():
    rec = _recorded()
    assert [p["iteration"] for p in rec.points] == [4, 8, 12]
    assert C.rows_of(rec.points) == (["nfe_1", "nfe_2", "nfe_4"], "teacher_nfe_100")
    assert C.series(rec.points, "nfe_2", "fd_feat") == [(4, 30.0), (8, 17.5), (12, 10.0 / 2 + 100.0 / 12)]
    assert C.teacher_value(rec.points, "fd_feat") == 0.09
    assert C.teacher_value(rec.points, "class_acc") is None
    table = C.curve_table({"nfe_1": C.series(rec.points, "nfe_1", "fd_feat"), "other": [(8, 1.5)]})
    lines = table.splitlines()
    assert lines[0].split() == ["iteration", "nfe_1", "other"] and len(lines) == 4
    assert lines[1].split() == ["4", "35"] and lines[2].split() == ["8", "22.5", "1.5"]


def test_csv_has_one_line_per_iteration_row_and_metric(tmp_path):
    rec = _recorded()
    rows = list(csv.DictReader(io.StringIO(C.curve_csv(rec.points))))
    # 3 iterations × (3 student rows + the teacher row) × the 2 of CURVE_METRICS present (fd_feat, motion_ratio)
    assert len(rows) == 3 * 4 * 2
    first = rows[0]
    assert (first["iteration"], first["row"], first["metric"]) == ("4", "nfe_1", "fd_feat")
    assert float(first["value"]) == 35.0 and float(first["ci_low"]) == 34.0 and float(first["ci_high"]) == 36.0
    assert math.isnan(float(next(r for r in rows if r["row"] == "teacher_nfe_100")["ci_low"]))
    js, cs = C.write_curve_files(rec.points, tmp_path / "curves", "rCM", method="rCM", iterations=12)
    name, points = C.load_curve_file(js)
    assert name == "rCM" and points == rec.points and cs.read_text() == C.curve_csv(rec.points)


def test_figure_has_a_panel_per_metric_a_row_per_run_and_coloured_lines(tmp_path):
    rec = _recorded()
    path = C.plot_curves({"rCM": rec.points, "sCM": rec.points}, tmp_path / "curves.png", panel=(300, 200))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (52 + 2 * 200 + 10, 90 + len(C.CURVE_METRICS) * 300 + 10)
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert set(map(tuple, C.COLOURS[:3])) <= colours          # the 1/2/4-step lines are drawn
    panel = img[52:252, 90 + 300:90 + 600]                      # rCM's class_acc panel: no values, no lines
    assert not any(tuple(c) in set(map(tuple, C.COLOURS[:3])) for c in panel.reshape(-1, 3))
    with pytest.raises(ValueError, match="no curve points"):
        C.plot_curves({"rCM": []}, tmp_path / "empty.png")


def _evaluator(n: int = 20) -> StepCountEvaluator:
    bank = EvalBank.make((2, 1, 1, 1), torch.arange(n) % 5, seed=3)
    ref, floor = torch.randn(n, 2, 1, 1, 1), torch.randn(n, 2, 1, 1, 1)
    return StepCountEvaluator(cfg=ExperimentCfg(), teacher=None, bank=bank, device=torch.device("cpu"),
                              _teacher_cache=(ref, floor, 0.25))


def test_subset_reuses_the_teacher_samples_of_its_rows():
    ev = _evaluator()
    sub = ev.subset(10)
    ref, floor, sec = sub.teacher_sets()             # from the cache: a teacher of None was never called
    assert torch.equal(ref, ev.teacher_sets()[0][:10]) and torch.equal(floor, ev.teacher_sets()[1][:10])
    assert sec == 0.25 and torch.equal(sub.bank.noise, ev.bank.noise[:10])
    assert sub.bank.labels.bincount().tolist() == [2] * 5          # the first rows keep the classes balanced
    for bad in (0, 21):
        with pytest.raises(ValueError, match="eval.num_samples"):
            ev.subset(bad)
    other = ExperimentCfg()
    other.sampler.teacher_steps += 1
    with pytest.raises(ValueError, match="teacher_steps"):
        ev.subset(10, other)


def test_metric_directions_agree_with_the_sweep_report():
    """One notion of "lower is better" for the curve figure and workflows/report.py's sweep plots."""
    from rcm_core.eval import curves
    from workflows import report

    assert curves.LOWER_IS_BETTER == report.LOWER_IS_BETTER
