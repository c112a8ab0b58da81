"""experiments/bench/fashion_results.py end to end at tiny size (table 2 of docs/RESULTS.md), and the fixes it needed.

    .venv/bin/python -m pytest tests/test_fashion_results.py -q        (~40 s on a 2-core CPU)

Items are random images (no Fashion-MNIST or scikit-learn needed); the numbers mean nothing, the shape of the
output does: every method's table has every row and column, and every picture is written.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rcm_core.eval.evaluate as E
from rcm_core.config import load_config
from rcm_core.data.latents import read_manifest
from rcm_core.data import moving_fashion


def _script():
    spec = importlib.util.spec_from_file_location("fashion_results", REPO / "experiments/bench/fashion_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                    # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_has_every_row_column_and_picture(tmp_path, random_items, monkeypatch):
    fr = _script()
    seen = []
    original = E.evaluate_step_counts

    def spy(samples, reference, **kw):
        seen.append((kw["cfg"].num_resamples, reference.device))
        return original(samples, reference, **kw)
    monkeypatch.setattr(E, "evaluate_step_counts", spy)

    cfg = load_config(fr.DEFAULT_CONFIG, [*fr.TINY_OVERRIDES, "train.steps=6", "eval.num_samples=60"])
    out = tmp_path / "out"
    res = fr.run(cfg, data=str(tmp_path / "data"), out=out, device=torch.device("cpu"), classifier_steps=10,
                 teacher_seconds=1.0, student_seconds=0.5, probe_iters=2,   # the budget probes run too
                 curve_points=2, curve_samples=30, curve_bootstrap=3, teacher_store="float16",
                 export_weights=str(tmp_path / "weights"), mid_t_sweep=[[1.0], [0.3], [1.0, 0.6, 0.3]])

    # eval.bootstrap reaches each method's final report, --curve-bootstrap (3) its 2 curve points and the 3
    # schedules of the intermediate-time sweep
    assert [n for n, _ in seen] == [3, 3, cfg.eval.bootstrap, 3, 3, 3] * len(fr.METHODS)
    assert res.train_steps >= 10 and res.teacher_steps >= 50              # set by the probes (rounded, floors)
    assert read_manifest(str(tmp_path / "data")).source["images"] == "test-random"
    teacher_row = "teacher_nfe_8"                                     # 4 Euler steps × 2 (guidance)
    assert set(res.tables) == {*fr.METHODS, "all"}
    summary_rows = [line.split()[0] for line in res.tables["all"].splitlines()[2:]]
    assert summary_rows == [f"{m}/nfe_{n}" for m in fr.METHODS for n in (1, 2, 4)] + [teacher_row]
    for name, report in res.reports.items():
        rows = report.all_rows()
        assert list(rows) == ["nfe_1", "nfe_2", "nfe_4", teacher_row]
        for row, metrics in rows.items():
            for col in fr.COLUMNS:
                if col == "paired_mse" and row == teacher_row:
                    continue                                          # the floor has no paired samples
                assert col in metrics, (name, row, col)
                assert math.isfinite(metrics[col].value), (name, row, col)
        assert rows[teacher_row]["speedup"].value == 1.0
        header = res.tables[name].splitlines()[0].split()
        assert header == ["name", *fr.COLUMNS]
        slug = name
        for step in ("nfe_1", "nfe_2", "nfe_4", "teacher_reference"):
            for ext in ("png", "gif"):
                assert (out / "samples" / slug / f"{step}.{ext}").stat().st_size > 0
        assert json.loads((out / "tables" / f"{slug}.json").read_text())["nfe_2"]["fd_feat"]
        assert not (out / "runs" / slug / "checkpoints").exists()
    assert (out / "samples" / "data.png").is_file() and (out / "teacher.pt").is_file()
    # issue 29: curves at 2 evenly spaced iterations per method, goals, comparison figures, weights exported
    at = fr.curve_steps(res.train_steps, 2)
    for name in fr.METHODS:
        _, points = fr.load_curve_file(out / "curves" / f"{name}.json")
        assert [p["iteration"] for p in points] == at
        assert all(math.isfinite(p["metrics"][f"eval/nfe_{n}/{m}"]) for p in points for n in (1, 2, 4)
                   for m in fr.CURVE_METRICS)
        assert (out / "curves" / f"{name}.csv").read_text().count("\n") == 1 + 2 * 4 * len(fr.CURVE_METRICS)
        assert (out / "comparison" / f"{name}.gif").stat().st_size > 0
    assert (out / "curves" / "curves.png").stat().st_size > 0
    assert [(g["method"], g["nfe"], g["metric"]) for g in res.goals] == [
        (m, g.nfe, g.metric) for m in fr.METHODS for g in fr.GOALS]
    goal_lines = (out / "tables" / "goals.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in goal_lines) == 1 + len(res.goals)     # header + one per goal
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == sorted(
        ["feature_net.pt", "teacher.pt", *(f"{m}_ema.pt" for m in fr.METHODS)])
    for blob in [torch.load(out / "teacher.pt", weights_only=True),
                 *(torch.load(tmp_path / "weights" / f"{m}_ema.pt", weights_only=True) for m in fr.METHODS)]:
        assert {v.dtype for k, v in blob["net"].items() if "weight" in k} == {torch.float16}
    # the sweep: one row per method and schedule, the schedule reaches the sampler (2 steps at t = 1.0 and at
    # t = 0.3 re-noise differently from the same first step, so their samples and FD differ)
    sweep = (out / "tables" / "mid_t.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[:3] for line in sweep] == [
        [f"| {m}", s, t] for m in fr.METHODS for s, t in (("2", "1"), ("2", "0.3"), ("4", "1, 0.6, 0.3"))]
    for m in fr.METHODS:
        fd = {row.split(" | ")[2]: row.split(" | ")[3] for row in sweep if row.startswith(f"| {m} |")}
        assert fd["1"] != fd["0.3"], m
    md = (out / "tables" / "table2.md").read_text()
    assert all(f"### {name}" in md for name in fr.METHODS) and "| total |" in md
    archive = fr.write_archive(out, tmp_path / "a.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "fashion_results/tables/table2.md" in names and "fashion_results/samples/rCM/nfe_4.gif" in names
    assert {"fashion_results/curves/curves.png", "fashion_results/comparison/rCM.gif",
            "fashion_results/tables/goals.md"} <= set(names)

    # --student-weights: the exported rCM student is scored and swept again without training; the module evaluated
    # is the file's (fp16 parameters, exactly), not the teacher or a fresh network
    import rcm_core.run.teacher as T
    loaded, scored = {}, []
    real_load, real_eval = T.load_teacher, fr.StepCountEvaluator.evaluate

    def load_spy(path, cfg, device):
        loaded[Path(path).name] = module = real_load(path, cfg, device)
        return module

    def eval_spy(self, student):
        scored.append(student)
        return real_eval(self, student)
    monkeypatch.setattr(T, "load_teacher", load_spy)
    monkeypatch.setattr(fr.StepCountEvaluator, "evaluate", eval_spy)
    out2 = tmp_path / "again"
    again = fr.run(cfg, data=str(tmp_path / "data"), out=out2, device=torch.device("cpu"),
                   teacher_path=str(out / "teacher.pt"), classifier_path=str(out / "feature_net.pt"),
                   methods={"rCM": fr.METHODS["rCM"]}, student_weights=str(tmp_path / "weights"),
                   mid_t_sweep=[[1.0]], curve_bootstrap=3, renoise_times=[1.0, 0.3])
    student = loaded["rCM_ema.pt"]
    file_state = torch.load(tmp_path / "weights" / "rCM_ema.pt", weights_only=True)["net"]
    assert all(torch.equal(v, file_state[k].to(v.dtype)) for k, v in student.net.state_dict().items())
    assert student is not loaded["teacher.pt"] and scored[0] is student and scored[1] is student   # table, sweep
    assert list(again.reports) == ["rCM"] and not (out2 / "runs" / "rCM").exists()       # nothing trained
    md2 = (out2 / "tables" / "table2.md").read_text()
    assert f"| rCM | loaded from {tmp_path / 'weights' / 'rCM_ema.pt'} |" in md2
    assert (out2 / "tables" / "mid_t.md").read_text().count("| rCM | 2 | 1 |") == 1
    # --renoise-test: the 1-step samples, then each time's student and teacher rows from the same x_t, the floor last
    renoise = (out2 / "tables" / "renoise_rCM.txt").read_text().splitlines()
    assert [line.split()[0] for line in renoise[2:]] == [
        "student_1_step", "data", "student_from_t1", "teacher_from_t1", "student_from_data_t1",
        "teacher_from_data_t1", "student_from_t0.3", "teacher_from_t0.3", "student_from_data_t0.3",
        "teacher_from_data_t0.3", "teacher_vs_teacher"]
    assert renoise[0].split()[1:] == list(fr.RENOISE_COLUMNS)
    assert "re-noised to t" in md2


def _report(rows: dict[str, dict[str, tuple[float, float, float]]], floor: dict[str, float]):
    from rcm_core.eval.metrics import Estimate
    from rcm_core.eval.report import StepCountReport
    return StepCountReport({r: {k: Estimate(*v) for k, v in m.items()} for r, m in rows.items()},
                           "teacher_nfe_100", {k: Estimate(v, v, v) for k, v in floor.items()})


def test_student_weights_refuses_what_it_cannot_score(tmp_path):
    fr = _script()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "rCM_ema.pt").write_bytes(b"")
    base = ["--student-weights", str(tmp_path / "w"), "--methods", "rCM"]
    with pytest.raises(SystemExit, match="also give --teacher and --classifier"):
        fr.main(base)
    pair = ["--teacher", str(tmp_path / "t.pt"), "--classifier", str(tmp_path / "c.pt")]
    with pytest.raises(SystemExit, match="no DMD_ema.pt for method DMD"):
        fr.main([*base[:-1], "rCM,DMD", *pair])
    with pytest.raises(SystemExit, match="no curve; leave --curve-points out"):
        fr.main([*base, *pair, "--curve-points", "4"])


def test_videos_like_bank_match_each_row_class_and_cycle():
    """One real video per bank row, of the row's class, in data-set order per class; a class with fewer videos than
    the bank asks for repeats them; a class the data set lacks is named."""
    fr = _script()
    latents = torch.arange(6, dtype=torch.float16)[:, None, None, None, None].expand(6, 2, 1, 1, 1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    got = fr.videos_like_bank(latents, labels, torch.tensor([0, 1, 2, 0, 1, 2, 0, 0]))
    assert got[:, 0, 0, 0, 0].tolist() == [0, 1, 3, 2, 4, 3, 5, 0]
    with pytest.raises(ValueError, match="no video of class 7"):
        fr.videos_like_bank(latents, labels, torch.tensor([7]))


def test_renoise_times_parse_and_a_bad_one_is_named():
    fr = _script()
    assert fr.parse_renoise_times("1.3; 1.0;0.6") == [1.3, 1.0, 0.6] and fr.parse_renoise_times("") == []
    with pytest.raises(SystemExit, match="'x' is not a number"):
        fr.parse_renoise_times("1.0;x")
    with pytest.raises(SystemExit, match="1.6 is outside"):
        fr.parse_renoise_times("1.6")


def test_mid_t_sweep_parses_schedules_and_names_a_bad_one():
    fr = _script()
    assert fr.parse_mid_t_sweep("1.3; 0.6;1.3,1.0,0.6;") == [[1.3], [0.6], [1.3, 1.0, 0.6]]
    for bad in ("1.3;x", "0.6,1.0", "2.0"):
        with pytest.raises(SystemExit, match="--mid-t-sweep"):
            fr.parse_mid_t_sweep(bad)


def test_goal_table_judges_each_kind_of_goal():
    fr = _script()
    teacher = {"class_acc": 0.68, "recall_feat": 0.97, "fd_feat": 0.09, "motion_ratio": 1.0}
    rows = {  # (value, ci_low, ci_high)
        "nfe_4": {"class_acc": (0.646, 0.63, 0.66),      # 0.95 × 0.68 = 0.646: met exactly at the bound
                  "motion_ratio": (0.85, 0.8, 0.95),     # below 0.9: not met, its CI reaches in
                  "fd_feat": (0.4, 0.3, 0.45),           # met, whole CI under 0.5
                  "recall_feat": (0.9, 0.88, 0.92)},     # < 0.9215: not met, clear
        "nfe_2": {"fd_feat": (math.nan, math.nan, math.nan), "recall_feat": (0.93, 0.91, 0.95)},
    }
    got = {(g["nfe"], g["metric"]): g for g in fr.goal_rows("rCM", _report(rows, teacher))}
    verdict = {k: (g["met"], g["ci"]) for k, g in got.items()}
    assert verdict == {(4, "class_acc"): (True, "straddles"), (4, "motion_ratio"): (False, "straddles"),
                       (4, "fd_feat"): (True, "clear"), (4, "recall_feat"): (False, "clear"),
                       (2, "fd_feat"): (False, "clear"), (2, "recall_feat"): (True, "straddles")}
    assert got[(4, "class_acc")]["teacher"] == 0.68 and got[(4, "motion_ratio")]["target"] == "in [0.9, 1.1]"
    md = fr.goals_markdown(list(got.values()))
    assert "| rCM | 4 | fd_feat | ≤ 0.5 | 0.4 [0.3, 0.45] | 0.09 | yes | clear |" in md
    rows["nfe_2"].pop("fd_feat")
    with pytest.raises(KeyError, match="step_counts must include 2"):
        fr.goal_rows("rCM", _report(rows, teacher))


def test_goal_without_a_teacher_value_is_not_met():
    fr = _script()
    g = fr.Goal("class_acc", 4, "share", 0.95)
    assert g.holds(0.9, 0.9) and not g.holds(0.9, None) and not g.holds(0.9, math.nan) and not g.holds(0.85, 0.9)
    assert fr.Goal("motion_ratio", 4, "within", (0.9, 1.1)).holds(1.1)
    assert not fr.Goal("fd_feat", 2, "at_most", 1.0).holds(1.0001)


def test_half_state_rounds_parameters_only_and_refuses_overflow():
    fr = _script()
    net = torch.nn.BatchNorm1d(3)                      # parameters and fp32 buffers (running statistics)
    torch.nn.init.normal_(net.weight, generator=torch.Generator().manual_seed(0))
    net.running_mean.fill_(1e-7)                       # below fp16's normal range: must stay fp32
    state, err = fr.half_state(net)
    assert state["weight"].dtype == torch.float16 and state["running_mean"].dtype == torch.float32
    assert 0 < err <= 2.0 ** -11 and torch.equal(state["running_mean"], net.running_mean)
    with torch.no_grad():
        net.bias[0] = 1e5
    with pytest.raises(SystemExit, match="bias exceeds float16's range"):
        fr.half_state(net)


def test_no_fashion_mnist_and_no_sklearn_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(moving_fashion, "FASHION_DIR", tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "sklearn", None)                  # `import sklearn…` raises ImportError,
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)         # also when an earlier import loaded it
    moving_fashion.load_items.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="RCM_FASHION_MNIST_DIR"):
            moving_fashion.load_items("train")
    finally:
        moving_fashion.load_items.cache_clear()
