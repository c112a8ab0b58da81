"""AdamW's implementation (rcm_core.method.distill.adamw_kernel): fused where every parameter is on a GPU, PyTorch's
default elsewhere, and a resumed run takes this run's choice, not the one its checkpoint was written with."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from rcm_core.config import from_dict
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import adamw_kernel, build_state, reapply_adamw_kernel
from rcm_core.networks import build_network
from rcm_core.parallel.precision import with_master_weights
from rcm_core.run.checkpoint import save_checkpoint, state_to_dict
from rcm_core.run.loop import _resume

CUDA = torch.device("cuda")


def _state(device: str = "cpu"):
    # lr 1e-3: steps far above fp32 rounding of the masters, so a wrong step count (bias correction) would show
    cfg = from_dict({"model": {"kind": "mlp", "in_channels": 2, "hidden": 16, "depth": 2, "freq_dim": 8,
                               "dtype": "bfloat16"}, "optim": {"lr": 1e-3, "fake_lr": 1e-3}})
    torch.manual_seed(0)
    return build_state(cfg, TrigFlowDenoiser(build_network(cfg.model)).to(device))


def _steps(state, seeds: range) -> None:
    """Optimiser steps of student and fake score on fixed gradients (what a distillation step ends with)."""
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for net, opt in ((state.student, state.opt_student), (state.fake, state.opt_fake)):
            for p in net.parameters():
                p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device, p.dtype)
            opt.step()


def _flags(opt) -> set:
    return {(group["fused"], group["foreach"]) for group in opt.param_groups}


def test_adamw_runs_fused_only_where_every_parameter_is_on_a_gpu():
    on_gpu, on_cpu = SimpleNamespace(device=CUDA), torch.zeros(1)
    assert adamw_kernel([on_gpu, on_gpu]) == {"fused": True}
    assert adamw_kernel([on_gpu, on_cpu]) == {}
    assert adamw_kernel([on_cpu]) == {}
    assert adamw_kernel([]) == {}
    state = _state()                                           # CPU: PyTorch's default, as before
    assert _flags(state.opt_student) == _flags(state.opt_fake) == {(None, None)}


def test_resume_takes_this_runs_adamw_kernel_not_the_checkpoints(tmp_path):
    """A checkpoint written by a fused AdamW (a GPU run; fused runs on the CPU too) resumes here with PyTorch's
    CPU default, through the training loop's own resume, and keeps stepping."""
    state = _state()
    for opt in (state.opt_student, state.opt_fake):
        for group in opt.param_groups:
            group["fused"] = True
    _steps(state, range(3))
    save_checkpoint(state_to_dict(state), tmp_path / "step_3")
    resumed = _state()
    _resume(resumed, tmp_path / "step_3", None, torch.device("cpu"))
    for opt in (resumed.opt_student, resumed.opt_fake):
        assert _flags(opt) == {(None, None)}
        steps = [s["step"] for s in opt.state.values()]
        assert steps and all(s.device.type == "cpu" and float(s) == 3.0 for s in steps)
    _steps(resumed, range(3, 5))
    assert all(float(s["step"]) == 5.0 for s in resumed.opt_student.state.values())


