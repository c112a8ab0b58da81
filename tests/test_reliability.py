"""Reliability of the pieces a cluster breaks: partial checkpoints, bad configs, foreign checkpoints."""
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcm_core.run.checkpoint import CKPT_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
from rcm_core.config import ConfigError, flatten, load_config


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save_checkpoint({"iteration": 10, "w": torch.ones(3)}, root / "step_10")

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 20}, root / "step_20")
    monkeypatch.undo()
    # the partial write is a .tmp folder that is never picked; the previous checkpoint still loads
    assert latest_checkpoint(root) == root / "step_10"
    assert load_checkpoint(latest_checkpoint(root))["iteration"] == 10


def test_truncated_checkpoint_file_is_reported_with_its_path(tmp_path):
    path = save_checkpoint({"w": torch.ones(1000)}, tmp_path / "step_5")
    data = (path / CKPT_FILE).read_bytes()
    (path / CKPT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="step_5"):
        load_checkpoint(path)


def test_checkpoints_refuse_pickled_code(tmp_path):
    import pickle

    (tmp_path / "step_1").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "step_1" / CKPT_FILE, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ValueError, match="(?s)cannot be loaded safely.*(?i:weights_only|unsupported|global)"):
        load_checkpoint(tmp_path / "step_1")


KEYS = sorted(flatten(load_config()).keys())
text = st.text(alphabet=string.ascii_letters + string.digits + "._-[],: ", max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.sampled_from(KEYS), text), value=st.one_of(text, st.integers(-10, 10),
                                                                     st.floats(allow_nan=True), st.booleans()))
def test_any_override_either_loads_or_fails_with_config_error(key, value):
    """Fuzzed overrides never escape as a traceback from deep inside: a valid config or one ConfigError."""
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        assert str(e)


# ----------------------------------------------------------------------------------------------------------
# A checkpoint from another model shape

def _tiny_state(hidden: int):
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.distill import build_state
    from rcm_core.networks import build_network

    cfg = load_config("experiments/debug_cpu.yaml", [f"model.hidden={hidden}", "model.depth=2"])
    teacher = TrigFlowDenoiser(build_network(cfg.model), cfg.teacher.parametrization).requires_grad_(False)
    return build_state(cfg, teacher)


def test_checkpoint_of_another_model_shape_names_the_file_and_keys(tmp_path):
    from rcm_core.run.checkpoint import load_into_state, state_to_dict

    path = save_checkpoint(state_to_dict(_tiny_state(32)), tmp_path / "step_7")
    with pytest.raises(ValueError) as err:
        load_into_state(_tiny_state(48), load_checkpoint(path))
    msg = str(err.value)
    assert str(path / CKPT_FILE) in msg and "another model shape" in msg and "(32" in msg and "(48" in msg
    torch.save({"w": torch.ones(2)}, path / CKPT_FILE)          # a weights file, not a distillation checkpoint
    with pytest.raises(ValueError, match=r"step_7/state.pt: not a distillation checkpoint \(missing \['counters'"):
        load_into_state(_tiny_state(32), load_checkpoint(path))


def test_resuming_a_class_conditional_dit_from_before_issue_32_fails_clearly(tmp_path):
    """Same model.* keys, but the run's state.pt has no adaLN class embedding: one error naming the file and the fix."""
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.method.distill import build_state
    from rcm_core.networks import build_network
    from rcm_core.run.checkpoint import load_into_state, state_to_dict

    cfg = load_config(None, ["model.kind=dit", "model.in_channels=4", "model.num_classes=3", "model.dim=16",
                             "model.ffn_dim=32", "model.num_heads=2", "model.num_layers=1", "model.text_dim=8"])
    state = build_state(cfg, TrigFlowDenoiser(build_network(cfg.model)).requires_grad_(False))
    data = state_to_dict(state)
    for part in ("student", "fake"):
        del data[part]["net.condition_embedder.class_embedder.weight"]
    path = save_checkpoint(data, tmp_path / "step_3")
    with pytest.raises(ValueError, match=r"step_3/state.pt \(student\): a class-conditional DiT saved before .*retrain"):
        load_into_state(state, load_checkpoint(path))


