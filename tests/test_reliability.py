"""Reliability of the pieces a cluster breaks: partial checkpoints, bad configs, foreign checkpoints."""
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcm_core.checkpoint import CKPT_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
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
