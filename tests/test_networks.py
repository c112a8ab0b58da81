"""Network backbones on CPU: shapes, patchify, RoPE, forward-mode AD, CFG null condition, padding mask, sizes.

    .venv/bin/python -m pytest tests/test_networks.py -q
"""
from __future__ import annotations

import collections

import pytest
import torch

import kernels
from rcm_core.config import ModelCfg
from rcm_core.networks import build_network
from rcm_core.networks.layers import (
    apply_rope,
    patchify,
    rope_angles,
    rope_axis_dims,
    unpatchify,
)

TINY = dict(kind="dit", in_channels=4, dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)


def tiny_cfg(**kw) -> ModelCfg:
    return ModelCfg(**{**TINY, **kw})


@torch.no_grad()
def randomize_(net: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Replace the adaLN-zero init (which makes the network the zero function) by generic random weights."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return net


def dit(seed: int = 0, dtype: str = "float32", **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(build_network(tiny_cfg(dtype=dtype, **kw)), seed)


# ----------------------------------------------------------------------------------------------------------
# Shapes and interface

@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("labels", [False, True])
def test_dit_shapes(T, labels):
    net = dit(num_classes=10 if labels else 0)
    x = torch.randn(2, 4, T, 6, 8)
    cond = torch.tensor([3, 7]) if labels else torch.randn(2, 5, 24)
    out = net(x, torch.tensor([10.0, 700.0]), cond)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    null = net.null_cond(2, "cpu")
    assert net(x, torch.tensor([10.0, 700.0]), null).shape == x.shape


def test_dit_init_is_identity_blocks_and_zero_output():
    # adaLN-zero: gates, cross-attention output and proj_out start at zero, so the net starts as 0.
    net = build_network(tiny_cfg())
    out = net(torch.randn(2, 4, 1, 4, 4), torch.tensor([1.0, 999.0]), torch.randn(2, 3, 24))
    assert torch.equal(out, torch.zeros_like(out))
    assert sum(p.numel() for p in net.parameters() if p.abs().sum() > 0) > 0.5 * sum(
        p.numel() for p in net.parameters())


def test_dit_patch_size_2x2x2_and_bad_inputs():
    net = dit(patch_size=[2, 2, 2])
    assert net(torch.randn(1, 4, 4, 4, 6), torch.tensor([5.0]), torch.randn(1, 2, 24)).shape == (1, 4, 4, 4, 6)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        net(torch.randn(1, 4, 3, 4, 6), torch.tensor([5.0]), torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match=r"C=4"):
        net(torch.randn(1, 3, 2, 4, 6), torch.tensor([5.0]), torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match="text_dim=24"):
        net(torch.randn(1, 4, 2, 4, 6), torch.tensor([5.0]), torch.randn(1, 2, 23))
    with pytest.raises(ValueError, match="num_classes=0"):
        net(torch.randn(1, 4, 2, 4, 6), torch.tensor([5.0]), torch.tensor([1]))


def test_every_attention_goes_through_kernels(monkeypatch):
    calls = []
    real = kernels.attention

    def spy(q, k, v, *, scale=None, key_padding_mask=None, primal="fused"):
        calls.append((q.shape, k.shape, key_padding_mask is not None))
        return real(q, k, v, scale=scale, key_padding_mask=key_padding_mask, primal=primal)

    monkeypatch.setattr(kernels, "attention", spy)
    net = dit()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    net(torch.randn(2, 4, 2, 4, 4), torch.tensor([3.0, 4.0]), torch.randn(2, 3, 24), cond_mask=mask)
    # Per block: self-attention [B, heads, 2·2·2 tokens, 24] then masked cross-attention to 3 text tokens.
    assert calls == [((2, 2, 8, 24), (2, 2, 8, 24), False), ((2, 2, 8, 24), (2, 2, 3, 24), True)] * 2


def test_bf16_network_keeps_time_path_in_fp32():
    net = build_network(tiny_cfg(dtype="bfloat16"))
    dtypes = {n: p.dtype for n, p in net.named_parameters()}
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["condition_embedder.time_proj.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32 and dtypes["scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    temb, e0 = net.condition_embedder.time(torch.tensor([500.0, 500.001]))
    assert e0.dtype == torch.float32
    # fp32 resolves a 1e-3 change of the raw time that bf16 (8 bits of mantissa at 500) could not even represent.
    assert not torch.equal(temb[0], temb[1])
    randomize_(net)
    out = net(torch.randn(2, 4, 1, 4, 4), torch.tensor([500.0, 20.0]), torch.randn(2, 3, 24))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# Patchify and RoPE

@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 3)])
def test_patchify_unpatchify_inverse(patch):
    x = torch.randn(2, 3, 4, 6, 6)
    tokens = patchify(x, patch)
    grid = (4 // patch[0], 6 // patch[1], 6 // patch[2])
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch, 3), x)


