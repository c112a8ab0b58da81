"""The step's guard against non-finite gradients (rcm_core.method.distill.zero_nonfinite_grads, the official
grad_clip callback's behaviour): NaN and ±Inf entries are zeroed and counted, everything else is left to the bit,
and a healthy step pays one host sync for the check, not one per gradient (issue 28)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from rcm_core.method.distill import zero_nonfinite_grads

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
