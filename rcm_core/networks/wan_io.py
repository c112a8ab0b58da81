"""Wan2.1 checkpoints in and out: the original release layout and the diffusers layout, single or sharded.

    .venv/bin/python -m pytest tests/test_wan_io.py tests/test_wan_diffusers.py -q

    from rcm_core.networks import wan_io
    net = wan_io.build_from_checkpoint("Wan2.1-T2V-1.3B/")              # config.json + weights, either layout
    wan_io.load_weights(net, "Wan2.1-T2V-1.3B-Diffusers/transformer")  # or into a network you built
    wan_io.export(net, "out/student", layout="diffusers")             # or layout="original"

Our `WanDiT` uses diffusers' `WanTransformer3DModel` names and shapes, so the diffusers layout maps to ours
by identity. The original release (`Wan-AI/Wan2.1-T2V-*`, class `WanModel`) maps by an exact table:
`blocks.N.self_attn.q` → `blocks.N.attn1.to_q`, `head.head` → `proj_out`, `blocks.N.modulation` →
`blocks.N.scale_shift_table`, ..., and Wan's cross-attention norm `norm3` is our `norm2` (Wan's `norm2` has
no parameters). Weights are read and written as safetensors by the small reader/writer below (no extra
dependency); `.pt/.pth/.bin` state dicts are read with `torch.load(weights_only=True)`. Nothing here downloads.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rcm_core.config import ModelCfg
from rcm_core.networks.dit import CLASS_EMBEDDER_KEY

Layout = Literal["original", "diffusers"]
WEIGHTS_NAME = "diffusion_pytorch_model"      # both Wan releases and diffusers use this file stem
# Our-only state: not network weights in either Wan layout, so never required when loading (class-conditional
# networks' label tokens and adaLN class embedding included: Wan2.1 is text-conditioned).
OUR_EXTRAS = ("negative_context", "label_embedding", CLASS_EMBEDDER_KEY)


class WanCheckpointError(ValueError):
    """A checkpoint that does not fit the network, with every missing, unexpected and mis-shaped key."""


# ----------------------------------------------------------------------------------------------------------
# Key maps. Module maps rename a module path (its .weight/.bias follow); parameter maps rename one tensor.

_TOP_MODULES = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "patch_embedding": "patch_embedding",
    "head.head": "proj_out",
}
_TOP_PARAMS = {"head.modulation": "scale_shift_table"}
_BLOCK_MODULES = {
    **{f"{wan}.{a}": f"{ours}.{b}"
       for wan, ours in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "norm3": "norm2",                       # Wan's affine cross-attention norm is called norm3 there
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, modules: dict[str, str], params: dict[str, str]) -> str | None:
    if key in params:
        return params[key]
    module, _, leaf = key.rpartition(".")
    if module in modules and leaf in ("weight", "bias"):
        return f"{modules[module]}.{leaf}"
    return None


def _map_key(key: str, to_ours: bool) -> str | None:
    """One key between the original Wan layout and ours; None if it has no counterpart."""
    inv = (lambda d: d) if to_ours else (lambda d: {v: k for k, v in d.items()})
    m = _BLOCK_KEY.match(key)
    if m:
        rest = _rename(m.group(2), inv(_BLOCK_MODULES), inv(_BLOCK_PARAMS))
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    return _rename(key, inv(_TOP_MODULES), inv(_TOP_PARAMS))


def original_to_ours(key: str) -> str | None:
    return _map_key(key, to_ours=True)


def ours_to_original(key: str) -> str | None:
    return _map_key(key, to_ours=False)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> Layout:
    keys = list(state_dict)
    if any(k.startswith(("head.", "time_embedding.", "text_embedding.")) or ".self_attn." in k for k in keys):
        return "original"
    if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys):
        return "diffusers"
    raise WanCheckpointError(f"cannot tell the checkpoint layout from its keys (first: {keys[:5]}); "
                             "expected Wan2.1 original keys (blocks.N.self_attn.q.weight, head.head.weight) "
                             "or diffusers keys (blocks.N.attn1.to_q.weight, proj_out.weight)")


def convert_to_ours(state_dict: dict[str, torch.Tensor],
                    layout: Layout | Literal["auto"] = "auto") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a Wan checkpoint's keys to ours → (converted, keys that have no counterpart)."""
    state_dict = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}  # ComfyUI files
    layout = detect_layout(state_dict) if layout == "auto" else layout
    if layout == "diffusers":
        return dict(state_dict), []
    out, unmapped = {}, []
    for k, v in state_dict.items():
        new = original_to_ours(k)
        if new is None:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped


def convert_from_ours(state_dict: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Our keys → the given Wan layout; our-only state (negative context) is dropped."""
    weights = {k: v for k, v in state_dict.items() if k not in OUR_EXTRAS}
    if "label_embedding" in state_dict or CLASS_EMBEDDER_KEY in state_dict:
        raise ValueError("a class-conditional network (model.num_classes > 0) has no Wan2.1 layout: its "
                         "label embeddings would be lost; export text-conditioned networks only")
    if layout == "diffusers":
        return weights
    out = {}
    for k, v in weights.items():
        new = ours_to_original(k)
        if new is None:
            raise ValueError(f"parameter {k!r} has no counterpart in the original Wan2.1 layout")
        out[new] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw little-endian bytes. Small enough to own, and it keeps export dependency-free.

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("the safetensors reader/writer here assumes a little-endian machine")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    _check_little_endian()
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise WanCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            if t.numel() * t.element_size() != end - begin:
                raise WanCheckpointError(f"{path}: tensor {name!r} byte range does not match its shape")
            f.seek(base + begin)
            if end > begin:
                f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))  # read straight into the tensor
            out[name] = t
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    _check_little_endian()
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # the format pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


# ----------------------------------------------------------------------------------------------------------
# Reading a checkpoint: a file, a sharded index, or a folder holding either (diffusers: also transformer/)

def _weights_in_folder(folder: Path) -> Path:
    for candidate in (folder, folder / "transformer"):
        for name in (f"{WEIGHTS_NAME}.safetensors.index.json", f"{WEIGHTS_NAME}.safetensors"):
            if (candidate / name).is_file():
                return candidate / name
        shards = sorted(candidate.glob("*.safetensors.index.json")) or sorted(candidate.glob("*.safetensors"))
        if len(shards) == 1:
            return shards[0]
    raise WanCheckpointError(f"no Wan weights in {folder}: expected {WEIGHTS_NAME}.safetensors or "
                             f"{WEIGHTS_NAME}.safetensors.index.json (here or under transformer/)")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Wan checkpoint, keys as stored (no renaming)."""
    path = Path(path)
    if not path.exists():
        raise WanCheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = _weights_in_folder(path)
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(path.parent / shard))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise WanCheckpointError(f"{path}: the index lists tensors no shard holds: {missing[:10]}")
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    raise WanCheckpointError(f"{path}: unknown checkpoint format (use .safetensors, an index .json or .pt)")


def read_config(path: str | Path) -> dict | None:
    """The config.json beside the weights (either layout), or None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "config.json", folder / "transformer" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


# ----------------------------------------------------------------------------------------------------------
# Loading into a network

def _shape_hint(state_dict: dict[str, torch.Tensor], net: nn.Module) -> str:
    w = state_dict.get("proj_out.weight")
    if w is None or not hasattr(net, "cfg") or w.shape[1] == net.cfg.dim:
        return ""
    return (f"\nThe checkpoint has width dim={w.shape[1]} but the network has model.dim={net.cfg.dim}: use the "
            "preset for that size (experiments/wan21_t2v_1p3b_rcm.yaml: 1536, wan21_t2v_14b_rcm.yaml: 5120).")


def check_state_dict(net: nn.Module, state_dict: dict[str, torch.Tensor], unmapped: list[str] = ()) -> None:
    """Raise WanCheckpointError listing every missing, unexpected and mis-shaped key (our naming)."""
    ours = net.state_dict()
    missing = [k for k in ours if k not in state_dict and k not in OUR_EXTRAS and k.split(".")[0] not in OUR_EXTRAS]
    unexpected = list(unmapped) + [k for k in state_dict if k not in ours]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(ours[k].shape)}"
              for k, v in state_dict.items() if k in ours and v.shape != ours[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            parts.append(f"  {len(items)} {title}:\n    " + "\n    ".join(items[:20]) + more)
    hint = ""
    if any(("img" in k or "image_embedder" in k or "add_k_proj" in k) for k in unexpected):
        hint = "\nImage-to-video (I2V) checkpoints are not supported: only Wan2.1 text-to-video."
    raise WanCheckpointError("checkpoint does not match the network:\n" + "\n".join(parts) + hint
                             + _shape_hint(state_dict, net))


@torch.no_grad()
def load_weights(net: nn.Module, source: str | Path | dict[str, torch.Tensor],
                 layout: Layout | Literal["auto"] = "auto") -> None:
    """Load a Wan2.1 checkpoint (path or state dict, either layout) into `net`, strictly.

    Tensors are copied into the network's own dtypes (so a bf16 checkpoint fills the fp32 time path)."""
    raw = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict, unmapped = convert_to_ours(raw, layout)
    check_state_dict(net, state_dict, unmapped)
    net.load_state_dict(state_dict, strict=False)       # strictness checked above, with our extras allowed


# ----------------------------------------------------------------------------------------------------------
# Configs: ModelCfg ↔ the config.json of either layout