# ----------------------------------------------------------------------------------------------------------
# Fuzzed sweep YAML: every bad file ends in one ConfigError that names the file

SWEEP_KEYS = ["name", "base", "metric", "search_space", "num_samples", "search", "scheduler", "resources",
              "max_concurrent", "overrides", "seed", "trials"]
leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 500), st.floats(allow_nan=True, allow_infinity=True),
                 text, st.sampled_from(["experiments/demo.yaml", "eval/nfe_2/gmm_precision", "max", "asha", "grid",
                                        "distill.reg_weight", "train.steps", "fifo", "optuna"]))
tree = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                 st.dictionaries(st.sampled_from(SWEEP_KEYS + [
                                                     "grid", "choice", "uniform", "loguniform", "randint", "type",
                                                     "grace_period", "max_t", "mode", "num_workers",
                                                     "distill.reg_weight", "train.steps", "sampler.step_counts"]),
                                                     kids, max_size=3)), max_leaves=8)
GOOD_SWEEP = {"base": "experiments/demo.yaml", "metric": {"name": "eval/nfe_2/gmm_precision", "mode": "max"},
              "search_space": {"distill.reg_weight": {"grid": [1, 0.1]}}, "resources": {"num_workers": 1}}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(edits=st.dictionaries(st.sampled_from(SWEEP_KEYS), tree, max_size=3),
       drop=st.lists(st.sampled_from(list(GOOD_SWEEP)), max_size=2), raw=st.one_of(st.none(), text))
def test_fuzzed_sweep_yaml_loads_or_fails_with_one_config_error(tmp_path, edits, drop, raw):
    import yaml

    from workflows.sweep import load_sweep

    path = tmp_path / "fuzz.yaml"
    if raw is not None:                          # arbitrary text, often not YAML or not a mapping at all
        path.write_text(raw)
    else:
        doc = {k: v for k, v in {**GOOD_SWEEP, **edits}.items() if k not in drop}
        path.write_text(yaml.safe_dump(doc))
    try:
        load_sweep(path, ["train.steps=20"])
    except ConfigError as e:
        assert str(path) in str(e), str(e)       # names the file (and, by the messages above, the key and fix)


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    from workflows.sweep import load_sweep

    for text in ("!!python/object/apply:os.system ['echo pwned']\n",
                 "base: !!python/name:os.system\nmetric: {name: eval/nfe_2/gmm_precision, mode: max}\n"):
        (tmp_path / "evil.yaml").write_text(text)
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_sweep(tmp_path / "evil.yaml")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(tmp_path / "evil.yaml")


def test_credentials_in_urls_never_reach_the_written_config(tmp_path):
    """A tracking URI with a token and an S3 endpoint with keys: the resolved config written to the run folder
    (and logged to MLflow as an artifact, via the same dump_yaml) keeps the hosts but not the credentials."""
    from rcm_core.config import dump_yaml, load_config, redact_url, save_resolved

    cfg = load_config(None, ["tracking.tracking_uri=https://alice:tok-SECRET1@mlflow.example:5000",
                             "data.s3_endpoint=http://AKIASECRET2:SECRET3@127.0.0.1:9000",
                             "data.url=s3://bucket/prefix"])
    text = save_resolved(cfg, tmp_path).read_text()
    assert text == dump_yaml(cfg)
    for secret in ("SECRET1", "SECRET2", "SECRET3", "alice"):
        assert secret not in text
    assert "https://***@mlflow.example:5000" in text and "http://***@127.0.0.1:9000" in text
    assert "s3://bucket/prefix" in text                       # URLs without credentials are untouched
    assert cfg.tracking.tracking_uri.startswith("https://alice:")   # the run itself still has its access
    assert redact_url("postgresql://u:p@db/x and http://t0ken@h/") == "postgresql://***@db/x and http://***@h/"
