"""The strict config loader: every bad input fails early with the key, the source and the fix."""
from pathlib import Path

import pytest

from rcm_core.config import ConfigError, flatten, load_config, parse_override, save_resolved

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_yaml_loads_strictly(path):
    load_config(path)


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["distill.reg_weight=0.1", "optim.lr=3e-4", "sampler.mid_t=[1.4,1.0,0.5]",
                             "distill.mode=scm", "resources.use_gpu=true"])
    assert cfg.distill.reg_weight == 0.1 and cfg.optim.lr == 3e-4 and cfg.sampler.mid_t == [1.4, 1.0, 0.5]
    assert cfg.distill.mode == "scm" and cfg.resources.use_gpu is True
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)


def test_unknown_key_names_key_source_and_allowed(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("distill:\n  reg_wieght: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "distill.reg_wieght" in msg and str(f) in msg and "reg_weight" in msg


@pytest.mark.parametrize("override,needle", [
    ("distill.mode=fast", "allowed values are 'rcm', 'scm', 'dmd'"),
    ("train.steps=ten", "expected an integer"),
    ("optim.betas=0.9", "expected a list"),
    ("teacher.guidance=-1", "teacher.guidance=-1.0 is impossible"),
    ("distill.max_rollout_steps=0", "N_max must be at least 1"),
    ("distill.student_update_freq=0", "must be at least 1"),
    ("sampler.sigma_max=0", "sampler.sigma_max=0.0 is impossible"),
    ("sampler.step_counts=[1,8]", "needs k−1 intermediate times"),
    ("model.num_heads=5", "divisible by model.num_heads=5"),
    ("nonsense", "not of the form section.key=value"),
])
def test_bad_values_fail_with_the_fix(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_yaml_cannot_construct_objects(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "experiments" / "debug_cpu.yaml", ["distill.reg_weight=0.5"])
    path = save_resolved(cfg, tmp_path)
    assert load_config(path) == cfg
    assert flatten(cfg)["distill.reg_weight"] == 0.5
