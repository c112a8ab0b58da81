"""The teacher cache cannot go stale (issues 18, 27): its key changes with everything that shapes the teacher.

`rcm_core.run.teacher.teacher_key` hashes model.* (time_scale included), the whole teacher.* training config,
data.normalize, the seed, the data's content and a fingerprint of the training code's syntax trees; `workflows.driver.teacher_data_key` names a data set by its
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
# for data "data-a" (computed at commit 0da3cd4, when a hand-bumped schema number stood in for the code).
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


def _key_in(tree) -> str:
    """teacher_key of the TINY config as a fresh process computes it from the rcm_core package under `tree`."""
    import subprocess
    import sys

    code = ("from rcm_core.config import load_config; from rcm_core.run.teacher import teacher_key; "
            f"print(teacher_key(load_config(None, {TINY!r}), 'data-a'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_editing_the_code_that_shapes_the_teacher_changes_its_key(tmp_path):
    """A copy of rcm_core with one line added to the EMA's module gives another cache key (so another cached
    teacher file); the same edit as a comment (or a docstring) changes nothing. No hand-bumped number to forget."""
    from pathlib import Path

    from rcm_core.run.teacher import code_fingerprint, teacher_code_sources

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "rcm_core", tmp_path / "rcm_core", ignore=shutil.ignore_patterns("__pycache__"))
    ema = tmp_path / "rcm_core" / "method" / "ema.py"
    text = ema.read_text()
    ema.write_text(text + "\n\n_EDITED = 1.0\n")
    assert _key_in(tmp_path) != teacher_key(load_config(None, TINY), "data-a")
    ema.write_text(text + "\n\n# a comment changes no teacher\n")
    assert _key_in(tmp_path) == teacher_key(load_config(None, TINY), "data-a")

    sources = teacher_code_sources()
    cfg = load_config(None, TINY)
    edited = {**sources, "rcm_core.method.losses:flow_matching_loss":
              sources["rcm_core.method.losses:flow_matching_loss"].replace(".mean()", ".sum()")}
    assert edited != sources and code_fingerprint(edited) != code_fingerprint(sources)
    assert teacher_key(cfg, "d", code=code_fingerprint(edited)) != teacher_key(cfg, "d")
    redocumented = {k: v.replace('"""', '"""Reworded. ', 1) for k, v in sources.items()}
    assert code_fingerprint(redocumented) == code_fingerprint(sources)


def test_the_fingerprint_covers_the_code_a_teacher_runs():
    """Every rcm_core function that training a teacher (MLP and DiT) calls lies in the fingerprinted code; a new
    helper elsewhere fails here until TEACHER_MODULES / TEACHER_FUNCTIONS name it. The data stream (rcm_core.data)
    is keyed by its content instead, and dataclass-generated __init__s by their class's source."""
    import sys

    import torch

    import rcm_core.method.distill  # noqa: F401  (imported before tracing: its import-time code is not training)
    from rcm_core.data.latents import LatentBatch
    from rcm_core.run.teacher import TEACHER_FUNCTIONS, TEACHER_MODULES, train_teacher

    called = set()

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("rcm_core.") and not module.startswith("rcm_core.data."):
            called.add((module, frame.f_code.co_qualname))

    gen = torch.Generator().manual_seed(0)

    def batches(shape, labels):
        while True:
            yield LatentBatch(latent=torch.randn(shape, generator=gen), label=labels)

    runs = [(TINY, (16, 2, 1, 1, 1), torch.arange(16) % 4),
            (["model.kind=dit", "model.in_channels=4", "model.dim=32", "model.ffn_dim=64", "model.num_heads=2",
              "model.num_layers=1", "model.text_dim=16", "model.num_classes=3", "model.label_tokens=2",
              "teacher.train_steps=1", "teacher.train_batch_size=2"], (2, 4, 1, 4, 4), torch.tensor([0, 2]))]
    for overrides, shape, labels in runs:
        cfg = load_config(None, overrides)                 # the config's values are in the key themselves
        sys.setprofile(profile)
        try:
            train_teacher(cfg, batches(shape, labels), device=torch.device("cpu"))
        finally:
            sys.setprofile(None)
    functions = {tuple(f.split(":")) for f in TEACHER_FUNCTIONS}
    outside = {(m, q) for m, q in called if m not in TEACHER_MODULES and (m, q.split(".")[0]) not in functions
               and not q.startswith("__create_fn__")}
    assert ("rcm_core.method.losses", "flow_matching_loss") in called and not outside, sorted(outside)
