"""Ray Tune sweeps over rCM config keys, defined in YAML: one Ray Train run per trial, nested MLflow runs, a report.

    python workflows/sweep.py --config experiments/sweeps/reg_weight.yaml                 # the demo-sized sweep
    python workflows/sweep.py --config experiments/sweeps/reg_weight.yaml teacher.train_steps=150 model.hidden=64 \\
        model.depth=2 train.steps=20 eval.num_samples=200 sweep.scheduler.grace_period=10 sweep.scheduler.max_t=20
    python workflows/sweep.py --config experiments/sweeps/reg_weight.yaml --resume        # continue an interrupted one
    python workflows/report.py --sweep <parent run id>                                    # the table and plot again

Sweep YAML (every key checked before anything starts; trailing `key=value` overrides apply to the base config):

    base: experiments/demo.yaml           # the run config every trial starts from
    metric: {name: eval/nfe_2/gmm_precision, mode: max}
    search_space:                         # dotted config keys -> one distribution each
      distill.reg_weight: {grid: [1, 0.1, 0.01, 0.001]}    # also choice | uniform | loguniform | randint [lo, hi)
    num_samples: 1                        # repeats of the grid (random / optuna: number of draws)
    search: random                        # random | grid | optuna (optuna only if installed)
    scheduler: {type: asha, grace_period: 100, max_t: 400}  # or {type: fifo}; grace_period/max_t in training steps
    resources: {num_workers: 1}           # per trial: keys of the config's `resources` section
    max_concurrent: null                  # default: as many trials as the cluster holds
    overrides: [train.eval_every=100]     # fixed overrides of the base config
    # on the command line, `key=value` overrides the base config and `sweep.key=value` this file

Each trial is a function trainable that builds `workflows.distill.build_trainer(...)` with a `TuneReportCallback`
(the Train V2 + Tune pattern; `Tuner(trainer)` is broken under V2, reference P7). Only reports that carry the
sweep metric (periodic evaluation, `train.eval_every`) reach Tune, so ASHA compares trials at equal steps. A trial
whose student blows up is stopped, tagged `diverged=true` in MLflow and the sweep goes on. The sweep's MLflow
parent run holds the sweep YAML and, at the end, the comparison table (text, CSV) and the quality-vs-step-count
plot that `workflows/report.py` also draws.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:            # `python workflows/sweep.py` from a checkout or a job working dir
    sys.path.insert(0, str(ROOT))

from rcm_core.config import (ConfigError, ExperimentCfg, apply_overrides, flatten, from_dict,  # noqa: E402
                             read_yaml, redact_url, to_dict)
from workflows.cli import add_debug_flag, run_cli  # noqa: E402
from workflows.console import setup_output  # noqa: E402
from workflows.trainer import OUTCOME_TAG, divergence  # noqa: E402,F401  (sweeps stop diverged trials by it)

TOP_KEYS = ("name", "base", "metric", "search_space", "num_samples", "search", "scheduler", "resources",
            "max_concurrent", "overrides", "storage", "seed")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna")
SCHEDULER_KEYS = ("type", "grace_period", "max_t", "reduction_factor")
# Keys a trial may not vary: the data set is written once per sweep from the base config, and names, run folders,
# tracking and resources are set by the sweep itself (resources go in the `resources:` section).
FIXED_PREFIXES = ("name", "tracking.", "train.run_dir", "train.storage_path", "resources.", "parallel.", "data.")
VARIABLE_DATA_KEYS = ("data.batch_size", "data.shuffle_seed")
TRIAL_DRIVER_CPU = 0.01     # the trial function only waits on its trainer; {"CPU": 0} is refused (reference P8)
DATA_CPU_PER_TRIAL = 1.0    # Ray Data read/decode tasks need a free CPU slot beside the workers, or it hangs (P6)
STATE_FILE = "rcm_sweep.json"


# ----------------------------------------------------------------------------------------------------------
# The sweep YAML, strictly

@dataclass
class SweepSpec:
    name: str
    path: Path                              # the sweep YAML itself (logged to the parent run)
    base: Path
    metric: str
    mode: str
    search_space: dict[str, tuple[str, Any]]    # dotted key -> (distribution, argument)
    num_samples: int = 1
    search: str = "random"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    resources: dict[str, Any] = field(default_factory=dict)
    max_concurrent: int | None = None
    overrides: list[str] = field(default_factory=list)
    storage: str = "runs/sweeps"
    seed: int = 0

    def base_overrides(self, cli: list[str]) -> list[str]:
        """Sweep overrides, then per-trial resources, then the command line (last wins)."""
        res = [f"resources.{k}={json.dumps(v)}" for k, v in self.resources.items()]
        return [*self.overrides, *res, *cli]


def _fail(path: Path, what: str) -> None:
    raise ConfigError(f"{path}: {what}")


def _expect(ok: bool, path: Path, what: str) -> None:
    if not ok:
        _fail(path, what)


def _resolve_base(path: Path, base: Any) -> Path:
    """`base` relative to the working directory, else to the checkout (so the shipped YAMLs run from anywhere)."""
    _expect(isinstance(base, str) and base != "", path, f"base={base!r}: give the run config path, "
                                                      f"e.g. base: experiments/demo.yaml")
    for candidate in (Path(base), ROOT / base, path.parent / base):
        if candidate.is_file():
            return candidate.resolve()
    _fail(path, f"base={base!r}: no such run config file")
    raise AssertionError  # unreachable


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_distribution(path: Path, key: str, spec: Any) -> tuple[str, Any]:
    """{kind: argument} with exactly one kind; the argument's shape is checked here, its values against the config."""
    where = f"search_space['{key}']"
    _expect(isinstance(spec, dict) and len(spec) == 1, path,
            f"{where}={spec!r}: give exactly one of {', '.join(DISTRIBUTIONS)}, e.g. {{grid: [1, 0.1]}}")
    (kind, arg), = spec.items()
    _expect(kind in DISTRIBUTIONS, path, f"{where}: unknown distribution '{kind}'; use one of "
                                         f"{', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        _expect(isinstance(arg, list) and len(arg) > 0, path, f"{where}: {kind} needs a non-empty list of values")
        return kind, arg
    _expect(isinstance(arg, list) and len(arg) == 2 and all(_number(a) for a in arg), path,
            f"{where}: {kind} needs [low, high], got {arg!r}")
    lo, hi = arg
    _expect(lo < hi, path, f"{where}: {kind} needs low < high, got {arg!r}")
    if kind == "loguniform":
        _expect(lo > 0, path, f"{where}: loguniform needs low > 0, got {arg!r}")
    if kind == "randint":
        _expect(all(isinstance(a, int) for a in arg), path, f"{where}: randint needs integers [low, high), got {arg!r}")
    return kind, arg


def _sample_values(kind: str, arg: Any) -> list[Any]:
    """Values to check against the config: every choice, or the bounds (and a float for the continuous kinds)."""
    if kind in ("choice", "grid"):
        return list(arg)
    if kind == "randint":
        return [arg[0], arg[1] - 1]
    return [float(arg[0]), float(arg[1]), (arg[0] + arg[1]) / 2.0]


def override_text(key: str, value: Any) -> str:
    """A sampled value as a dotted override: JSON is YAML, so lists, strings and 1e-06 come back as they went in."""
    return f"{key}={json.dumps(value)}"


def check_search_space(path: Path, space: dict[str, tuple[str, Any]], base: dict) -> None:
    """Every key a config key the sweep may vary, every value one the strict config accepts."""
    known = flatten(from_dict(base, str(path)))
    for key, (kind, arg) in space.items():
        if key not in known:
            close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
            _fail(path, f"search_space['{key}'] is not a config key"
                        + (f" (did you mean {', '.join(close)}?)" if close else
                           "; keys are dotted names of the run config, e.g. distill.reg_weight"))
        if key.startswith(FIXED_PREFIXES) and key not in VARIABLE_DATA_KEYS:
            _fail(path, f"search_space['{key}']: set by the sweep itself (names, run folders, tracking, resources) "
                        f"or fixed per sweep (the data set is written once); move it to `overrides`/`resources`")
        for value in _sample_values(kind, arg):
            try:
                from_dict(apply_overrides(base, [override_text(key, value)]), f"{path} search_space['{key}']")
            except ConfigError as e:
                _fail(path, f"search_space['{key}'] ({kind}) value {value!r} is not valid: {e}")


def check_metric(path: Path, metric: str, space: dict[str, tuple[str, Any]], base: ExperimentCfg) -> None:
    """`eval/nfe_<N>/<m>` must be evaluated in every trial (N in each step_counts); `train/<m>` is always there."""
    import re

    m = re.fullmatch(r"eval/(teacher_)?nfe_(\d+)/[A-Za-z0-9_.-]+", metric)
    _expect(bool(m) or re.fullmatch(r"train/[A-Za-z0-9_./-]+", metric) is not None, path,
            f"metric.name={metric!r}: expected eval/nfe_<N>/<metric> (e.g. eval/nfe_2/gmm_precision) "
            f"or train/<name>")
    if m and not m.group(1):
        n = int(m.group(2))
        variants = space["sampler.step_counts"][1] if "sampler.step_counts" in space else [base.sampler.step_counts]
        for counts in variants:
            _expect(n in counts, path, f"metric.name={metric!r}: step count {n} is not evaluated when "
                                       f"sampler.step_counts={counts}")


def _scheduler(path: Path, raw: Any, steps: int) -> dict[str, Any]:
    raw = {"type": "fifo"} if raw is None else raw
    _expect(isinstance(raw, dict), path,
            f"scheduler={raw!r}: expected a mapping, e.g. {{type: asha, grace_period: 10}}")
    for k in raw:
        _expect(k in SCHEDULER_KEYS, path, f"unknown key 'scheduler.{k}'; allowed: {', '.join(SCHEDULER_KEYS)}")
    kind = raw.get("type", "fifo")
    _expect(kind in ("fifo", "asha"), path, f"scheduler.type={kind!r}: use fifo or asha")
    if kind == "fifo":
        _expect(set(raw) <= {"type"}, path, "scheduler: grace_period/max_t/reduction_factor apply only to asha")
        return {"type": "fifo"}
    out = {"type": "asha", "grace_period": raw.get("grace_period", max(1, steps // 4)),
           "max_t": raw.get("max_t", steps), "reduction_factor": raw.get("reduction_factor", 4)}
    for k in ("grace_period", "max_t", "reduction_factor"):
        _expect(isinstance(out[k], int) and not isinstance(out[k], bool) and out[k] >= 1, path,
                f"scheduler.{k}={out[k]!r}: expected a positive integer (training steps)")
    _expect(out["grace_period"] <= out["max_t"], path, f"scheduler.grace_period={out['grace_period']} exceeds "
                                                       f"scheduler.max_t={out['max_t']}")
    _expect(out["reduction_factor"] >= 2, path, "scheduler.reduction_factor must be ≥ 2")
    return out


def _check_search(path: Path, search: Any, space: dict[str, tuple[str, Any]]) -> None:
    _expect(search in SEARCHES, path, f"search={search!r}: use one of {', '.join(SEARCHES)}")
    kinds = {k: kind for k, (kind, _) in space.items()}
    if search == "grid":
        bad = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
        _expect(not bad, path, f"search=grid needs finite values; {', '.join(bad)} use a continuous distribution")
    if search == "optuna":
        bad = [k for k, kind in kinds.items() if kind == "grid"]
        _expect(not bad, path, f"search=optuna samples its own points; use choice instead of grid for "
                               f"{', '.join(bad)}")
        try:
            import optuna  # noqa: F401
        except ImportError:
            _fail(path, "search=optuna needs the optuna package (pip install optuna); or use random / grid")


def load_sweep(path: str | Path, cli_overrides: list[str] | None = None) -> tuple[SweepSpec, ExperimentCfg]:
    """The sweep spec and its base config (base YAML + sweep overrides + resources + command line), all checked."""
    path = Path(path)
    sweep_cli = [o.removeprefix("sweep.") for o in cli_overrides or [] if o.startswith("sweep.")]
    cli_overrides = [o for o in cli_overrides or [] if not o.startswith("sweep.")]
    raw = apply_overrides(read_yaml(path), sweep_cli)    # `sweep.scheduler.grace_period=10` edits the sweep YAML
    for k in raw:
        _expect(k in TOP_KEYS, path, f"unknown key '{k}'; allowed keys: {', '.join(TOP_KEYS)}")
    for k in ("base", "metric", "search_space"):
        _expect(k in raw, path, f"missing key '{k}'")
    metric = raw["metric"]
    _expect(isinstance(metric, dict) and set(metric) == {"name", "mode"}, path,
            f"metric={metric!r}: expected {{name: eval/nfe_2/gmm_precision, mode: max}}")
    _expect(metric["mode"] in ("min", "max"), path, f"metric.mode={metric['mode']!r}: use min or max")
    space_raw = raw["search_space"]
    _expect(isinstance(space_raw, dict) and space_raw, path, "search_space: give at least one dotted key")
    overrides = raw.get("overrides") or []
    _expect(isinstance(overrides, list) and all(isinstance(o, str) for o in overrides), path,
            "overrides: expected a list of 'key=value' strings")
    resources = raw.get("resources") or {}
    _expect(isinstance(resources, dict), path, "resources: expected a mapping, e.g. {num_workers: 1}")
    spec = SweepSpec(name=str(raw.get("name") or path.stem), path=path.resolve(),
                     base=_resolve_base(path, raw["base"]), metric=metric["name"], mode=metric["mode"],
                     search_space={k: parse_distribution(path, k, v) for k, v in space_raw.items()},
                     num_samples=raw.get("num_samples", 1), search=raw.get("search", "random"),
                     resources=resources, max_concurrent=raw.get("max_concurrent"), overrides=overrides,
                     storage=str(raw.get("storage", "runs/sweeps")), seed=raw.get("seed", 0))
    _expect(isinstance(spec.num_samples, int) and spec.num_samples >= 1, path,
            f"num_samples={spec.num_samples!r}: expected an integer ≥ 1")
    _expect(spec.max_concurrent is None or (isinstance(spec.max_concurrent, int) and spec.max_concurrent >= 1),
            path, f"max_concurrent={spec.max_concurrent!r}: expected an integer ≥ 1 or null (what the cluster holds)")
    _expect(isinstance(spec.seed, int), path, f"seed={spec.seed!r}: expected an integer")
    for k in resources:
        _expect(f"resources.{k}" in flatten(ExperimentCfg()), path,
                f"unknown key 'resources.{k}'; allowed: {', '.join(to_dict(ExperimentCfg().resources))}")
    try:
        base_dict = apply_overrides(read_yaml(spec.base), spec.base_overrides(cli_overrides or []))
        base_cfg = from_dict(base_dict, f"{spec.base} + {path} overrides/resources + command line")
    except ConfigError as e:
        _fail(path, str(e))
    check_search_space(path, spec.search_space, to_dict(base_cfg))
    _check_search(path, spec.search, spec.search_space)
    check_metric(path, spec.metric, spec.search_space, base_cfg)
    spec.scheduler = _scheduler(path, raw.get("scheduler"), base_cfg.train.steps)
    return spec, with_eval_signal(spec, base_cfg)


def with_eval_signal(spec: SweepSpec, cfg: ExperimentCfg) -> ExperimentCfg:
    """ASHA needs the metric before the end: evaluate every grace period unless the config says otherwise."""
    if spec.scheduler["type"] == "asha" and cfg.train.eval_every == 0 and spec.metric.startswith("eval/"):
        cfg.train.eval_every = spec.scheduler["grace_period"]
    return cfg


def count_trials(spec: SweepSpec) -> int:
    """Trials the sweep will run: grid sizes multiply, times num_samples (random / optuna: num_samples draws)."""
    n = spec.num_samples
    for kind, arg in spec.search_space.values():
        if kind == "grid" or (kind == "choice" and spec.search == "grid"):
            n *= len(arg)
    return n


# ----------------------------------------------------------------------------------------------------------
# Concurrency (pure: tested without Ray); divergence lives in workflows/trainer.py



def default_concurrency(cluster: dict[str, float], cfg: ExperimentCfg) -> int:
    """Trials that fit at once: the function trainable holds almost nothing, so count the trainers' workers and
    one CPU slot per trial for Ray Data (a Tune limit is needed: Tune itself only sees the trial function)."""
    r = cfg.resources
    per_trial = max(r.num_workers, 1) * r.cpus_per_worker + DATA_CPU_PER_TRIAL + TRIAL_DRIVER_CPU
    n = int(cluster.get("CPU", 0) // per_trial)
    if r.use_gpu:
        n = min(n, int(cluster.get("GPU", 0) // max(r.num_workers * r.gpus_per_worker, 1e-9)))
    return max(n, 1)


# ----------------------------------------------------------------------------------------------------------
# Trial side (runs in a Tune trial actor)

def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(const: dict, params: dict[str, Any], trial_id: str) -> ExperimentCfg:
    """Base config + the sampled values (through the same override path as a hand-run config) + trial names."""
    name = trial_run_name(const["sweep_name"], trial_id)
    data = apply_overrides(const["base"], [override_text(k, v) for k, v in params.items()])
    data = apply_overrides(data, [override_text("name", name), override_text("tracking.run_name", name),
                                  override_text("train.run_dir", str(Path(const["trials_dir"]) / trial_id))])
    return from_dict(data, f"sweep {const['sweep_name']} trial {trial_id}")


@contextlib.contextmanager
def working_dir(path: str) -> Iterator[None]:
    """Tune runs each trial in its own folder; the teacher cache (.cache/teachers) is relative to the sweep's."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def make_report_callback(metric: str, per_worker_batch: int, last_step: int):
    """TuneReportCallback that forwards only reports carrying the sweep metric (or a divergence), so ASHA compares
    trials at their evaluation steps and Tune's strict metric check holds; divergence is reported as metric=NaN.
    The last report is marked `final` (see `scheduler`)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            reason = divergence(first, per_worker_batch)
            if reason is not None:
                first.update({metric: float("nan"), "diverged": 1.0, "diverged_reason": reason})
            elif metric not in first:
                return
            else:
                first["diverged"] = 0.0
            first["final"] = float(first.get("step", 0) >= last_step)
            super().after_report(run_context, [first], None)   # checkpoints stay with Ray Train (it resumes)

    return SweepReportCallback()


def run_trial(params: dict, const: dict) -> None:
    """One trial: a Ray Train run of the trial's config (V2 pattern: a function trainable building the trainer).

    `params` is what Tune sampled (dotted key -> value); `const` the sweep's fixed part (base config, parent run)."""
    from ray import tune

    from workflows.driver import driver_feature_net, driver_teacher
    from workflows.trainer import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(const, params, trial_id)
    with working_dir(const["cwd"]):
        teacher_path = driver_teacher(cfg)      # cached by config hash: shared unless model/teacher keys are swept
        # cached by the data set's version (data.* is fixed per sweep): every trial is scored by one classifier
        feature_net_path = driver_feature_net(cfg)
    per_worker_batch = cfg.data.batch_size // max(cfg.resources.num_workers, 1)
    build_trainer(cfg, teacher_path, feature_net_path=feature_net_path, parent_run_id=const["parent_run_id"],
                  callbacks=[make_report_callback(const["metric"], per_worker_batch, cfg.train.steps)],
                  stop_on_divergence=per_worker_batch).fit()


# ----------------------------------------------------------------------------------------------------------
# Driver side: MLflow parent run, per-trial marking, Tune set-up

def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri)


def start_parent_run(spec: SweepSpec, cfg: ExperimentCfg, cli: list[str]) -> str:
    """The sweep's MLflow parent run: sweep YAML and resolved base config as artifacts, the search as params."""
    from rcm_core.config import config_hash, dump_yaml
    from workflows.tracking import EXPERIMENT_KIND, default_artifact_root, git_commit, redact, tracking_uri

    uri = tracking_uri(cfg)
    client = _client(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.tracking.experiment, artifact_location=default_artifact_root(uri), tags=dict([EXPERIMENT_KIND]))
    tags = {"mlflow.runName": spec.name, "rcm.sweep": "true", "rcm.sweep.metric": spec.metric,
            "rcm.sweep.mode": spec.mode, "rcm.sweep.keys": json.dumps(list(spec.search_space)),
            "git_commit": git_commit(), "config_hash": config_hash(cfg)}
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    from mlflow.entities import Param
    params = {"sweep.search": spec.search, "sweep.num_samples": spec.num_samples,
              "sweep.scheduler": json.dumps(spec.scheduler), "sweep.base": str(spec.base),
              "sweep.overrides": json.dumps(spec.base_overrides(cli)),
              **{f"sweep.space.{k}": json.dumps({kind: arg}) for k, (kind, arg) in spec.search_space.items()}}
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in redact(params).items()])
    client.log_artifact(run_id, str(spec.path), "sweep")
    client.log_text(run_id, dump_yaml(cfg), "sweep/base_resolved.yaml")
    return run_id


def find_trial_run(client, parent_run_id: str, run_name: str):
    """The trial's MLflow run (created by its rank-0 worker), newest first if a restart made two."""
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.mlflow.runName = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=5)
    return runs[0] if runs else None


def mark_trial_run(client, parent_run_id: str, run_name: str, outcome: str, reason: str = "") -> bool:
    """Tag a trial's run with its outcome; a run its worker could not end (stopped, diverged) gets an end state."""
    run = find_trial_run(client, parent_run_id, run_name)
    if run is None:
        warnings.warn(f"no MLflow run named {run_name} under parent {parent_run_id} (trial ended before logging)")
        return False
    if outcome == "stopped_early" and run.info.status == "FINISHED":
        outcome = "finished"          # the scheduler's stop landed after the trial had run to its last step
    client.set_tag(run.info.run_id, OUTCOME_TAG, outcome)
    if outcome == "diverged":
        client.set_tag(run.info.run_id, "diverged", "true")
        client.set_tag(run.info.run_id, "diverged_reason", reason[:5000])
    end_state = {"diverged": "FAILED", "error": "FAILED", "stopped_early": "KILLED"}.get(outcome)
    if end_state and (run.info.status == "RUNNING" or end_state == "FAILED"):
        client.set_terminated(run.info.run_id, status=end_state)
    return True


def make_trial_callback(uri: str, parent_run_id: str, sweep_name: str, steps: int, metric: str):
    """Driver-side Tune callback: when a trial ends, record in MLflow how (finished, stopped early, diverged, error)."""
    from ray import tune

    class TrialOutcome(tune.Callback):
        def _mark(self, trial, outcome: str, reason: str = "") -> None:
            try:
                mark_trial_run(_client(uri), parent_run_id, trial_run_name(sweep_name, trial.trial_id),
                               outcome, reason)
            except Exception as e:  # noqa: BLE001 -- tracking trouble of any kind must not end the sweep
                warnings.warn(f"could not mark trial {trial.trial_id} in MLflow: {e}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if last.get("diverged"):
                self._mark(trial, "diverged", str(last.get("diverged_reason", "")))
            elif last.get("step", 0) >= trial.config.get("train.steps", steps):
                self._mark(trial, "finished")
            else:
                self._mark(trial, "stopped_early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._mark(trial, "error")

    return TrialOutcome()


def _diverged(trial_id: str, result: dict) -> bool:
    """Tune stopper: end a trial at its first diverged report (module-level so a restored Tuner can unpickle it)."""
    return bool(result.get("diverged"))


def _trial_name(trial) -> str:
    return trial.trial_id       # stable across restores: the Train run name and the MLflow run name derive from it


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    make = {"choice": lambda a: tune.grid_search(a) if spec.search == "grid" else tune.choice(a),
            "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {k: make[kind](arg) for k, (kind, arg) in spec.search_space.items()}


def search_alg(spec: SweepSpec, concurrency: int):
    if spec.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator
    # An explicit generator must carry the limit itself: Tune ignores max_concurrent_trials beside one.
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrency)


def scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    class FinalReportASHA(ASHAScheduler):
        """ASHA that never stops a trial at its final report: the trial ends by itself right after it, once its
        worker has logged the final samples and student and closed its MLflow run; a stop there would kill that."""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if result.get("final") else decision

    s = spec.scheduler
    if s["type"] == "fifo":
        return FIFOScheduler()
    # time_attr "step" (reported by every trial) makes grace_period and max_t training steps, not report counts.
    return FinalReportASHA(time_attr="step", grace_period=s["grace_period"], max_t=s["max_t"],
                           reduction_factor=s["reduction_factor"])


def sweep_dir(spec: SweepSpec) -> Path:
    return (Path(spec.storage) / spec.name).resolve()


def trial_constants(spec: SweepSpec, cfg: ExperimentCfg, parent_run_id: str) -> dict[str, Any]:
    return {"sweep_name": spec.name, "base": to_dict(cfg), "parent_run_id": parent_run_id, "metric": spec.metric,
            "trials_dir": str(sweep_dir(spec) / "trials"), "cwd": os.getcwd()}


def trainable(const: dict[str, Any]):
    """The fixed part travels through the object store (not the param space, which Tune prints and logs)."""
    from ray import tune
    return tune.with_resources(tune.with_parameters(run_trial, const=const), {"CPU": TRIAL_DRIVER_CPU})


def build_tuner(spec: SweepSpec, cfg: ExperimentCfg, const: dict[str, Any], concurrency: int):
    from ray import tune

    from workflows.tracking import tracking_uri

    callback = make_trial_callback(tracking_uri(cfg), const["parent_run_id"], spec.name, cfg.train.steps,
                                   spec.metric)
    return tune.Tuner(
        trainable(const),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    search_alg=search_alg(spec, concurrency), scheduler=scheduler(spec),
                                    max_concurrent_trials=concurrency, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=spec.name, storage_path=str(Path(spec.storage).resolve()), stop=_diverged,
                                  callbacks=[callback], verbose=1))


def restore_tuner(spec: SweepSpec, const: dict[str, Any]):
    from ray import tune

    path = str(sweep_dir(spec))
    if not tune.Tuner.can_restore(path):
        raise ConfigError(f"--resume: no Tune experiment state under {path} (run the sweep without --resume first)")
    return tune.Tuner.restore(path, trainable=trainable(const), resume_unfinished=True, resume_errored=True)


def _state_path(spec: SweepSpec) -> Path:
    return sweep_dir(spec) / STATE_FILE


def finish_parent(uri: str, parent_run_id: str, status: str = "FINISHED") -> str:
    """Comparison table (text + CSV) and quality-vs-step-count plot onto the parent run; returns the table."""
    import tempfile

    from workflows.report import sweep_report

    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        rep = sweep_report(client, parent_run_id, out=Path(tmp) / "quality_vs_steps.png")
        client.log_text(parent_run_id, rep.table + "\n", "comparison/table.txt")
        client.log_text(parent_run_id, rep.csv, "comparison/table.csv")
        if rep.plot is not None:
            client.log_artifact(parent_run_id, str(rep.plot), "comparison")
    for outcome, n in rep.outcomes.items():
        client.log_metric(parent_run_id, f"sweep/trials_{outcome}", n)
    client.set_terminated(parent_run_id, status=status)
    return rep.table


def run_sweep(spec: SweepSpec, cfg: ExperimentCfg, cli: list[str], *, resume: bool = False,
              address: str | None = None) -> str:
    """Prepare data and teacher once, start (or restore) the Tuner, finish the parent run. Returns its run id."""
    from workflows.driver import absolute_paths, check_device, driver_feature_net, driver_teacher, prepare_data
    from workflows.ray_session import init_ray
    from workflows.tracking import tracking_uri

    state = _state_path(spec)
    if state.exists() and not resume:
        raise ConfigError(f"sweep folder {state.parent} exists: pass --resume to continue it, or --name NEW "
                          f"(or delete the folder) to start another")
    check_device(cfg)              # train.device and resources.use_gpu must agree (workflows/driver.py)
    cfg = prepare_data(absolute_paths(cfg))
    if resume:
        if not state.is_file():
            raise ConfigError(f"--resume: {state} not found (nothing to resume for sweep '{spec.name}')")
        const = json.loads(state.read_text())      # the interrupted sweep's own base config, not today's files
        parent = const["parent_run_id"]
        _client(tracking_uri(cfg)).update_run(parent, status="RUNNING")
    else:
        parent = start_parent_run(spec, cfg, cli)
        const = trial_constants(spec, cfg, parent)
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(const, indent=1))
    driver_teacher(cfg)            # trained once here, so concurrent trials find it cached instead of racing
    driver_feature_net(cfg)    # likewise
    init_ray(address)
    import ray
    concurrency = spec.max_concurrent or default_concurrency(ray.cluster_resources(), cfg)
    print(f"sweep {spec.name}: {count_trials(spec)} trials, {concurrency} at a time, MLflow parent run {parent}")
    tuner = restore_tuner(spec, const) if resume else build_tuner(spec, cfg, const, concurrency)
    try:
        tuner.fit()
    except BaseException:
        _client(tracking_uri(cfg)).set_terminated(parent, status="KILLED")   # --resume sets it RUNNING again
        raise
    print("\n" + finish_parent(tracking_uri(cfg), parent))
    return parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Ray Tune sweep of rCM distillation runs, defined in a sweep YAML "
                                             "(see experiments/sweeps/).")
    ap.add_argument("--config", required=True, help="sweep YAML, e.g. experiments/sweeps/reg_weight.yaml")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    ap.add_argument("--name", default=None, help="sweep name (default: the YAML's name, else its file name)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)")
    ap.add_argument("--dry-run", action="store_true", help="check the YAML and print the trials' search, then stop")
    ap.add_argument("--verbose", action="store_true", help="show Ray's own logs and Ray Data's progress bars")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. train.steps=20; "
                    "sweep.KEY=VALUE overrides the sweep YAML, e.g. sweep.scheduler.grace_period=10")
    args = ap.parse_args(argv)
    setup_output(args.verbose)
    try:
        spec, cfg = load_sweep(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    spec.name = args.name or spec.name
    if args.dry_run:
        print(f"sweep {spec.name}: base {spec.base}, metric {spec.metric} ({spec.mode}), search {spec.search}, "
              f"scheduler {spec.scheduler}, {count_trials(spec)} trials, train.eval_every={cfg.train.eval_every}")
        for k, (kind, arg) in spec.search_space.items():
            print(f"  {k}: {kind} {arg}")
        return 0
    from workflows.tracking import check_tracking_access
    check_tracking_access(cfg)                          # a refused MLflow account stops here, in one line
    try:
        parent = run_sweep(spec, cfg, args.overrides, resume=args.resume, address=args.address)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    from workflows.tracking import tracking_uri
    shown = redact_url(tracking_uri(cfg))               # printed lines end up in job logs: no credentials
    print(f"\nMLflow parent run {parent} at {shown}; again: python workflows/report.py --sweep {parent} "
          f"--tracking-uri {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