def test_patch_embedding_token_order_matches_patchify():
    # The Conv3d tokens (flattened f, h, w) must be the linear map of patchify's tokens, in the same order.
    net = dit(patch_size=[1, 2, 2])
    x = torch.randn(1, 4, 2, 4, 6)
    conv_tokens = net.patch_embedding(x).flatten(2).transpose(1, 2)
    w = net.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)         # [dim, pt·ph·pw·C], C fastest
    lin_tokens = patchify(x, (1, 2, 2)) @ w.T + net.patch_embedding.bias
    torch.testing.assert_close(conv_tokens, lin_tokens, rtol=1e-5, atol=1e-5)


def test_rope_axis_split_matches_wan():
    assert rope_axis_dims(128) == (44, 42, 42)       # Wan2.1 1.3B and 14B head_dim
    assert rope_axis_dims(24) == (8, 8, 8)
    assert rope_axis_dims(16) == (8, 4, 4)


def test_rope_is_a_norm_preserving_relative_rotation():
    head_dim, grid = 24, (3, 4, 5)
    angles = rope_angles(grid, head_dim)
    cos, sin = torch.cos(angles), torch.sin(angles)
    L = 3 * 4 * 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, L, head_dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    # Same q and k vectors at every position: after RoPE, q_i·k_j may depend only on coord(i) − coord(j).
    q = torch.randn(head_dim, generator=g, dtype=torch.float64).expand(1, 1, L, head_dim)
    k = torch.randn(head_dim, generator=g, dtype=torch.float64).expand(1, 1, L, head_dim)
    s = (apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].T)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(L, 3)
    groups = collections.defaultdict(list)
    for i in range(L):
        for j in range(L):
            groups[tuple((coords[i] - coords[j]).tolist())].append(s[i, j])
    spread = max(float(torch.stack(v).max() - torch.stack(v).min()) for v in groups.values())
    assert spread < 1e-12
    # ... and it does depend on the offset along every axis (not the identity map).
    at = {d: float(torch.stack(groups[d])[0]) for d in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
    assert all(abs(at[d] - at[(0, 0, 0)]) > 1e-3 for d in at if d != (0, 0, 0))


def test_rope_time_axis_rotates_only_its_channels():
    head_dim = 24
    t_dim = rope_axis_dims(head_dim)[0]
    angles = rope_angles((2, 1, 1), head_dim)     # second token: frame 1, row 0, column 0
    x = torch.randn(1, 1, 2, head_dim, dtype=torch.float64)
    y = apply_rope(x, torch.cos(angles), torch.sin(angles))
    assert torch.equal(y[..., 1, t_dim:], x[..., 1, t_dim:])
    assert not torch.allclose(y[..., 1, :t_dim], x[..., 1, :t_dim])


# ----------------------------------------------------------------------------------------------------------
# Forward-mode AD through the whole network (the sCM tangent needs it), float64 vs central differences

def _jvp_vs_fd(net, x, t, cond, x_dot, t_dot, h):
    f = lambda x_, t_: net(x_, t_, cond)
    _, jvp_out = torch.func.jvp(f, (x, t), (x_dot, t_dot))
    fd = (f(x + h * x_dot, t + h * t_dot) - f(x - h * x_dot, t - h * t_dot)) / (2 * h)
    return jvp_out, fd


@pytest.mark.parametrize("labels", [False, True])
def test_dit_jvp_matches_central_differences_float64(labels):
    net = dit(dtype="float64", num_classes=5 if labels else 0, num_layers=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([250.0, 810.0], dtype=torch.float64)
    cond = torch.tensor([1, 5]) if labels else torch.randn(2, 3, 24, generator=g, dtype=torch.float64)
    x_dot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t_dot = torch.tensor([30.0, -20.0], dtype=torch.float64)    # Wan's time is 1000·s: large raw tangents
    with torch.no_grad():
        # Central differences converge as h²; with t_dot ~ 30 the time direction is strongly curved, so
        # h = 1e-5 (truncation ~1e-6 of the output scale, rounding ~1e-10) is the sweet spot in float64.
        jvp_out, fd = _jvp_vs_fd(net, x, t, cond, x_dot, t_dot, h=1e-5)
        _, t_only = torch.func.jvp(lambda t_: net(x, t_, cond), (t,), (t_dot,))
    assert jvp_out.abs().max() > 1e-2 and t_only.abs().max() > 1e-3      # both directions matter
    assert (jvp_out - fd).abs().max() <= 1e-6 * jvp_out.abs().max()


# ----------------------------------------------------------------------------------------------------------
# Conditioning: CFG null condition, negative context, padding mask

def test_null_label_differs_from_real_label():
    net = dit(num_classes=10)
    x, t = torch.randn(2, 4, 1, 4, 4), torch.tensor([400.0, 400.0])
    null = net.null_cond(2, "cpu")
    assert null.dtype == torch.long and null.tolist() == [10, 10]
    with torch.no_grad():
        out_null, out_label = net(x, t, null), net(x, t, torch.tensor([2, 2]))
    assert (out_null - out_label).abs().max() > 1e-3


def test_negative_context_is_the_text_null_cond_and_survives_state_dict():
    net = dit()
    null = net.null_cond(3, "cpu")
    assert null.shape == (3, 1, 24) and torch.equal(null, torch.zeros(3, 1, 24))
    neg = torch.randn(7, 24)
    net.set_negative_context(neg)
    assert torch.equal(net.null_cond(2, "cpu")[1], neg)
    padded = net.null_cond(2, "cpu", length=10)
    assert padded.shape == (2, 10, 24) and torch.equal(padded[0, :7], neg) and not padded[:, 7:].any()
    other = build_network(tiny_cfg())
    other.load_state_dict(net.state_dict())
    assert torch.equal(other.negative_context, neg)
    with pytest.raises(ValueError, match="text_dim=24"):
        net.set_negative_context(torch.randn(7, 23))


def test_key_padding_mask_ignores_padded_tokens():
    net = dit()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([300.0, 600.0])
    ctx = torch.randn(2, 6, 24, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    other = ctx.clone()
    other[0, 4:] = torch.randn(2, 24, generator=g) * 10        # new content only in sample 0's padding
    with torch.no_grad():
        a, b = net(x, t, ctx, cond_mask=mask), net(x, t, other, cond_mask=mask)
        unmasked_a, unmasked_b = net(x, t, ctx), net(x, t, other)
        truncated = net(x[:1], t[:1], ctx[:1, :4])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[:1], truncated, rtol=1e-5, atol=1e-5)     # masking = dropping the tokens
    assert (unmasked_a[0] - unmasked_b[0]).abs().max() > 1e-3                # without the mask it matters


# ----------------------------------------------------------------------------------------------------------
# Sizes: Wan2.1-shaped configs built on the meta device (no memory) match diffusers' parameter counts

# sum(p.numel()) of diffusers 0.42.1 `WanTransformer3DModel` with the Wan2.1-T2V configs (heads × 128 head dim,
# text_dim 4096, freq_dim 256, patch (1, 2, 2), 16 channels, cross_attn_norm, qk rms_norm_across_heads).
WAN21_PARAMS = {"1.3B": (1536, 8960, 12, 30, 1_418_996_800), "14B": (5120, 13824, 40, 40, 14_288_491_584)}


@pytest.mark.parametrize("size", list(WAN21_PARAMS))
def test_wan21_shaped_parameter_count_on_meta(size):
    dim, ffn, heads, layers, expected = WAN21_PARAMS[size]
    cfg = ModelCfg(kind="dit", in_channels=16, dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers,
                   freq_dim=256, text_dim=4096, dtype="bfloat16")
    with torch.device("meta"):
        net = build_network(cfg)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert next(net.parameters()).device.type == "meta"


def test_meta_build_then_reset_initialises_every_tensor():
    """How large models are built for FSDP2: on `meta`, `to_empty`, then `reset_parameters`. Fill the fresh
    memory with NaN first, so any parameter or buffer that reset_parameters skips stays NaN and is named."""
    torch.manual_seed(0)
    with torch.device("meta"):
        net = build_network(tiny_cfg(num_layers=2))
    net.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            t.fill_(float("nan"))
    net.reset_parameters()
    missed = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if not torch.isfinite(t).all()]
    assert not missed, f"left uninitialised by reset_parameters: {missed}"
    x = torch.randn(1, TINY["in_channels"], 2, 4, 4)
    out = net(x, torch.tensor([500.0]), net.null_cond(1))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# Residual MLP for vector toys

def mlp(num_classes: int = 0, dtype: str = "float32", in_channels: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(build_network(ModelCfg(kind="mlp", in_channels=in_channels, hidden=32, depth=2,
                                             freq_dim=16, num_classes=num_classes, dtype=dtype)), std=0.3)


def test_mlp_shapes_null_label_and_flattening():
    net = mlp(num_classes=3)
    x, t = torch.randn(5, 6, 1, 1, 1), torch.full((5,), 500.0)
    assert net(x, t, torch.tensor([0, 1, 2, 0, 1])).shape == x.shape
    null = net.null_cond(5, "cpu")
    assert null.tolist() == [3] * 5
    assert torch.equal(net(x, t, None), net(x, t, null))           # None means the null label
    assert (net(x, t, null) - net(x, t, torch.zeros(5, dtype=torch.long))).abs().max() > 1e-3
    assert net(torch.randn(5, 3, 1, 2, 1), t, null).shape == (5, 3, 1, 2, 1)     # 3·1·2·1 = in_channels
    with pytest.raises(ValueError, match="in_channels=6"):
        net(torch.randn(5, 4, 1, 1, 1), t, null)
    assert mlp().null_cond(2, "cpu") is None


def test_mlp_init_is_zero_function():
    net = build_network(ModelCfg(kind="mlp", in_channels=6, hidden=32, depth=2, freq_dim=16))
    out = net(torch.randn(3, 6, 1, 1, 1), torch.full((3,), 10.0))
    assert torch.equal(out, torch.zeros_like(out))


def test_mlp_jvp_matches_central_differences_float64():
    net = mlp(num_classes=3, dtype="float64")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 1, 1, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([5.0, 200.0, 600.0, 990.0], dtype=torch.float64)
    x_dot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t_dot = torch.full((4,), 25.0, dtype=torch.float64)
    with torch.no_grad():
        jvp_out, fd = _jvp_vs_fd(net, x, t, torch.tensor([0, 1, 2, 3]), x_dot, t_dot, h=1e-5)
    assert jvp_out.abs().max() > 1e-2
    assert (jvp_out - fd).abs().max() <= 1e-6 * jvp_out.abs().max()
