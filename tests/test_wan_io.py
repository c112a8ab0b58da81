"""Wan2.1 checkpoint key maps, safetensors I/O, load errors and bit-exact export round trips (CPU, no diffusers).

    .venv/bin/python -m pytest tests/test_wan_io.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcm_core.config import ModelCfg
from rcm_core.networks import build_network, wan_io
from rcm_core.networks.wan_io import WanCheckpointError

TINY = dict(kind="dit", in_channels=4, dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=24)


def tiny_net(seed: int = 0, dtype: str = "float32", **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network(ModelCfg(**{**TINY, "dtype": dtype, **kw}))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------------
# Key maps

# Names as they appear in the original Wan2.1-T2V release (WanModel) and in diffusers' WanTransformer3DModel.
KNOWN_PAIRS = [
    ("patch_embedding.weight", "patch_embedding.weight"),
    ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),
    ("text_embedding.2.bias", "condition_embedder.text_embedder.linear_2.bias"),
    ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight"),
    ("time_embedding.2.bias", "condition_embedder.time_embedder.linear_2.bias"),
    ("time_projection.1.weight", "condition_embedder.time_proj.weight"),
    ("blocks.7.self_attn.q.weight", "blocks.7.attn1.to_q.weight"),
    ("blocks.7.self_attn.o.bias", "blocks.7.attn1.to_out.0.bias"),
    ("blocks.7.self_attn.norm_k.weight", "blocks.7.attn1.norm_k.weight"),
    ("blocks.12.cross_attn.v.weight", "blocks.12.attn2.to_v.weight"),
    ("blocks.12.cross_attn.norm_q.weight", "blocks.12.attn2.norm_q.weight"),
    ("blocks.0.norm3.weight", "blocks.0.norm2.weight"),
    ("blocks.0.norm3.bias", "blocks.0.norm2.bias"),
    ("blocks.29.ffn.0.weight", "blocks.29.ffn.net.0.proj.weight"),
    ("blocks.29.ffn.2.bias", "blocks.29.ffn.net.2.bias"),
    ("blocks.3.modulation", "blocks.3.scale_shift_table"),
    ("head.head.weight", "proj_out.weight"),
    ("head.modulation", "scale_shift_table"),
]


@pytest.mark.parametrize("original,ours", KNOWN_PAIRS)
def test_known_wan_names_map_both_ways(original, ours):
    assert wan_io.original_to_ours(original) == ours
    assert wan_io.ours_to_original(ours) == original


def test_key_map_is_a_bijection_on_every_parameter():
    net = build_network(ModelCfg(**TINY))
    ours = [k for k in net.state_dict() if k != "negative_context"]
    original = [wan_io.ours_to_original(k) for k in ours]
    assert None not in original and len(set(original)) == len(ours)
    assert [wan_io.original_to_ours(k) for k in original] == ours
    # Wan's parameter-free norms and unknown (e.g. I2V) keys have no counterpart.
    for key in ("blocks.0.norm2.weight", "blocks.0.cross_attn.k_img.weight", "img_emb.proj.0.weight"):
        assert wan_io.original_to_ours(key) is None


def test_original_layout_of_1p3b_has_the_release_key_count():
    # WanModel tensors: patch_embedding 2, text_embedding 4, time_embedding 4, time_projection 2, head.head 2,
    # head.modulation 1; per block self_attn and cross_attn (q, k, v, o weight+bias, norm_q, norm_k) 2×10,
    # norm3 2, ffn 4, modulation 1 = 27.
    cfg = ModelCfg(kind="dit", in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                   freq_dim=256, text_dim=4096)
    with torch.device("meta"):
        net = build_network(cfg)
    original = wan_io.convert_from_ours(net.state_dict(), "original")
    assert len(original) == 2 + 4 + 4 + 2 + 2 + 1 + 30 * 27
    assert original["head.modulation"].shape == (1, 2, 1536)
    assert original["blocks.0.modulation"].shape == (1, 6, 1536)
    assert original["text_embedding.0.weight"].shape == (1536, 4096)
    assert original["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)


def test_detect_layout_and_comfy_prefix():
    sd = tiny_net().state_dict()
    original = wan_io.convert_from_ours(sd, "original")
    assert wan_io.detect_layout(original) == "original"
    assert wan_io.detect_layout(wan_io.convert_from_ours(sd, "diffusers")) == "diffusers"
    prefixed = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    converted, unmapped = wan_io.convert_to_ours(prefixed)
    assert unmapped == [] and set(converted) == set(sd) - {"negative_context"}
    with pytest.raises(WanCheckpointError, match="cannot tell the checkpoint layout"):
        wan_io.detect_layout({"encoder.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------
# safetensors reader / writer

def test_safetensors_roundtrip_all_dtypes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.tensor([True, False]), "e": torch.randn(2, 2).half(), "f": torch.zeros(0, 4),
               "g": torch.randn(4, dtype=torch.float64), "h": torch.randn(3, 4).T}     # non-contiguous
    wan_io.write_safetensors(tensors, tmp_path / "x.safetensors")
    back = wan_io.read_safetensors(tmp_path / "x.safetensors")
    assert_same_state({k: v.contiguous() for k, v in tensors.items()}, back)


def test_safetensors_files_interoperate_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed")
    tensors = {"w": torch.randn(4, 3).to(torch.bfloat16), "b": torch.randn(3), "i": torch.arange(5)}
    wan_io.write_safetensors(tensors, tmp_path / "ours.safetensors")
    assert_same_state(tensors, st.load_file(tmp_path / "ours.safetensors"))
    st.save_file(tensors, tmp_path / "theirs.safetensors")
    assert_same_state(tensors, wan_io.read_safetensors(tmp_path / "theirs.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# Export → load round trips (bit-exact, dtypes kept)

@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_load_is_bit_exact(tmp_path, layout, sharded, dtype):
    src = tiny_net(seed=1, dtype=dtype)
    files = wan_io.export(src, tmp_path, layout=layout, max_shard_bytes=30_000 if sharded else 2**40)
    names = {f.name for f in files}
    assert "config.json" in names
    if sharded:
        assert "diffusion_pytorch_model.safetensors.index.json" in names and len(names) > 3
        index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) <= names
    else:
        assert "diffusion_pytorch_model.safetensors" in names
    raw = wan_io.read_checkpoint(tmp_path)
    assert wan_io.detect_layout(raw) == layout
    dst = tiny_net(seed=2, dtype=dtype)
    wan_io.load_weights(dst, tmp_path)
    expected = {k: v for k, v in src.state_dict().items() if k != "negative_context"}
    got = {k: v for k, v in dst.state_dict().items() if k != "negative_context"}
    assert_same_state(expected, got)
    # The network is rebuilt from the written config.json alone, too.
    rebuilt = wan_io.build_from_checkpoint(tmp_path, dtype=dtype)
    assert rebuilt.cfg.dim == 48 and rebuilt.cfg.num_layers == 2
    assert_same_state(expected, {k: v for k, v in rebuilt.state_dict().items() if k != "negative_context"})


def test_export_casts_on_request_and_reads_pt_files(tmp_path):
    src = tiny_net()
    wan_io.export(src, tmp_path / "bf16", layout="original", dtype=torch.bfloat16)
    raw = wan_io.read_checkpoint(tmp_path / "bf16")
    assert {v.dtype for v in raw.values()} == {torch.bfloat16}
    torch.save(wan_io.convert_from_ours(src.state_dict(), "original"), tmp_path / "w.pth")
    dst = tiny_net(seed=5)
    wan_io.load_weights(dst, tmp_path / "w.pth")
    assert torch.equal(dst.proj_out.weight, src.proj_out.weight)


def test_class_conditional_networks_refuse_wan_export(tmp_path):
    with pytest.raises(ValueError, match="class-conditional"):
        wan_io.export(tiny_net(num_classes=3), tmp_path, layout="diffusers")


# ----------------------------------------------------------------------------------------------------------
# Clear errors

def test_load_error_lists_missing_unexpected_and_mis_shaped_keys():
    sd = wan_io.convert_from_ours(tiny_net().state_dict(), "original")
    del sd["blocks.1.ffn.0.weight"], sd["head.modulation"]
    sd["blocks.0.cross_attn.k_img.weight"] = torch.zeros(48, 48)          # an I2V-only tensor
    sd["blocks.0.self_attn.q.weight"] = torch.zeros(48, 40)
    with pytest.raises(WanCheckpointError) as e:
        wan_io.load_weights(tiny_net(), sd)
    msg = str(e.value)
    assert "2 missing keys" in msg and "blocks.1.ffn.net.0.proj.weight" in msg and "scale_shift_table" in msg
    assert "1 unexpected keys" in msg and "blocks.0.cross_attn.k_img.weight" in msg and "I2V" in msg
    assert "1 shape mismatches" in msg and "blocks.0.attn1.to_q.weight: checkpoint (48, 40) vs network (48, 48)" in msg


def test_load_error_suggests_the_right_preset_for_another_width():
    big = tiny_net(dim=96, num_heads=4, ffn_dim=96)
    with pytest.raises(WanCheckpointError, match="dim=96 but the network has model.dim=48"):
        wan_io.load_weights(tiny_net(), big.state_dict())


def test_missing_files_and_configs_fail_clearly(tmp_path):
    with pytest.raises(WanCheckpointError, match="does not exist"):
        wan_io.read_checkpoint(tmp_path / "nope")
    with pytest.raises(WanCheckpointError, match="no Wan weights"):
        wan_io.read_checkpoint(tmp_path)
    with pytest.raises(WanCheckpointError, match="image-to-video"):
        wan_io.model_cfg_from_config({**wan_io.config_for_layout(ModelCfg(**TINY), "diffusers"), "image_dim": 1280})


# ----------------------------------------------------------------------------------------------------------
# Configs

@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_config_roundtrip(layout):
    cfg = ModelCfg(kind="dit", in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
                   freq_dim=256, text_dim=4096)
    assert wan_io.model_cfg_from_config(wan_io.config_for_layout(cfg, layout)) == cfg


def test_release_config_json_of_wan21_1p3b():
    # config.json as shipped with the original Wan2.1-T2V-1.3B release (no text_dim / patch_size: defaults).
    release = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
               "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
               "num_layers": 30, "out_dim": 16, "text_len": 512}
    cfg = wan_io.model_cfg_from_config(release)
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.text_dim, cfg.patch_size) == \
        (1536, 12, 30, 8960, 4096, [1, 2, 2])


# ----------------------------------------------------------------------------------------------------------
# Presets

# Official transformer config.json of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers (the fields that shape weights),
# and diffusers 0.42.1's parameter count for each.
OFFICIAL = {"1p3b": (dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30), 1_418_996_800),
            "14b": (dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40), 14_288_491_584)}


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_wan21_presets_load_and_have_the_release_shapes(size):
    from rcm_core.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "experiments" / f"wan21_t2v_{size}_rcm.yaml")
    fields, params = OFFICIAL[size]
    written = wan_io.config_for_layout(cfg.model, "diffusers")
    common = dict(in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, patch_size=[1, 2, 2], eps=1e-6)
    assert {k: written[k] for k in {**fields, **common}} == {**fields, **common}
    with torch.device("meta"):
        net = build_network(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == params
    assert cfg.teacher.parametrization == "rf_velocity" and cfg.teacher.guidance == 5.0
    assert cfg.distill.reg_weight == 0.01 and cfg.ema.sigma_rel == 0.05