def model_cfg_from_config(config: dict, **overrides) -> ModelCfg:
    """ModelCfg from a diffusers (`WanTransformer3DModel`) or original (`WanModel`) config.json."""
    if "attention_head_dim" in config:                                   # diffusers
        if config.get("image_dim") or config.get("added_kv_proj_dim"):
            raise WanCheckpointError("image-to-video (I2V) Wan configs are not supported")
        fields = dict(in_channels=config["in_channels"], patch_size=list(config.get("patch_size", [1, 2, 2])),
                      dim=config["num_attention_heads"] * config["attention_head_dim"],
                      num_heads=config["num_attention_heads"], num_layers=config["num_layers"],
                      ffn_dim=config["ffn_dim"], freq_dim=config.get("freq_dim", 256),
                      text_dim=config.get("text_dim", 4096), eps=config.get("eps", 1e-6))
        out_channels = config.get("out_channels") or config["in_channels"]
    elif "num_heads" in config and "dim" in config:                      # original WanModel
        if config.get("model_type", "t2v") != "t2v":
            raise WanCheckpointError(f"Wan model_type={config['model_type']!r} is not supported (t2v only)")
        fields = dict(in_channels=config.get("in_dim", 16), patch_size=list(config.get("patch_size", [1, 2, 2])),
                      dim=config["dim"], num_heads=config["num_heads"], num_layers=config["num_layers"],
                      ffn_dim=config["ffn_dim"], freq_dim=config.get("freq_dim", 256),
                      text_dim=config.get("text_dim", 4096), eps=config.get("eps", 1e-6))
        out_channels = config.get("out_dim", fields["in_channels"])
    else:
        raise WanCheckpointError(f"not a Wan2.1 transformer config: keys {sorted(config)}")
    if out_channels != fields["in_channels"]:
        raise WanCheckpointError(f"out_channels={out_channels} differs from in_channels={fields['in_channels']}; "
                                 "the DiT predicts a velocity of the input's shape")
    return ModelCfg(kind="dit", **{**fields, **overrides})


def config_for_layout(cfg: ModelCfg, layout: Layout) -> dict:
    """The config.json that each layout's own loader expects."""
    if layout == "diffusers":
        return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1",
                "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
                "attention_head_dim": cfg.dim // cfg.num_heads, "in_channels": cfg.in_channels,
                "out_channels": cfg.in_channels, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim,
                "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "cross_attn_norm": True,
                "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": None,
                "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}
    return {"_class_name": "WanModel", "model_type": "t2v", "patch_size": list(cfg.patch_size),
            "text_len": 512, "in_dim": cfg.in_channels, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
            "freq_dim": cfg.freq_dim, "text_dim": cfg.text_dim, "out_dim": cfg.in_channels,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "window_size": [-1, -1],
            "qk_norm": True, "cross_attn_norm": True, "eps": cfg.eps}


def build_from_checkpoint(path: str | Path, dtype: str = "float32", **overrides) -> nn.Module:
    """A `WanDiT` shaped by the checkpoint's config.json, with its weights loaded."""
    from rcm_core.networks import (
        build_network,  # here: rcm_core.networks imports this module's package
    )

    config = read_config(path)
    if config is None:
        raise WanCheckpointError(f"no config.json beside {path}; build the network from a ModelCfg preset and "
                                 "call load_weights(net, path) instead")
    net = build_network(model_cfg_from_config(config, dtype=dtype, **overrides))
    load_weights(net, path)
    return net


# ----------------------------------------------------------------------------------------------------------
# Export

def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


@torch.no_grad()
def export(source: nn.Module | dict[str, torch.Tensor], out_dir: str | Path, *, layout: Layout,
           cfg: ModelCfg | None = None, dtype: torch.dtype | None = None,
           max_shard_bytes: int = 10 * 2**30) -> list[Path]:
    """Write a network (e.g. the student's EMA weights) as a Wan2.1 checkpoint folder in `layout`:
    `config.json` plus `diffusion_pytorch_model.safetensors`, or numbered shards and their
    `.safetensors.index.json` when larger than `max_shard_bytes`. Returns the files written."""
    if isinstance(source, nn.Module):
        cfg = cfg or getattr(source, "cfg", None)
        state_dict = source.state_dict()
    else:
        state_dict = source
    tensors = convert_from_ours(state_dict, layout)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if cfg is not None:
        (out_dir / "config.json").write_text(json.dumps(config_for_layout(cfg, layout), indent=2) + "\n")
        written.append(out_dir / "config.json")
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(shards[0], out_dir / f"{WEIGHTS_NAME}.safetensors")
        return written + [out_dir / f"{WEIGHTS_NAME}.safetensors"]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, out_dir / name)
        weight_map.update({k: name for k in shard})
        written.append(out_dir / name)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = out_dir / f"{WEIGHTS_NAME}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return written + [index]


__all__ = [
    "WanCheckpointError",
    "build_from_checkpoint",
    "check_state_dict",
    "config_for_layout",
    "convert_from_ours",
    "convert_to_ours",
    "detect_layout",
    "export",
    "load_weights",
    "model_cfg_from_config",
    "original_to_ours",
    "ours_to_original",
    "read_checkpoint",
    "read_config",
    "read_safetensors",
    "write_safetensors",
]
