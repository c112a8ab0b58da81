"""Network backbones: `build_network(cfg.model)` → a raw network with the common interface

    out = net(x, timestep, cond)        # x [B, C, T, H, W], timestep [B] raw time (Wan: 1000·s), out like x
    cond = net.null_cond(B, device)     # the CFG unconditional condition (null label / negative context)

`cond` is int64 labels [B] when `model.num_classes > 0`, else a context [B, L, text_dim] (DiT) or None (MLP).
kind="dit" is the Wan2.1-layout video DiT (`dit.WanDiT`), kind="mlp" a residual MLP for vector toys.
Wan2.1 checkpoints load and export through `rcm_core.networks.wan_io`.

    .venv/bin/python -m pytest tests/test_networks.py -q
"""
from __future__ import annotations

import torch
from torch import nn

from rcm_core.config import ModelCfg
from rcm_core.networks.dit import KEEP_FP32, WanDiT, check_label_path
from rcm_core.networks.mlp import ResidualMLP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cast_network(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters and buffers to `dtype`, keeping the time path and modulation tables (KEEP_FP32) in
    fp32 when `dtype` is narrower (Wan's mixed-precision layout, rCM §2.4/§2.5)."""
    net.to(dtype)
    if compute_is_narrow(dtype):
        for name, module in net.named_modules():
            if any(name.endswith(k) for k in KEEP_FP32):
                module.float()
        for name, param in net.named_parameters():
            if name.split(".")[-1] == "scale_shift_table":
                param.data = param.data.float()
    return net


def compute_is_narrow(dtype: torch.dtype) -> bool:
    return torch.finfo(dtype).bits < 32


def build_network(cfg: ModelCfg) -> nn.Module:
    """The raw network for `cfg` (on the current default device, e.g. under `with torch.device('meta')`)."""
    if cfg.kind == "dit":
        net: nn.Module = WanDiT(cfg)
    elif cfg.kind == "mlp":
        net = ResidualMLP(cfg)
    else:
        raise ValueError(f"model.kind={cfg.kind!r}: allowed values are 'dit', 'mlp'")
    return cast_network(net, DTYPES[cfg.dtype])


__all__ = ["DTYPES", "ResidualMLP", "WanDiT", "build_network", "cast_network", "check_label_path"]
