"""Wan2.1-1.3B-shaped DiT on a GPU in bf16 against diffusers' WanTransformer3DModel (random weights).

    .venv/bin/python -m pytest tests/test_wan_gpu.py -m gpu -s

Marked `gpu` (skipped by the default `-m "not gpu"`); needs CUDA and diffusers. The rule is flash-attention's:
our bf16 error against a float64 reference may be at most 2× diffusers' own bf16 error (plus a small floor).
"""
from __future__ import annotations

import pytest
import torch

from rcm_core.config import ModelCfg
from rcm_core.networks import build_network, wan_io

pytestmark = pytest.mark.gpu

WAN_1P3B = dict(in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256, text_dim=4096)


def _reference(cfg: ModelCfg):
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    with torch.device("cuda"):
        return diffusers.WanTransformer3DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
            in_channels=cfg.in_channels, out_channels=cfg.in_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers).eval()


def _as_bf16_like_from_pretrained(ref):
    """Cast to bf16 but keep diffusers' `_keep_in_fp32_modules` in fp32, as from_pretrained(torch_dtype=bf16)."""
    ref.to(torch.bfloat16)
    for name, module in ref.named_modules():
        if any(k in name.split(".") for k in ref._keep_in_fp32_modules):
            module.float()
    for name, p in ref.named_parameters():
        if name.endswith("scale_shift_table"):
            p.data = p.data.float()
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_1p3b_bf16_within_bf16_error_of_diffusers():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = ModelCfg(kind="dit", dtype="bfloat16", **WAN_1P3B)
    ref = _reference(cfg)                                   # diffusers' own (PyTorch default) init
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    g = torch.Generator(device="cuda").manual_seed(1)
    # 480p-like aspect at small size: 5 latent frames of 30×52 → 1,950 tokens; umT5 context padded to 512.
    x = torch.randn(2, 16, 5, 30, 52, generator=g, device="cuda")
    ctx = torch.randn(2, 512, 4096, generator=g, device="cuda") * 0.2
    ctx[0, 37:] = 0
    ctx[1, 120:] = 0
    t = torch.tensor([999.0, 437.5], device="cuda")

    ref64 = ref.double()
    out64 = ref64(x.double(), t.double(), ctx.double()).sample
    ref_bf16 = _as_bf16_like_from_pretrained(ref64)
    ref_bf16.load_state_dict(weights)
    out_ref = ref_bf16(x.bfloat16(), t, ctx.bfloat16()).sample
    del ref, ref64, ref_bf16
    torch.cuda.empty_cache()

    ours = build_network(cfg).cuda()
    wan_io.load_weights(ours, weights)
    out_ours = ours(x.bfloat16(), t, ctx.bfloat16())
    ours32 = build_network(ModelCfg(kind="dit", dtype="float32", **WAN_1P3B)).cuda()
    wan_io.load_weights(ours32, weights)
    out_ours32 = ours32(x, t, ctx)

    err_ours, err_ref, err32 = _rel(out_ours, out64), _rel(out_ref, out64), _rel(out_ours32, out64)
    print(f"\nWan2.1-1.3B shape, rel. L2 error vs diffusers float64 on {torch.cuda.get_device_name()}: "
          f"ours bf16 {err_ours:.3e}, diffusers bf16 {err_ref:.3e}, ours fp32 {err32:.3e}")
    assert out64.abs().max() > 0.1
    assert err32 < 1e-4
    assert err_ours <= 2 * err_ref + 1e-3