def test_reapply_moves_step_counters_where_the_implementation_keeps_them():
    """The rule applied to a group: on the CPU the counters stay plain CPU scalars and the flags are cleared."""
    net = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    reapply_adamw_kernel(opt)
    assert _flags(opt) == {(None, None)}
    assert all(s["step"].device.type == "cpu" and s["step"].dtype == torch.float32 for s in opt.state.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_is_fused_and_resumes_a_foreach_checkpoint_fused(tmp_path):
    """On a GPU both optimisers are fused; a checkpoint written before (foreach, CPU step counters) resumes fused,
    its counters moved beside the parameters as fp32, and the masters follow the run that never stopped (foreach
    all along) within fp32 rounding: the two kernels order the same arithmetic differently."""
    state = _state("cuda")
    assert _flags(state.opt_student) == _flags(state.opt_fake) == {(True, None)}
    for opt in (state.opt_student, state.opt_fake):
        for group in opt.param_groups:
            group["fused"], group["foreach"] = None, True
    _steps(state, range(3))
    save_checkpoint(state_to_dict(state), tmp_path / "step_3")
    at_3 = [m.detach().clone() for m in state.opt_student.master_parameters()]
    _steps(state, range(3, 6))
    resumed = _state("cuda")
    _resume(resumed, tmp_path / "step_3", None, CUDA)
    for opt in (resumed.opt_student, resumed.opt_fake):
        assert _flags(opt) == {(True, None)}
        assert all(s["step"].device.type == "cuda" and s["step"].dtype == torch.float32 for s in opt.state.values())
    _steps(resumed, range(3, 6))
    # The three resumed steps against the uninterrupted ones: ~3e-3 per weight, rounding ~1e-7; a step count off
    # by one or reset changes AdamW's bias correction and these by 10-50 %.
    for a, b, m in zip(resumed.opt_student.master_parameters(), state.opt_student.master_parameters(), at_3):
        torch.testing.assert_close(a - m, b - m, rtol=1e-3, atol=1e-6)


def test_fused_and_default_adamw_agree_on_the_masters_within_fp32_rounding():
    """rCM's AdamW (β₁ = 0, weight decay) on fp32 masters of a bf16 network, fused against PyTorch's default, on the
    same gradients for 10 steps. The largest difference relative to the largest master, over seeds 0–39: 8.1e-8,
    under one fp32 ulp at 1 (1.19e-7); the bar is two such ulps."""
    worst = 0.0
    for seed in range(3):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
        arms = [with_master_weights(net.parameters(), lambda ps, f=flags: torch.optim.AdamW(
            ps, lr=2e-6 * 100, betas=(0.0, 0.999), weight_decay=0.01, eps=1e-8, **f)) for flags in ({}, {"fused": True})]
        g = torch.Generator().manual_seed(seed)
        for _ in range(10):
            grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in net.parameters()]
            for opt in arms:
                for p, grad in zip(net.parameters(), grads):
                    p.grad = grad
                opt.step()
        for a, b in zip(*(opt.master_parameters() for opt in arms)):
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    assert worst <= 2.4e-7, worst


