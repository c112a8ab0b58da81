"""workflows/report.py on runs written straight into an MLflow SQLite store (no Ray, no server): table layout,
ordering by the sweep metric, diverged trials last, CSV, the plot, and the one-run table with bootstrap half-widths.

    .venv/bin/python -m pytest tests/test_report.py -q
"""
import json

import pytest

from workflows.report import main, run_report, step_count_values, sweep_report


def test_step_count_values_splits_student_and_teacher():
    metrics = {"eval/nfe_1/gmm_precision": 0.2, "eval/nfe_4/gmm_precision": 0.8, "eval/nfe_4/gmm_precision_ci_low": 0.7,
               "eval/teacher_nfe_39/gmm_precision": 0.95, "eval/nfe_1/fd_rp2": 3.0, "train/loss": 1.0}
    assert step_count_values(metrics, "gmm_precision") == ({1: 0.2, 4: 0.8}, {39: 0.95})
    assert step_count_values(metrics, "fd_rp2") == ({1: 3.0}, {})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep parent with three trials (one diverged, never evaluated) and their per-step-count metrics."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("mlflow")     # one store for the module: creating the schema takes seconds
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("r", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"mlflow.runName": "lam", "rcm.sweep": "true",
                                          "rcm.sweep.metric": "eval/nfe_2/gmm_precision", "rcm.sweep.mode": "max",
                                          "rcm.sweep.keys": json.dumps(["distill.reg_weight"])}).info.run_id
    trials = {"lam-a": (1.0, {1: 0.1, 2: 0.3, 4: 0.5}, "finished"),
              "lam-b": (0.01, {1: 0.4, 2: 0.7, 4: 0.9}, "finished"),
              "lam-c": (100.0, {}, "diverged")}
    for name, (lam, values, outcome) in trials.items():
        run = client.create_run(exp, tags={"mlflow.runName": name, "mlflow.parentRunId": parent,
                                           "rcm.sweep.outcome": outcome}).info.run_id
        metrics = [Metric(f"eval/nfe_{n}/gmm_precision", v - 0.1, 0, 10) for n, v in values.items()]
        metrics += [Metric(f"eval/nfe_{n}/gmm_precision", v, 0, 20) for n, v in values.items()]
        metrics += [Metric(f"eval/nfe_{n}/gmm_precision_ci_low", v - 0.05, 0, 20) for n, v in values.items()]
        metrics += [Metric(f"eval/nfe_{n}/gmm_precision_ci_high", v + 0.05, 0, 20) for n, v in values.items()]
        if values:
            metrics.append(Metric("eval/teacher_nfe_39/gmm_precision", 0.95, 0, 20))
        client.log_batch(run, metrics=metrics, params=[Param("distill.reg_weight", str(lam))])
        client.set_terminated(run, "FAILED" if outcome == "diverged" else "FINISHED")
    return client, parent


def test_sweep_table_orders_by_the_sweep_metric_and_plots(store, tmp_path):
    client, parent = store
    rep = sweep_report(client, parent, out=tmp_path / "p.png")
    lines = rep.table.splitlines()
    assert lines[1].split() == ["trial", "reg_weight", "outcome", "step", "nfe_1", "nfe_2", "nfe_4", "teacher_nfe_39"]
    assert [line.split()[0] for line in lines[3:]] == ["lam-b", "lam-a", "lam-c"]     # nfe_2 max first, diverged last
    assert lines[3].split() == ["lam-b", "0.01", "finished", "20", "0.4", "0.7", "0.9", "0.95"]
    assert lines[5].split() == ["lam-c", "100.0", "diverged", "-", "-", "-", "-", "-"]
    assert rep.outcomes == {"finished": 2, "diverged": 1}
    assert rep.csv.splitlines()[0] == "trial,reg_weight,outcome,step,nfe_1,nfe_2,nfe_4,teacher_nfe_39,run_id"
    from PIL import Image
    assert Image.open(rep.plot).size == (825, 495)


def test_other_metric_and_run_table(store, tmp_path, capsys):
    client, parent = store
    child = next(r for r in client.search_runs([client.get_run(parent).info.experiment_id],
                                               filter_string="tags.mlflow.runName = 'lam-b'"))
    rep = run_report(client, child.info.run_id, out=tmp_path / "r.png")
    rows = rep.table.splitlines()[3:]
    assert [r.split()[0] for r in rows] == ["nfe_1", "nfe_2", "nfe_4", "teacher_nfe_39"]
    assert rows[2].split()[1:] == ["0.9", "±", "0.05"] and rows[3].split()[1:] == ["0.95"]
    uri = client.tracking_uri
    assert main(["--sweep", parent, "--tracking-uri", uri, "--metric", "fd_rp2", "--out", str(tmp_path / "f.png")]) == 0
    assert "fd_rp2 by student step count" in capsys.readouterr().out


def test_unknown_run_id_is_one_line(store, capsys):
    from workflows.cli import run_cli
    uri = store[0].tracking_uri
    assert run_cli(main, ["--run", "0123456789abcdef", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run 0123456789abcdef: no such run at sqlite:") and err.count("\n") == 1, err
