"""What sCM's JVP pass costs, counted (issue 28): the matmul FLOPs of the network's forward and of its forward-mode
JVP, by `torch.utils.flop_counter.FlopCounterMode` on a small Wan DiT, against `rcm_core.run.plan.forward_flops`
and `jvp_flops`.

Why it matters: a linear layer under `torch.autograd.forward_ad` ran three matmuls in PyTorch (the product rule
with a materialised zero tangent for the weight) where two carry information; `rcm_core.networks.layers.Linear`
runs two. The counts are exact integers (FLOPs of the shapes), so the tests compare them exactly; the values
agree to the bit with nn.Linear's own dual path, since the dropped term is a matmul by zeros.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.flop_counter import FlopCounterMode

from rcm_core.config import ModelCfg
from rcm_core.networks import build_network
from rcm_core.networks.layers import Linear
from rcm_core.run.plan import forward_flops, jvp_flops


def _plain_attention(q, k, v, **_):
    """Softmax attention as two batched matmuls, so the counter sees its FLOPs (the fused kernel is opaque to it)."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def _counts(fn) -> dict[str, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_a_linear_jvp_is_two_matmuls_and_the_same_values(dtype):
    gen = torch.Generator().manual_seed(0)
    ours = Linear(48, 80).to(dtype)
    theirs = torch.nn.Linear(48, 80).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 48, generator=gen).to(dtype)
    x_t = torch.randn(3, 7, 48, generator=gen).to(dtype)
    primal_flops = 2 * 3 * 7 * 48 * 80

    def run(layer):
        with fwAD.dual_level():
            y = fwAD.unpack_dual(layer(fwAD.make_dual(x, x_t)))
            return y.primal, y.tangent
    got, ref = {}, {}
    assert _counts(lambda: got.update(zip("pt", run(ours))))["Global"] == 2 * primal_flops
    # PyTorch's own path, the reason for the class: a third matmul, by the weight's zero tangent
    assert _counts(lambda: ref.update(zip("pt", run(theirs))))["Global"] == 3 * primal_flops
    assert torch.equal(got["p"], ref["p"]) and torch.equal(got["t"], ref["t"])
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))                  # no tangent: nn.Linear's path


def test_a_linear_records_gradients_as_nn_linear_does():
    """With grad enabled (a with-grad pass) the class is nn.Linear: same output and same weight gradient."""
    ours = Linear(8, 4)
    theirs = torch.nn.Linear(8, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)


def test_dit_forward_and_jvp_flops_are_the_planners():
    """Per block of a float64 Wan DiT (D = 64, F = 160, 48 latent tokens, 8 text tokens): the forward's counted
    FLOPs equal `forward_flops`; under forward-mode AD along x and t every linear that sees the latent tokens costs
    2× its forward, cross-attention's k and v (the text, no tangent) 1×, self-attention's matmuls 3×; and
    `jvp_flops` is those parts, cross-attention's matmuls at the 2× they need. (The counted twin here pays 3× for
    them, PyTorch's zero-tangent matmul again; the fused kernel does too, with zeros for k_t and v_t: 1.6 % of the
    attention FLOPs at 32,760 tokens, left as it is.)"""
    cfg = ModelCfg(dim=64, ffn_dim=160, num_heads=4, num_layers=2, text_dim=32, dtype="float64")
    torch.manual_seed(0)
    net = build_network(cfg)
    for block in net.blocks:
        block.attn1.attention_fn = block.attn2.attention_fn = _plain_attention
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 2, 8, 12, generator=gen, dtype=torch.float64)
    t = torch.full((1,), 0.7, dtype=torch.float64)
    text = torch.randn(1, 8, cfg.text_dim, generator=gen, dtype=torch.float64)
    L, T = 2 * 8 * 12 // math.prod(cfg.patch_size), text.shape[1]

    fwd = _counts(lambda: net(x, t, text))

    def dual_pass():
        with fwAD.dual_level():
            out = net(fwAD.make_dual(x, torch.randn(x.shape, generator=gen, dtype=x.dtype)),
                      fwAD.make_dual(t, torch.ones_like(t)), text)
            assert fwAD.unpack_dual(out).tangent is not None
    jvp = _counts(dual_pass)

    per_layer_fwd = forward_flops(cfg, L, L, T) / cfg.num_layers
    latent_linears = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                      "ffn.net.0.proj", "ffn.net.2")
    for i in range(cfg.num_layers):
        b = f"WanDiT.blocks.{i}"
        assert fwd[b] == per_layer_fwd
        for name in latent_linears:
            assert jvp[f"{b}.{name}"] == 2 * fwd[f"{b}.{name}"], name
        for name in ("attn2.to_k", "attn2.to_v"):
            assert jvp[f"{b}.{name}"] == fwd[f"{b}.{name}"], name
        self_attention = fwd[f"{b}.attn1"] - sum(fwd[f"{b}.attn1.{n}"] for n in ("to_q", "to_k", "to_v", "to_out.0"))
        assert self_attention == 4 * L * L * cfg.dim
        assert jvp[f"{b}.attn1"] - sum(jvp[f"{b}.attn1.{n}"] for n in ("to_q", "to_k", "to_v", "to_out.0")) \
            == 3 * self_attention
        cross = 4 * L * T * cfg.dim
        needed = sum(jvp[f"{b}.{n}"] for n in latent_linears) + jvp[f"{b}.attn2.to_k"] + jvp[f"{b}.attn2.to_v"] \
            + 3 * self_attention + 2 * cross
        assert needed == jvp_flops(cfg, L, L, T) / cfg.num_layers


def test_the_jvp_over_forward_floor_of_wan_1p3b():
    """The FLOP ratio a JVP pass cannot beat at equal efficiency: 2 + self-attention's share, less the text's."""
    from rcm_core.config import load_config
    cfg = load_config("experiments/wan21_t2v_1p3b_rcm.yaml", []).model
    ratios = {L: jvp_flops(cfg, L, L, 512) / forward_flops(cfg, L, L, 512) for L in (8190, 32760)}
    assert ratios[8190] == pytest.approx(2.362, abs=1e-3) and ratios[32760] == pytest.approx(2.699, abs=1e-3)
