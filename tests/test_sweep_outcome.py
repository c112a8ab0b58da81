"""How a sweep trial's MLflow run ends when the scheduler's stop and the trial's own end cross (workflows/sweep.py
marks it from the driver, workflows/trainer.py ends it from the worker), on a real MLflow store (SQLite)."""
from mlflow.tracking import MlflowClient

from rcm_core.config import load_config
from workflows.sweep import mark_trial_run
from workflows.trainer import OUTCOME_TAG, end_run
from workflows.tracking import Tracker


def _trial(tmp_path, parent_id: str) -> Tracker:
    cfg = load_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=race",
                             f"train.run_dir={tmp_path}/run", "name=trial-1"])
    return Tracker(cfg, parent_run_id=parent_id)


def _state(client: MlflowClient, run_id: str) -> tuple[str, str]:
    run = client.get_run(run_id)
    return run.data.tags.get(OUTCOME_TAG), run.info.status


def test_a_trial_that_ran_to_its_end_is_finished_whoever_writes_first(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent_id = client.create_run(client.create_experiment("race")).info.run_id

    # The stop overtook the trial's last report (seen in CI, 2026-12-03): the driver marks it while it still runs,
    # then the worker reaches its end. Without end_run's tag the run ended FINISHED but tagged stopped_early.
    trial = _trial(tmp_path, parent_id)
    assert mark_trial_run(client, parent_id, "trial-1", "stopped_early")
    assert _state(client, trial.run_id) == ("stopped_early", "KILLED")
    end_run(trial, sweep_trial=True)
    assert _state(client, trial.run_id) == ("finished", "FINISHED")

    # The other order: the trial ended first, the driver's late stop does not relabel it.
    late = _trial(tmp_path, parent_id)          # newest run of that name: the one mark_trial_run finds
    end_run(late, sweep_trial=True)
    assert mark_trial_run(client, parent_id, "trial-1", "stopped_early")
    assert _state(client, late.run_id) == ("finished", "FINISHED")

    # A trial the stop really ended (its worker never reached end_run) stays stopped.
    stopped = _trial(tmp_path, parent_id)
    assert mark_trial_run(client, parent_id, "trial-1", "stopped_early")
    assert _state(client, stopped.run_id) == ("stopped_early", "KILLED")

    # Outside a sweep, end_run writes no sweep tag.
    plain = _trial(tmp_path, None)
    end_run(plain, sweep_trial=False)
    assert _state(client, plain.run_id) == (None, "FINISHED")
