"""Our WanDiT against diffusers' WanTransformer3DModel (an independent implementation) on random weights.

    .venv/bin/python -m pytest tests/test_wan_diffusers.py -q

diffusers is a test-only dependency (`pip install -e .[test]`); without it this file is skipped.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from torch.nn.attention import SDPBackend, sdpa_kernel

from rcm_core.config import ModelCfg
from rcm_core.networks import build_network, wan_io

# head_dim 24 (two heads) and Wan's real head_dim 128 (whose RoPE split is 44/42/42).
SHAPES = {"hd24": dict(dim=48, num_heads=2, ffn_dim=96, num_layers=2),
          "hd128": dict(dim=256, num_heads=2, ffn_dim=64, num_layers=1)}
TIMESTEPS = [0.0, 1.0, 137.25, 500.0, 999.0]     # raw Wan time 1000·s


def reference(cfg: ModelCfg, dtype: torch.dtype = torch.float32):
    return diffusers.WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps).to(dtype).eval()


def pair(shape: str, dtype: str = "float32", seed: int = 0):
    """(ours, theirs) with the same random weights (the default inits make both near-zero functions)."""
    cfg = ModelCfg(kind="dit", in_channels=4, freq_dim=32, text_dim=24, dtype=dtype, **SHAPES[shape])
    ref = reference(cfg, torch.float64 if dtype == "float64" else torch.float32)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.2 for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd, strict=True)
    ours = build_network(cfg)
    wan_io.load_weights(ours, sd)
    return ours, ref


def inputs(T: int, text_len: int, valid: list[int], seed: int = 1):
    """Latents [2, 4, T, 6, 8] and a text context zero-padded after `valid[i]` tokens, as Wan pads umT5 output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, T, 6, 8, generator=g)
    ctx = torch.randn(2, text_len, 24, generator=g)
    keep = torch.arange(text_len)[None, :] < torch.tensor(valid)[:, None]
    return x, ctx * keep[..., None], keep


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("valid", [[7, 7], [3, 5]], ids=["no_padding", "zero_padded"])
def test_outputs_equal_diffusers_float32(shape, T, valid):
    ours, ref = pair(shape)
    x, ctx, _ = inputs(T, 7, valid)
    for ts in TIMESTEPS:
        t = torch.tensor([ts, 1000.0 - ts])
        with torch.no_grad():
            a, b = ours(x, t, ctx), ref(x, t, ctx).sample
        assert b.abs().max() > 0.1                     # a non-trivial function
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masked_padding_equals_diffusers_on_the_unpadded_text():
    # With cond_mask, padded tokens are dropped: the same as giving diffusers only the real tokens.
    ours, ref = pair("hd24")
    x, ctx, keep = inputs(2, 9, [4, 9])
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        a = ours(x, t, ctx, cond_mask=keep)
        b0 = ref(x[:1], t[:1], ctx[:1, :4]).sample
        b1 = ref(x[1:], t[1:], ctx[1:]).sample
    torch.testing.assert_close(a, torch.cat([b0, b1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_exported_checkpoints_load_in_diffusers(tmp_path, layout):
    """Export ours → read with the safetensors library → (diffusers' own original→diffusers converter) →
    WanTransformer3DModel.from_config(our config.json), strict load → same outputs."""
    ours, _ = pair("hd24", seed=3)
    wan_io.export(ours, tmp_path, layout=layout, max_shard_bytes=40_000)
    index = wan_io.read_config(tmp_path)
    sd = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        sd.update(safetensors_torch.load_file(shard))
    if layout == "original":
        assert index["_class_name"] == "WanModel"
        sd = convert_wan_transformer_to_diffusers(sd)
        index = wan_io.config_for_layout(ours.cfg, "diffusers")
    ref = diffusers.WanTransformer3DModel.from_config(index).eval()
    ref.load_state_dict(sd, strict=True)
    x, ctx, _ = inputs(2, 5, [5, 2])
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), ref(x, t, ctx).sample, rtol=1e-5, atol=1e-5)


def test_jvp_through_our_kernel_matches_jvp_of_diffusers_float64():
    """The tangent the sCM loss uses: d/dε of the network along (ẋ, ṫ), ours through kernels.attention vs
    torch.func.jvp over the reference model (SDPA's math backend, the only one with forward AD on CPU)."""
    ours, ref = pair("hd24", dtype="float64", seed=4)
    x, ctx, _ = inputs(2, 5, [5, 3])
    x, ctx = x.double(), ctx.double()
    t = torch.tensor([300.0, 820.0], dtype=torch.float64)
    x_dot = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t_dot = torch.tensor([40.0, -15.0], dtype=torch.float64)
    with torch.no_grad():
        out_a, jvp_a = torch.func.jvp(lambda x_, t_: ours(x_, t_, ctx), (x, t), (x_dot, t_dot))
        with sdpa_kernel(SDPBackend.MATH):
            out_b, jvp_b = torch.func.jvp(lambda x_, t_: ref(x_, t_, ctx).sample, (x, t), (x_dot, t_dot))
    assert jvp_b.abs().max() > 1e-2
    # diffusers computes the sinusoid and the RoPE tables in float32 even in a float64 model, so the two agree
    # to float32 precision only; a wrong or missing tangent term would be off by O(1).
    for a, b in ((out_a, out_b), (jvp_a, jvp_b)):
        print(f"max |ours − diffusers| / max |diffusers| = {float((a - b).abs().max() / b.abs().max()):.2e}")
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
