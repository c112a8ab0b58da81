"""Small residual MLP for vector toy problems, with the DiT's forward / null_cond interface.

    .venv/bin/python -m pytest tests/test_networks.py -q -k mlp

x is [B, C, T, H, W] and is flattened per sample, so `model.in_channels` is the flattened size C·T·H·W
(for a vector toy x is [B, C, 1, 1, 1] and in_channels = C). The timestep is the raw network time on Wan's
scale (e.g. 1000·s), embedded with the same sinusoid as the DiT. Labels use the DiT's convention: int64 [B]
with index num_classes = the CFG null label; `cond=None` means the null label (or no conditioning when
num_classes = 0). Each block is adaLN-modulated by time + label; modulation and the output projection start at
zero (adaLN-zero), so the network starts as the zero function with identity blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rcm_core.config import ModelCfg
from rcm_core.networks.layers import (
    Linear,
    TimestepEmbedder,
    compute_dtype,
    no_autocast,
    sinusoidal_embedding,
)


class ResBlock(nn.Module):
    """h + gate·W2 SiLU(W1 (LN(h)·(1 + scale) + shift)), with (shift, scale, gate) from the embedding."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.fc1 = Linear(hidden, 4 * hidden)
        self.fc2 = Linear(4 * hidden, hidden)
        self.modulation = Linear(hidden, 3 * hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(emb)).chunk(3, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        return h + gate * self.fc2(F.silu(self.fc1(y)))


class ResidualMLP(nn.Module):
    def __init__(self, cfg: ModelCfg):
        super().__init__()
        self.cfg = cfg
        self.in_proj = Linear(cfg.in_channels, cfg.hidden)
        self.time_embedder = TimestepEmbedder(cfg.freq_dim, cfg.hidden)
        if cfg.num_classes > 0:
            self.label_embedding = nn.Embedding(cfg.num_classes + 1, cfg.hidden)
        self.blocks = nn.ModuleList(ResBlock(cfg.hidden) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.hidden, elementwise_affine=False)
        self.out_proj = Linear(cfg.hidden, cfg.in_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:                       # adaLN-zero: gates 0 → identity blocks
            nn.init.zeros_(block.modulation.weight)
        nn.init.zeros_(self.out_proj.weight)
        if hasattr(self, "label_embedding"):
            nn.init.normal_(self.label_embedding.weight, std=1.0)

    def null_cond(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The CFG null label (index num_classes), or None for an unconditional model."""
        if self.cfg.num_classes <= 0:
            return None
        return torch.full((batch_size,), self.cfg.num_classes, dtype=torch.long, device=device)

    def _embedding(self, timestep: torch.Tensor, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        dt = compute_dtype(self.time_embedder.linear_1.weight.dtype)
        with no_autocast(timestep.device):
            emb = self.time_embedder(sinusoidal_embedding(timestep.to(dt), self.cfg.freq_dim))
        if self.cfg.num_classes > 0:
            labels = self.null_cond(batch, timestep.device) if cond is None else cond
            if torch.is_floating_point(labels) or labels.shape != (batch,):
                raise ValueError(f"cond must be int64 labels of shape [B]=[{batch}] or None, "
                                 f"got {labels.dtype} {tuple(labels.shape)}")
            emb = emb + self.label_embedding(labels).to(emb.dtype)
        elif cond is not None:
            raise ValueError("model.num_classes=0: this MLP is unconditional, pass cond=None")
        return emb

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, ...] with C·T·H·W = in_channels, timestep [B] → output of x's shape and dtype."""
        B = x.shape[0]
        if math.prod(x.shape[1:]) != self.cfg.in_channels:
            raise ValueError(f"x of shape {tuple(x.shape)} has {math.prod(x.shape[1:])} features per sample; "
                             f"model.in_channels={self.cfg.in_channels} (the flattened C·T·H·W) must match")
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep must have shape [B]=[{B}], got {tuple(timestep.shape)}")
        dtype = self.in_proj.weight.dtype
        emb = self._embedding(timestep, cond, B)
        h = self.in_proj(x.reshape(B, -1).to(dtype))
        emb = emb.to(dtype)
        for block in self.blocks:
            h = block(h, emb)
        out = self.out_proj(self.norm_out(h))
        return out.reshape(x.shape).to(x.dtype)
