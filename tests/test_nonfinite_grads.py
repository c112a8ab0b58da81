"""The step's guard against non-finite gradients (rcm_core.method.distill.zero_nonfinite_grads, the official
grad_clip callback's behaviour): NaN and ±Inf entries are zeroed and counted, everything else is left to the bit,
and a healthy step pays one host sync for the check, not one per gradient (issue 28); where the one-GPU masters
step reads the gradients in one pass (kernels.master_adamw) it zeroes and counts them itself, with no sync."""
from __future__ import annotations

import sys
from pathlib import Path

import math
import os

import pytest
import torch
from torch import nn

from rcm_core.method import distill
from rcm_core.method.adamw import AdamW
from rcm_core.method.distill import build_state, distill_step, zero_nonfinite_grads
from rcm_core.parallel.precision import with_master_weights
from rcm_core.run.loop import step_generator
from test_grad_accum import BATCH, _bf16, cfg_for
from test_parallel import sample_batch, tiny_denoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
import rcm_step  # its --host-reads counter: every host read, by source line


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(25)])      # 50 gradients
    net[0].to(torch.bfloat16)                                        # a bf16 trunk beside fp32 islands, as Wan
    for p in net.parameters():
        p.grad = torch.randn(p.shape).to(p.dtype)
    return net


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def test_finite_gradients_are_left_alone_after_one_host_sync():
    net = _net()
    before = _grads(net)
    with rcm_step._HostReads() as reads:
        assert zero_nonfinite_grads(net) == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))
    assert sum(reads.counts.values()) == 1, reads.counts                  # was 50: one per gradient


def test_nan_and_inf_entries_are_zeroed_and_counted():
    net = _net()
    w0, b7 = net[0].weight.grad, net[7].bias.grad                   # bf16 and fp32
    w0[2, 3], w0[5, 1], b7[4] = float("nan"), float("inf"), float("-inf")
    before = _grads(net)
    assert zero_nonfinite_grads(net) == 3
    for p, g in zip(net.parameters(), before):
        bad = ~torch.isfinite(g)
        assert torch.equal(p.grad[bad], torch.zeros_like(p.grad[bad]))
        assert torch.equal(p.grad[~bad], g[~bad])
    assert zero_nonfinite_grads(net) == 0


def test_finite_gradients_whose_norm_overflows_are_left_alone():
    """1e30 squared overflows fp32, so the cheap check suspects them; the exact pass then finds nothing."""
    net = _net()
    net[3].weight.grad.fill_(1e30)
    before = _grads(net)
    assert zero_nonfinite_grads(net) == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))


def test_parameters_without_gradients_are_skipped():
    net = _net()
    for p in list(net.parameters())[::2]:
        p.grad = None
    net[1].bias.grad[0] = float("nan")
    assert zero_nonfinite_grads(net) == 1
    assert zero_nonfinite_grads(nn.Linear(2, 2)) == 0                # no gradient at all


def test_an_iteration_reads_the_host_a_few_times_not_per_tensor():
    """experiments/bench/rcm_step.py --host-reads on the tiny DiT: every place an iteration makes the host wait
    (a scalar read, nonzero, a copy to the CPU), by source line. With AdamW fused (what a GPU run takes: its step
    counters stay tensors) no line reads once per parameter tensor (the old non-finite pass did, 69 here) and the
    check is the one read: the loss metrics stay on the device until the check has synced, then come back in one
    transfer (`losses.read_metrics`; before that, 7 reads in a student iteration, 3 in a critic one, mid-pass).
    That transfer is a copy to the CPU of a CUDA tensor, one counted read on a GPU; on the CPU it is no op, so
    this count is 1 where a GPU's is 2."""
    bench = rcm_step.Bench(rcm_step.TINY, torch.device("cpu"))
    for opt in (bench.state.opt_student, bench.state.opt_fake):
        for group in opt.param_groups:
            group["fused"] = True
    rows = rcm_step.host_reads(bench, "sdpa_grad", *rcm_step.TINY_SHAPE[1:])
    for name in ("student", "critic"):
        mine = [r for r in rows if r[0] == name]
        assert [(r[1].split(":")[0], r[-1]) for r in mine] == [("rcm_core/parallel/sharding.py", 1)], mine


def test_an_iteration_stepping_in_one_pass_reads_the_host_only_at_its_end(monkeypatch):
    """A bf16 network with fused AdamW (a one-GPU run: fp32 masters stepped in one pass, here the kernel's twin)
    needs no check before its step: nothing in the iteration reads the host but the one transfer of the metrics
    and the non-finite count after the step and the EMA (no op on the CPU, so no line at all here; a GPU counts 1
    at `losses.py`). With RCM_KERNELS_MASTER_ADAMW=off the check comes back as the one read."""
    for switch, want in (("on", []), ("off", [("rcm_core/parallel/sharding.py", 1)])):
        monkeypatch.setenv("RCM_KERNELS_MASTER_ADAMW", switch)
        bench = rcm_step.Bench({**rcm_step.TINY, "dtype": "bfloat16"}, torch.device("cpu"))
        for opt in (bench.state.opt_student, bench.state.opt_fake):
            for group in opt.param_groups:
                group["fused"] = True
        assert bench.state.opt_student.counts_nonfinite() == (switch == "on")
        rows = rcm_step.host_reads(bench, "sdpa_grad", *rcm_step.TINY_SHAPE[1:])
        for name in ("student", "critic"):
            mine = [r for r in rows if r[0] == name]
            assert [(r[1].split(":")[0], r[-1]) for r in mine] == want, (switch, mine)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["kernel", "twin"])
