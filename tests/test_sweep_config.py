"""Sweep YAML validation (workflows/sweep.py): bad files fail before anything starts, naming the problem. No Ray.

    .venv/bin/python -m pytest tests/test_sweep_config.py -q
"""
from pathlib import Path

import pytest

from rcm_core.config import ConfigError
from workflows.sweep import count_trials, default_concurrency, divergence, load_sweep, main

REPO = Path(__file__).resolve().parents[1]
GOOD = """base: experiments/demo.yaml
metric: {name: eval/nfe_2/gmm_precision, mode: max}
search_space:
  distill.reg_weight: {grid: [1, 0.1]}
resources: {num_workers: 1}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["reg_weight", "student_steps", "tangent_warmup"])
def test_shipped_sweeps_load_with_tiny_overrides(name):
    tiny = ["train.steps=20", "model.hidden=64"] + (
        ["train.eval_every=10"] if name == "student_steps" else
        ["sweep.scheduler.grace_period=10", "sweep.scheduler.max_t=20"])
    spec, cfg = load_sweep(REPO / "experiments" / "sweeps" / f"{name}.yaml", tiny)
    assert spec.base == (REPO / "experiments" / "demo.yaml").resolve()
    assert cfg.train.steps == 20 and cfg.resources.num_workers == 1
    assert count_trials(spec) == {"reg_weight": 4, "student_steps": 6, "tangent_warmup": 4}[name]
    if spec.scheduler["type"] == "asha":     # ASHA gets a signal: evaluation every grace period
        assert cfg.train.eval_every == spec.scheduler["grace_period"] > 0


def test_reg_weight_is_the_papers_ablation():
    spec, _ = load_sweep(REPO / "experiments" / "sweeps" / "reg_weight.yaml")
    assert spec.search_space == {"distill.reg_weight": ("grid", [1, 0.1, 0.01, 0.001])}


@pytest.mark.parametrize("text, message", [
    (GOOD + "trials: 4\n", "unknown key 'trials'"),
    (GOOD.replace("distill.reg_weight", "distill.reg_wieght"),
     "search_space['distill.reg_wieght'] is not a config key"),
    (GOOD.replace("distill.reg_weight", "reg_weight"), "did you mean distill.reg_weight"),
    (GOOD.replace("{grid: [1, 0.1]}", "{normal: [0, 1]}"), "unknown distribution 'normal'"),
    (GOOD.replace("{grid: [1, 0.1]}", "{loguniform: [0, 1]}"), "loguniform needs low > 0"),
    (GOOD.replace("{grid: [1, 0.1]}", "{uniform: [1, 0.1]}"), "uniform needs low < high"),
    (GOOD.replace("{grid: [1, 0.1]}", "{uniform: [1]}"), "uniform needs [low, high]"),
    (GOOD.replace("{grid: [1, 0.1]}", "{grid: []}"), "grid needs a non-empty list"),
    (GOOD.replace("{grid: [1, 0.1]}", "{grid: [1], choice: [2]}"), "exactly one of"),
    (GOOD.replace("{grid: [1, 0.1]}", "{grid: [1, -1]}"), "value -1 is not valid"),
    (GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "train.steps: {uniform: [10, 20]}"), "expected an integer"),
    (GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "train.steps: {randint: [1.5, 20]}"),
     "randint needs integers"),
    (GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "distill.mode: {choice: [rcm, sdm]}"), "allowed values"),
    (GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "data.num_rows: {grid: [10, 20]}"), "set by the sweep"),
    (GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "resources.num_workers: {grid: [1, 2]}"), "set by the sweep"),
    (GOOD.replace("nfe_2", "nfe_3"), "step count 3 is not evaluated"),
    (GOOD.replace("eval/nfe_2/gmm_precision", "gmm_precision"), "expected eval/nfe_<N>/<metric>"),
    (GOOD.replace("mode: max", "mode: best"), "metric.mode='best'"),
    (GOOD.replace("base: experiments/demo.yaml", "base: experiments/nope.yaml"), "no such run config file"),
    (GOOD + "search: bayes\n", "search='bayes'"),
    (GOOD.replace("{grid: [1, 0.1]}", "{uniform: [0.1, 1]}") + "search: grid\n", "search=grid needs finite values"),
    (GOOD + "scheduler: {type: hyperband}\n", "scheduler.type='hyperband'"),
    (GOOD + "scheduler: {type: asha, grace: 10}\n", "unknown key 'scheduler.grace'"),
    (GOOD + "scheduler: {type: asha, grace_period: 50, max_t: 10}\n", "exceeds scheduler.max_t"),
    (GOOD + "scheduler: {type: fifo, grace_period: 5}\n", "apply only to asha"),
    (GOOD.replace("{num_workers: 1}", "{num_gpus: 1}"), "unknown key 'resources.num_gpus'"),
    (GOOD + "num_samples: 0\n", "num_samples=0"),
    (GOOD + "max_concurrent: auto\n", "max_concurrent='auto'"),
    (GOOD + "overrides: [distill.nope=1]\n", "unknown key 'distill.nope'"),
])
def test_bad_sweep_yaml_fails_naming_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, text))
    assert message in str(err.value) and str(tmp_path / "sweep.yaml") in str(err.value)


def test_step_count_variants_must_all_evaluate_the_metric(tmp_path):
    text = GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "sampler.step_counts: {grid: [[1, 2, 4], [1, 4]]}")
    with pytest.raises(ConfigError, match=r"step count 2 is not evaluated when sampler.step_counts=\[1, 4\]"):
        load_sweep(_write(tmp_path, text))
    # and a step-count list that needs more intermediate times than sampler.mid_t holds is refused as a value
    text = GOOD.replace("distill.reg_weight: {grid: [1, 0.1]}", "sampler.step_counts: {grid: [[1, 2, 8]]}")
    with pytest.raises(ConfigError, match="k−1 intermediate times"):
        load_sweep(_write(tmp_path, text))


def test_command_line_overrides_reach_base_and_sweep(tmp_path):
    path = _write(tmp_path, GOOD + "scheduler: {type: asha, grace_period: 100}\n")
    spec, cfg = load_sweep(path, ["train.steps=40", "sweep.scheduler.grace_period=10", "sweep.num_samples=2"])
    assert cfg.train.steps == 40 and spec.num_samples == 2
    assert spec.scheduler == {"type": "asha", "grace_period": 10, "max_t": 40, "reduction_factor": 4}
    assert cfg.train.eval_every == 10 and count_trials(spec) == 4
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_sweep(path, ["train.stepz=40"])


def test_cli_exits_with_the_message_before_starting(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(_write(tmp_path, GOOD + "bogus: 1\n"))])
    assert e.value.code == 2 and "unknown key 'bogus'" in capsys.readouterr().err


def test_divergence_rule():
    assert divergence({"train/loss": float("nan")}, 128) == "train/loss=nan"
    assert divergence({"train/loss": 0.0, "train/scm_nan_samples": 128.0}, 128).startswith("train/scm_nan_samples")
    assert divergence({"train/loss": 1.0, "train/scm_nan_samples": 3.0, "train/critic_nan_samples": 0.0}, 128) is None
    assert divergence({"eval/nfe_1/gmm_precision": 0.5}, 128) is None


def test_default_concurrency_counts_workers_and_a_data_slot():
    from rcm_core.config import load_config
    cfg = load_config(REPO / "experiments" / "demo.yaml", ["resources.num_workers=1"])
    assert default_concurrency({"CPU": 4.0}, cfg) == 2          # 0.5 worker + 1 data + 0.01 driver per trial
    cfg = load_config(REPO / "experiments" / "demo.yaml", ["resources.num_workers=1", "resources.use_gpu=true",
                                                                  "resources.gpus_per_worker=2"])
    assert default_concurrency({"CPU": 64.0, "GPU": 8.0}, cfg) == 4
    assert default_concurrency({"CPU": 1.0}, cfg) == 1


def test_optuna_is_optional_and_samples_its_own_points(tmp_path):
    import importlib.util

    text = GOOD.replace("{grid: [1, 0.1]}", "{loguniform: [0.001, 1]}") + "search: optuna\nnum_samples: 6\n"
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match="search=optuna needs the optuna package"):
            load_sweep(_write(tmp_path, text))
    else:
        spec, _ = load_sweep(_write(tmp_path, text))
        assert spec.search == "optuna" and count_trials(spec) == 6
    with pytest.raises(ConfigError, match="use choice instead of grid"):
        load_sweep(_write(tmp_path, GOOD + "search: optuna\n"))
