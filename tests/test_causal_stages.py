"""experiments/bench/causal_results.py: a stage longer than one GPU call is cut at a checkpoint and resumed with
--resume; the finished stage must equal the uncut one (issue 30: stages of thousands of iterations span calls).

    .venv/bin/python -m pytest tests/test_causal_stages.py -q        (~20 s on a 2-core CPU)
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rcm_core.run.loop as loop
from rcm_core.config import load_config
from rcm_core.data.latents import LatentDataset
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.networks import build_network


def _causal_results():
    sys.path.insert(0, str(REPO / "experiments" / "bench"))
    spec = importlib.util.spec_from_file_location("causal_results", REPO / "experiments/bench/causal_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class Cut(Exception):
    """The device call's time limit, arriving right after a checkpoint."""


def test_a_stage_cut_at_a_checkpoint_resumes_to_the_uncut_result(tmp_path, monkeypatch, random_items):
    cr = _causal_results()
    fr = cr.fr
    cfg = load_config(fr.DEFAULT_CONFIG, [*fr.TINY_OVERRIDES, "train.device=cpu"])
    fr.prepare_data(cfg, str(tmp_path / "data"))
    batches = fr.DeviceBatches(LatentDataset(str(tmp_path / "data")), torch.device("cpu"))
    torch.manual_seed(0)
    teacher = TrigFlowDenoiser(build_network(cfg.model), cfg.teacher.parametrization).requires_grad_(False).eval()

    def score(state, step):        # a curve point that depends on the EMA's weights, so a wrong resume shows
        return {"eval/nfe_2/fd_feat": float(sum(p.double().sum() for p in state.ema.module.parameters()))}

    def stage(out, resume):
        scfg = cr.stage_cfg(cfg, "rCM", out)
        scfg.train.steps = 20                          # checkpoints at 2, 4, …; curve points at 5, 10, 15, 20
        return cr.train_stage("rCM", scfg, teacher, batches, torch.device("cpu"), out, seconds=0, probe_iters=1,
                              resume=resume, evaluator=score, curve=4)

    whole, done = stage(tmp_path / "whole", resume=False)

    real_save = loop.save_checkpoint

    def save_then_cut(state_dict, directory):
        real_save(state_dict, directory)
        if Path(directory).name == "step_12":
            raise Cut
    monkeypatch.setattr(loop, "save_checkpoint", save_then_cut)
    with pytest.raises(Cut):
        stage(tmp_path / "cut", resume=False)
    plan = json.loads((tmp_path / "cut" / "runs" / "rCM" / "plan.json").read_text())
    assert plan["iterations"] == 20 and [p["iteration"] for p in plan["points"]] == [5, 10]
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    ran, real_step = [], loop.distill_step

    def counted(state, *a, **kw):
        ran.append(state.iteration)
        return real_step(state, *a, **kw)
    monkeypatch.setattr(loop, "distill_step", counted)
    resumed, done2 = stage(tmp_path / "cut", resume=True)
    assert ran == list(range(12, 20))                 # only the iterations after the last checkpoint ran again

    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    curve = lambda root: json.loads((root / "runs" / "rCM" / "curve.json").read_text())  # noqa: E731
    assert curve(tmp_path / "cut") == curve(tmp_path / "whole") and len(curve(tmp_path / "whole")) == 4
    assert done2["iterations"] == done["iterations"] == 20
    left = sorted(p.name for p in (tmp_path / "cut" / "runs" / "rCM").iterdir())
    assert "plan.json" not in left and "checkpoints" not in left and {"ema.pt", "stage.json"} <= set(left)


def test_first_chunk_schedule_and_the_per_frame_table():
    """The "4+2" row streams its first chunk exactly as the 4-step stream does (same noise, same re-noising draws)
    and its later chunks with 2 steps; the per-frame table scores each latent frame, and a set equal to the
    teacher's reads as the teacher (accuracy row equal, RMS 1)."""
    cr = _causal_results()
    fr = cr.fr
    cfg = load_config(fr.DEFAULT_CONFIG, [*fr.TINY_OVERRIDES, "train.device=cpu", *cr.CAUSAL])
    torch.manual_seed(0)
    student = TrigFlowDenoiser(build_network(cfg.model), cfg.teacher.parametrization).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 16, 4, 4, 4, generator=g)                # the tiny latent [C, T, H, W]: 4 one-frame chunks
    c = torch.arange(4) % 10
    four = cr.stream_fn(student, 4, cfg, seed=5)(z, c)
    two = cr.stream_fn(student, 2, cfg, seed=5)(z, c)
    mixed = cr.stream_fn(student, cr.FIRST_CHUNK_STEPS, cfg, seed=5, later_steps=2)(z, c)
    assert torch.equal(mixed[:, :, :1], four[:, :, :1])          # the first chunk: one latent frame, 4 steps
    assert not torch.equal(mixed[:, :, 1:], four[:, :, 1:]) and not torch.equal(mixed, two)

    class FrameNet(torch.nn.Module):     # frame logits = the mean of each frame's first 10 channels
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def extract(self, x):
            from types import SimpleNamespace
            return SimpleNamespace(frame_logits=x[:, :10].mean(dim=(3, 4)).transpose(1, 2))
    labels = torch.arange(4) % 10
    table = cr.per_frame_table({"same": four.clone(), "half": four * 0.5}, four, labels, FrameNet())
    acc, rms = table.split("\n\n")
    rows = {line[:24].strip(): line[24:].split() for line in acc.splitlines()[2:]}
    assert rows["same"] == rows["teacher (bidirectional)"] and len(rows["same"]) == z.shape[2]
    rms_rows = {line[:24].strip(): [float(v) for v in line[24:].split()] for line in rms.splitlines()[2:]}
    assert rms_rows["same"] == [1.0] * z.shape[2] and rms_rows["half"] == [0.5] * z.shape[2]


def test_resume_scores_with_the_saved_classifier(tmp_path, monkeypatch):
    """--resume loads <out>/feature_net.pt instead of training another (the curve points recorded before a cut
    were scored in its feature space; on 2026-12-04 a resumed GPU run retrained it); without --resume, or with
    no saved net, it trains; --classifier wins over both."""
    from argparse import Namespace
    cr = _causal_results()
    g = torch.Generator().manual_seed(7)
    latents, labels = torch.randn(32, 16, 4, 4, 4, generator=g), torch.arange(32) % 4
    args = Namespace(classifier="", resume=False, classifier_steps=2)
    pick = lambda out, **change: cr.feature_classifier(Namespace(**{**vars(args), **change}), out, latents, labels,
                                                       torch.device("cpu"))
    first = pick(tmp_path)
    assert (tmp_path / "feature_net.pt").is_file()

    def no_training(*a, **k):
        raise AssertionError("trained a classifier where a saved one should have been loaded")
    monkeypatch.setattr(cr, "train_feature_classifier", no_training)
    resumed = pick(tmp_path, resume=True)
    assert resumed.content_hash() == first.content_hash()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(AssertionError, match="trained a classifier"):   # nothing saved there: it must train
        pick(other, resume=True)
    given = pick(other, classifier=str(tmp_path / "feature_net.pt"))
    assert given.content_hash() == first.content_hash() and (other / "feature_net.pt").is_file()