def test_the_one_pass_step_zeroes_and_counts_as_the_check_does(monkeypatch, interpret):
    """The masters' step given a counter (`MasterWeightOptimizer.step(nonfinite=…)`), against the check and then
    the casting step, on the same poisoned gradients: NaN, +Inf and −Inf in the bf16 trunk (read by the one pass)
    and one in an fp32 island (left to the casts' side): the same count, on the device; the fp32 island stepped
    to the bit and its gradient zeroed; the bf16 masters within 8 fp32 ulps of each tensor's magnitude (the
    kernel's bar against PyTorch's fused step, tests/test_master_adamw.py), every entry finite."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    nets = [_net(), _net()]
    for net in nets:
        w0, b7 = net[0].weight.grad, net[7].bias.grad
        w0[2, 3], w0[5, 1], w0[7, 7], b7[4] = float("nan"), float("inf"), float("-inf"), float("nan")
    build = lambda params: AdamW(params, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.1, fused=True)
    one_pass, casts = with_master_weights(nets[0].parameters(), build), with_master_weights(nets[1].parameters(), build)
    assert one_pass.counts_nonfinite()
    counter = torch.zeros((), dtype=torch.int64)
    with rcm_step._HostReads() as reads:
        one_pass.step(nonfinite=counter)
    assert sum(reads.counts.values()) == 0, reads.counts
    monkeypatch.setenv("RCM_KERNELS_MASTER_ADAMW", "off")
    assert zero_nonfinite_grads(nets[1]) == int(counter) == 4
    casts.step()
    assert torch.equal(nets[0][7].bias.grad, nets[1][7].bias.grad) and nets[0][7].bias.grad[4] == 0
    assert all(torch.isfinite(m).all() for m in one_pass.masters)
    assert all(torch.equal(a, b) for a, b in zip(one_pass.masters[2:], casts.masters[2:]))      # fp32 islands
    for got, want in zip(one_pass.masters[:2], casts.masters[:2]):                               # the bf16 trunk
        assert ((got - want).abs() <= 8 * _ulp(want.abs().max())).all(), (got - want).abs().max()


def _poisoned_state(monkeypatch, switch: str):
    """A bf16 rCM state with fused AdamW, as a one-GPU run builds it (forced here: the CPU's default is not fused),
    whose student gradients get a NaN in a bf16 weight and an Inf in an fp32 one in every backward."""
    monkeypatch.setenv("RCM_KERNELS_MASTER_ADAMW", switch)
    monkeypatch.setattr(distill, "adamw_kernel", lambda params: {"fused": True})
    cfg = cfg_for("rcm", 0, tangent_warmup=0)
    cfg.model.dtype = "bfloat16"
    state = build_state(cfg, _bf16(tiny_denoiser(1)))
    params = list(state.student.parameters())
    narrow = next(p for p in params if p.dtype == torch.bfloat16 and p.dim() == 2)
    wide = next(p for p in params if p.dtype == torch.float32)
    for p, value in ((narrow, float("nan")), (wide, float("inf"))):
        p.register_hook(lambda g, value=value: g.flatten().index_fill(0, torch.tensor([1]), value).view_as(g))
    return cfg, state


def test_a_poisoned_rcm_iteration_counts_the_same_on_either_path(monkeypatch):
    """Two iterations (student, critic) of bf16 rCM with a NaN and an Inf put into the student's gradients by
    hooks: stepping in one pass (the kernel under the interpreter, the count read at the iteration's end) reports
    the 2 entries the check-then-cast path reports, the critic 0 on both, and the students agree (masters within
    8 fp32 ulps of each tensor's magnitude, all finite)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    runs = {}
    for switch in ("on", "off"):
        cfg, state = _poisoned_state(monkeypatch, switch)
        assert state.opt_student.counts_nonfinite() == (switch == "on")
        counts = [distill_step(state, sample_batch(it, batch=BATCH), cfg,
                               step_generator(0, 0, it, torch.device("cpu")))["nonfinite_grads"] for it in range(2)]
        runs[switch] = counts, state
    assert runs["on"][0] == runs["off"][0] == [2.0, 0.0], (runs["on"][0], runs["off"][0])
    for got, want in zip(runs["on"][1].opt_student.masters, runs["off"][1].opt_student.masters):
        assert torch.isfinite(got).all()
        assert ((got - want).abs() <= 8 * _ulp(want.abs().max())).all(), (got - want).abs().max()


def test_the_step_ab_bench_times_both_paths_on_one_state_and_restores_the_switch(monkeypatch):
    """`rcm_step.py --step-ab` on a bf16 tiny DiT with fused AdamW: the "on" arm's iterations step through the
    one-pass kernel (twin here) and the "off" arm's never do; each pass has a time per arm, and the switch is
    left as it was (unset)."""
    import kernels.master_adamw as kernel
    monkeypatch.delenv("RCM_KERNELS_MASTER_ADAMW", raising=False)
    bench = rcm_step.Bench({**rcm_step.TINY, "dtype": "bfloat16"}, torch.device("cpu"))
    for opt in (bench.state.opt_student, bench.state.opt_fake):
        for group in opt.param_groups:
            group["fused"] = True
    seen, step = [], kernel.master_adamw
    monkeypatch.setattr(kernel, "master_adamw",
                        lambda *a, **k: (seen.append(os.environ["RCM_KERNELS_MASTER_ADAMW"]), step(*a, **k))[1])
    ab = rcm_step.step_switch_ab(bench, "sdpa_grad", *rcm_step.TINY_SHAPE[1:], reps=1)
    # student and critic: a warm-up and a timed call each, one kernel call per step
    assert ab["one_pass"] and set(seen) == {"on"} and len(seen) == 4
    for name in ("student", "critic", "mean_1_4"):
        assert set(ab[name]) == {"on", "off"} and all(ms > 0 for ms in ab[name].values()), ab
    assert "RCM_KERNELS_MASTER_ADAMW" not in os.environ
