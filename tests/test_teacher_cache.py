"""The teacher cache cannot go stale (issue 18): its key changes with everything that shapes the teacher.

`rcm_core.run.teacher.teacher_key` hashes model.* (time_scale included), the whole teacher.* training config,
data.normalize, the seed and the data's content; `workflows.driver.teacher_data_key` names a data set by its
manifest (shards, row counts, channel statistics, generator), not by its URL.
"""
import shutil

import pytest

from rcm_core.config import load_config
from rcm_core.run.teacher import teacher_key
from workflows.driver import driver_teacher, teacher_data_key
from workflows.prepare_latents import prepare

SHAPES_THE_TEACHER = ["data.normalize=false", "model.time_scale=1000", "model.hidden=32", "model.dtype=float64",
                      "teacher.parametrization=trigflow", "teacher.train_steps=3", "teacher.train_lr=1e-4",
                      "teacher.train_batch_size=8", "teacher.cond_dropout=0.2", "teacher.ema_sigma_rel=0.1",
                      "train.seed=1"]
DOES_NOT = ["optim.lr=1e-3", "distill.mode=scm", "train.steps=7", "eval.num_samples=10", "data.batch_size=8",
            "data.url=/elsewhere", "model.chunk_t=2", "model.first_chunk_t=3"]
TINY = ["model.kind=mlp", "model.in_channels=2", "model.num_classes=4", "model.hidden=16", "model.depth=1",
        "teacher.train_steps=2", "teacher.train_batch_size=16"]


def test_every_setting_that_shapes_the_teacher_changes_its_key():
    base = teacher_key(load_config(None, TINY), "data-a")
    keys = {flip: teacher_key(load_config(None, [*TINY, flip]), "data-a") for flip in SHAPES_THE_TEACHER}
    keys["another data set"] = teacher_key(load_config(None, TINY), "data-b")
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys
    for same in DOES_NOT:
        assert teacher_key(load_config(None, [*TINY, same]), "data-a") == base, same


def _write(url, seed):
    prepare(load_config(None, [f"data.url={url}", "data.source=gmm", "data.num_rows=64",
                               "data.rows_per_shard=32", f"data.seed={seed}"]).data)


def test_data_key_follows_the_manifest_not_the_url(tmp_path):
    _write(tmp_path / "a", seed=0)
    key = teacher_data_key(load_config(None, [*TINY, f"data.url={tmp_path / 'a'}"]))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert teacher_data_key(load_config(None, [*TINY, f"data.url={tmp_path / 'copy'}"])) == key
    shutil.rmtree(tmp_path / "a")
    _write(tmp_path / "a", seed=1)                     # another data set rewritten at the same URL
    assert teacher_data_key(load_config(None, [*TINY, f"data.url={tmp_path / 'a'}"])) != key


def test_flipping_normalize_trains_a_new_teacher(tmp_path, monkeypatch):
    """The issue's stale case: the same data distilled with data.normalize false, then true, must not share a
    teacher trained in the other coordinates."""
    monkeypatch.chdir(tmp_path)                         # driver_teacher caches under ./.cache/teachers
    _write(tmp_path / "data", seed=0)
    raw = driver_teacher(load_config(None, [*TINY, f"data.url={tmp_path / 'data'}", "data.normalize=false"]))
    mtime = raw.stat().st_mtime_ns
    normalized = driver_teacher(load_config(None, [*TINY, f"data.url={tmp_path / 'data'}", "data.normalize=true"]))
    assert normalized != raw and normalized.is_file() and raw.is_file()
    again = driver_teacher(load_config(None, [*TINY, f"data.url={tmp_path / 'data'}", "data.normalize=false"]))
    assert again == raw and raw.stat().st_mtime_ns == mtime   # the same teacher is reused, not retrained


@pytest.mark.parametrize("scale", [10.0, 1000.0])
def test_stored_teacher_remembers_its_time_scale(tmp_path, scale):
    """A file written before model.time_scale existed was trained at 1000·s; loading it under another scale fails."""
    import torch

    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.networks import build_network
    from rcm_core.run.teacher import load_teacher, save_teacher

    cfg = load_config(None, TINY)
    net = build_network(cfg.model)
    save_teacher(TrigFlowDenoiser(net), cfg, tmp_path / "t.pt")
    old = torch.load(tmp_path / "t.pt", weights_only=True)
    del old["model"]["time_scale"]
    torch.save(old, tmp_path / "t.pt")
    want = load_config(None, [*TINY, f"model.time_scale={scale}"])
    if scale == 1000.0:
        assert load_teacher(tmp_path / "t.pt", want, torch.device("cpu")).time_scale == 1000.0
    else:
        with pytest.raises(ValueError, match="time_scale"):
            load_teacher(tmp_path / "t.pt", want, torch.device("cpu"))


# A class-conditional DiT (the CPU video recipe's kind of teacher) and the cache key the code before issue 32 gave it
# for data "data-a" (computed at commit 0da3cd4, TEACHER_SCHEMA 3).
DIT_LABELS = ["model.kind=dit", "model.in_channels=4", "model.num_classes=4", "model.dim=32", "model.ffn_dim=64",
              "model.num_heads=2", "model.num_layers=1", "model.text_dim=16", "model.label_tokens=2"]
KEY_BEFORE_ISSUE_32 = "cb9c11ce06c94c07"


def test_class_conditional_dit_teachers_from_before_the_adaln_label_path_are_never_served(tmp_path):
    """Issue 32 changed what a class-conditional DiT is (a class embedding in adaLN) for the same model.* keys: the
    cache key moved, and a stale file put under the new key (or passed as teacher.checkpoint) fails clearly."""
    import torch

    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.networks import build_network
    from rcm_core.run.teacher import load_teacher, save_teacher

    cfg = load_config(None, DIT_LABELS)
    assert teacher_key(cfg, "data-a") != KEY_BEFORE_ISSUE_32
    net = build_network(cfg.model)
    save_teacher(TrigFlowDenoiser(net), cfg, tmp_path / "t.pt")
    assert torch.equal(load_teacher(tmp_path / "t.pt", cfg, torch.device("cpu")).net.condition_embedder
                       .class_embedder.weight, net.condition_embedder.class_embedder.weight)
    stale = torch.load(tmp_path / "t.pt", weights_only=True)
    del stale["net"]["condition_embedder.class_embedder.weight"]        # what such a teacher held before
    torch.save(stale, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"t\.pt: a class-conditional DiT saved before .*issue 32.*retrain"):
        load_teacher(tmp_path / "t.pt", cfg, torch.device("cpu"))
