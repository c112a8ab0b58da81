"""The teacher's JVP-vs-central-difference time-derivative check (rcm_core.method.tangent_check, issue 18), and the time
input k·s it guards (model.time_scale).

A smooth teacher (the analytic mixture) scores ratio ≈ 1; the same teacher with a small fast ripple in its time
input, which moves F by less than 1e-2 but dominates ∂F/∂t, is flagged loudly.
"""
import math

import pytest
import torch
from torch import nn

from rcm_core.config import load_config
from rcm_core.method.denoiser import RF_TIMESTEP_SCALE, TrigFlowDenoiser
from rcm_core.networks import build_network
from rcm_core.method.tangent_check import RATIO_WARN, check_rows, time_derivative_check, warn_if_rough
from rcm_core.data.toy import ExactGMMVelocity, default_gmm

GMM = default_gmm(dim=2, classes=4)


class Rippled(nn.Module):
    """v + a·sin(ω·timestep): the failure in miniature (ripples in t of a network fed 1000·s)."""

    def __init__(self, net: nn.Module, amplitude: float, omega: float):
        super().__init__()
        self.net, self.amplitude, self.omega = net, amplitude, omega

    def forward(self, x, timestep, cond):
        ripple = self.amplitude * torch.sin(self.omega * timestep.double())
        return self.net(x, timestep, cond) + ripple.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)

    def null_cond(self, batch_size, device):
        return self.net.null_cond(batch_size, device)


def _check(net):
    x0, labels = GMM.sample(check_rows(2), torch.Generator().manual_seed(0))
    return time_derivative_check(TrigFlowDenoiser(net), x0.double(), labels, generator=torch.Generator().manual_seed(0))


def test_smooth_teacher_passes():
    check = _check(ExactGMMVelocity(GMM))
    assert check.ok and max(abs(r - 1) for r in check.ratio) < 0.05, check.table()
    assert check.metrics()["teacher_check/ok"] == 1.0 and "smooth" in check.report()
    assert check.metrics() == _check(ExactGMMVelocity(GMM)).metrics()        # seeded: the same numbers every run


def test_rippled_teacher_is_flagged_loudly():
    # a = 1e-2, ω = 1 per unit of 1000·s: F moves by ≤ 1e-2 (the modes sit at radius 1.2, std 0.08), while
    # ∂F/∂t gains up to a·ω·1000·ds/dt ≈ 10: the tangent sCM would train on is mostly ripple
    check = _check(Rippled(ExactGMMVelocity(GMM), amplitude=1e-2, omega=1.0))
    assert not check.ok and check.max_ratio > 2 * RATIO_WARN, check.table()
    with pytest.warns(RuntimeWarning, match="rough"):
        warn_if_rough(check)
    assert "ROUGH" in check.report() and check.tags()["teacher_check"] == "ROUGH"


def test_check_rows_keeps_the_check_small():
    assert check_rows(2) == 256 and check_rows(16 * 8 * 8 * 8) == 8 and check_rows(16 * 21 * 60 * 104) == 2


@pytest.mark.parametrize("scale", [10.0, 1000.0])
def test_time_input_is_k_times_s(scale):
    """rf_velocity feeds the network k·s with k = model.time_scale; nets without the setting (the analytic
    teacher, Wan's released weights) get 1000·s."""
    cfg = load_config(None, ["model.kind=mlp", "model.in_channels=2", "model.hidden=8", "model.depth=1",
                             f"model.time_scale={scale}"])
    seen = []
    net = build_network(cfg.model)
    net.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    TrigFlowDenoiser(net).F(torch.zeros(2, 2, 1, 1, 1), t, None)
    s = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    assert torch.allclose(seen[0].double(), scale * s)
    assert TrigFlowDenoiser(ExactGMMVelocity(GMM)).time_scale == RF_TIMESTEP_SCALE
    assert math.isclose(load_config(None, []).model.time_scale, 10.0)
