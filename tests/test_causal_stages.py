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
