"""What an unsharded checkpoint leaves out, and that a run resumed from it is bit-for-bit the run that never stopped.

    .venv/bin/python -m pytest tests/test_checkpoint_slim.py -q      # ~15 s

A bf16 network trained with fp32 masters needs no copy of its bf16 weights in the file (they are bf16(master)),
and AdamW with β₁ = 0 needs no first moment (each step overwrites it with the gradient before reading it). Both are
left out (rcm_core.run.checkpoint); the proof that nothing was lost is exact equality, not a tolerance: the same
seeds, batches and arithmetic give the same bits, so any state a resume failed to restore shows as a difference.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_parallel import LATENT, TINY, sample_batch, tiny_denoiser

from rcm_core.config import from_dict
from rcm_core.run.checkpoint import CKPT_FILE, load_checkpoint
from rcm_core.run.loop import run_training

STEPS = 6
BF16 = {**TINY, "dtype": "bfloat16"}


def _cfg(run_dir: Path, steps: int, beta1: float = 0.0, device: str = "cpu"):
    return from_dict({"model": BF16, "teacher": {"guidance": 3.0},
                      "distill": {"mode": "rcm", "tangent_warmup": 1, "student_update_freq": 2,
                                  "max_rollout_steps": 2},
                      "optim": {"lr": 1e-3, "fake_lr": 1e-3, "lr_warmup": 0, "betas": [beta1, 0.999]},
                      "train": {"steps": steps, "checkpoint_every": 3, "log_every": 1, "run_dir": str(run_dir),
                                "device": device}})


def _batches(start: int):
    return (sample_batch(it) for it in range(start, 10 ** 6))


def _teacher():
    t = tiny_denoiser(1)
    return t.to(torch.bfloat16)


def _train(run_dir: Path, steps: int, resume=None, beta1: float = 0.0, device: str = "cpu"):
    return run_training(_cfg(run_dir, steps, beta1, device), _batches, lambda *a: None, resume, teacher=_teacher(),
                        latent_shape=LATENT)


def _everything(state) -> dict[str, torch.Tensor]:
    """Every number a later step reads: module weights, fp32 masters, AdamW moments, EMA."""
    out = {}
    for name, mod, opt in (("student", state.student, state.opt_student), ("fake", state.fake, state.opt_fake)):
        out.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
        out.update({f"{name}.master{i}": m for i, m in enumerate(opt.masters)})
        for i, s in opt.inner.state.items():
            out.update({f"{name}.adam{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    out.update({f"ema.{k}": v for k, v in state.ema.module.state_dict().items()})
    return out


def test_resumed_bf16_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    whole = _everything(_train(tmp_path / "whole", STEPS))
    _train(tmp_path / "cut", 3)                            # writes step_3 and stops
    resumed = _everything(_train(tmp_path / "cut", STEPS, resume="latest"))
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ after resuming, e.g. {differ[:4]}"
    teacher = _teacher().state_dict()                       # not vacuous: six steps moved the student
    assert any(not torch.equal(whole[f"student.{k}"], v) for k, v in teacher.items())


def test_the_file_holds_masters_and_second_moments_only(tmp_path):
    state = _train(tmp_path / "run", 3)
    data = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_3")
    narrow = {k for k, v in state.student.named_parameters() if v.dtype == torch.bfloat16}
    assert narrow and not narrow & set(data["student"]), "bf16 working copies were written"
    assert set(data["student"]) == set(state.student.state_dict()) - narrow     # fp32 tables, buffers stay
    for key in ("opt_student", "opt_fake"):
        moments = data[key]["inner"]["state"]
        assert moments and all("exp_avg_sq" in s and "exp_avg" not in s for s in moments.values())
        assert len(data[key]["masters"]) == len(narrow)
    # what that saves: 2 bytes per bf16 weight per network and 4 per AdamW parameter, measured on the file
    params = sum(p.numel() for p in state.student.parameters())
    per_param = (tmp_path / "run" / "checkpoints" / "step_3" / CKPT_FILE).stat().st_size / params
    # measured 21.0 here (20 + this tiny DiT's buffers and pickling); the old file was ~33
    assert per_param < 21.5, f"{per_param:.1f} bytes per parameter (masters 4 + v 4 per network, EMA 4: ~20)"


def test_beta1_above_zero_keeps_the_first_moment(tmp_path):
    """Only β₁ = 0 makes the first moment redundant; any other β₁ keeps it in the file and resumes exactly."""
    whole = _everything(_train(tmp_path / "whole", 4, beta1=0.9))
    _train(tmp_path / "cut", 3, beta1=0.9)
    data = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_3")
    assert all("exp_avg" in s for s in data["opt_student"]["inner"]["state"].values())
    resumed = _everything(_train(tmp_path / "cut", 4, resume="latest", beta1=0.9))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.gpu
def test_a_checkpoint_resumes_on_a_gpu(tmp_path):
    """Resuming maps the whole file to the GPU, the CPU generator's state included; set_rng_state refused that
    copy (the front door's resumed job on an H200 died there). The loaded state is the saved one to the bit, and
    the resumed run steps on."""
    saved = _everything(_train(tmp_path / "run", 3, device="cuda"))
    loaded = _everything(_train(tmp_path / "run", 3, resume="latest", device="cuda"))
    assert all(torch.equal(saved[k], loaded[k]) for k in saved if ".adam" not in k or "exp_avg_sq" in k)
    assert _train(tmp_path / "run", 4, resume="latest", device="cuda").iteration == 4