def test_adamw_ab_bench_steps_copies_and_compares_the_three_kernels(monkeypatch):
    """experiments/bench/rcm_step.py --adamw-ab on bf16 parameters (the GPU run's setting; the one-pass kernel
    under Triton's interpreter): each arm steps its own copy, so the network is untouched, and each kernel's
    masters agree with foreach's within the rounding bar above (here, at rCM's lr, seeds 0–39 differed by at
    most 1.1e-11)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
    from rcm_step import adamw_ab

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    before = [p.detach().clone() for p in net.parameters()]
    ab = adamw_ab(list(net.parameters()), torch.device("cpu"), reps=3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert all(p.grad is None for p in net.parameters())
    assert ab["params"] == sum(p.numel() for p in before) and ab["product"] == "PyTorch's default"
    assert ab["foreach_ms"] > 0 and ab["fused_ms"] > 0 and ab["one_pass_ms"] > 0
    assert ab["fused_max_rel_diff"] <= 2.4e-7 and ab["one_pass_max_rel_diff"] <= 2.4e-7, ab


def _pair(impl: dict, betas=(0.0, 0.999), device: str = "cpu", seed: int = 0):
    """The same parameters twice: one for torch.optim.AdamW, one for rcm_core.method.adamw.AdamW."""
    from rcm_core.method.adamw import AdamW
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (11,), (3, 4, 2)]
    ps = [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in shapes]
    qs = [p.detach().clone().requires_grad_(True) for p in ps]
    kw = dict(lr=1e-2, betas=betas, weight_decay=0.1, eps=1e-8, **impl)
    return ps, torch.optim.AdamW(ps, **kw), qs, AdamW(qs, **kw)


def _step_both(ps, a, qs, b, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g).to(p.device) for p in ps]
    for p, q, grad in zip(ps, qs, grads):
        p.grad, q.grad = grad.clone(), grad.clone()
    a.step()
    b.step()
    return grads


IMPLS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


@pytest.mark.parametrize("impl", IMPLS, ids=["single-tensor", "foreach", "fused"])
def test_adamw_without_a_first_moment_steps_bit_for_bit_as_adamw(impl):
    """β₁ = 0 (rCM): AdamW's first moment is the gradient, so `rcm_core.method.adamw.AdamW` hands the gradient in as
    m and keeps none between steps. Against torch.optim.AdamW, five steps on the CPU in each implementation: the
    parameters equal to the bit, the gradients untouched by the step (the kernel writes g over g), and the state
    holds `step` and `exp_avg_sq` only (4 B per parameter instead of 8)."""
    ps, a, qs, b = _pair(impl)
    for seed in range(5):
        grads = _step_both(ps, a, qs, b, seed)
        assert all(torch.equal(q.grad, g) for q, g in zip(qs, grads))
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert all(set(b.state[q]) == {"step", "exp_avg_sq"} for q in qs)
    assert all("exp_avg" in a.state[p] for p in ps)


def test_adamw_keeps_its_first_moment_where_beta1_is_not_zero():
    ps, a, qs, b = _pair({"foreach": True}, betas=(0.9, 0.999))
    for seed in range(3):
        _step_both(ps, a, qs, b, seed)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert all(torch.equal(a.state[p]["exp_avg"], b.state[q]["exp_avg"]) for p, q in zip(ps, qs))


@pytest.mark.parametrize("impl", IMPLS, ids=["single-tensor", "foreach", "fused"])
def test_adamw_without_a_first_moment_loads_adamws_state_and_goes_on_the_same(impl):
    """A state dict of torch.optim.AdamW (with `exp_avg`, e.g. an older checkpoint) loads: the first moments are
    dropped at once, and the steps after it equal those of the optimiser it came from, to the bit; its own state
    dict (no `exp_avg`) loads into a fresh one the same way."""
    from rcm_core.method.adamw import AdamW
    ps, a, qs, b = _pair(impl)
    for seed in range(2):
        _step_both(ps, a, qs, b, seed)
    for source in (a, b):
        rs = [p.detach().clone().requires_grad_(True) for p in (ps if source is a else qs)]
        c = AdamW(rs, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.1, eps=1e-8, **impl)
        c.load_state_dict(copy.deepcopy(source.state_dict()))      # load_state_dict shares tensors it can
        assert all(set(c.state[r]) == {"step", "exp_avg_sq"} for r in rs)
        g = torch.Generator().manual_seed(7)
        grads = [torch.randn(r.shape, generator=g) for r in rs]
        for r, grad in zip(rs, grads):
            r.grad = grad.clone()
        c.step()
        ref = [p.detach().clone().requires_grad_(True) for p in (ps if source is a else qs)]
        d = torch.optim.AdamW(ref, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.1, eps=1e-8, **impl)
        d.load_state_dict(copy.deepcopy(a.state_dict()))
        for r, grad in zip(ref, grads):
            r.grad = grad.clone()
        d.step()
        assert all(torch.equal(x, y) for x, y in zip(rs, ref))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_without_a_first_moment_is_fused_adamw_to_the_bit_on_cuda():
    """The GPU's path (fused, `adamw_kernel`): five steps equal torch.optim.AdamW's fused kernel to the bit with the
    gradient handed in as the first moment, and the gradients come out of the step unchanged."""
    ps, a, qs, b = _pair({"fused": True}, device="cuda")
    for seed in range(5):
        grads = _step_both(ps, a, qs, b, seed)
        assert all(torch.equal(q.grad, g) for q, g in zip(qs, grads))
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    assert all(set(b.state[q]) == {"step", "exp_avg_sq"} for q in qs)


@pytest.mark.parametrize("impl", IMPLS, ids=["single-tensor", "foreach", "fused"])
def test_adamw_without_a_first_moment_makes_none_at_the_first_step(impl):
    """A network's first step: torch.optim.AdamW makes two zero buffers per parameter (m and v); this one makes v
    alone (its m is the gradient), so the first step's peak holds no first moments either (measured on an H100:
    5.3 GiB at Wan2.1-1.3B when they were made and dropped). Counted as the parameter-shaped tensors each step
    allocates, the step counters aside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.count = shapes, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            made = name in ("empty_like", "zeros_like", "empty", "zeros", "new_zeros", "new_empty")
            if made and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
                self.count += 1
            return out

    ps, a, qs, b = _pair(impl)
    shapes = {tuple(p.shape) for p in ps}
    counts = []
    for opt, params in ((a, ps), (b, qs)):
        for p in params:
            p.grad = torch.ones_like(p)
        with Allocations(shapes) as mode:
            opt.step()
        counts.append(mode.count)
    assert counts == [2 * len(ps), len(qs)], counts
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
