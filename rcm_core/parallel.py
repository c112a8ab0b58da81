"""Data parallelism for the rCM step, applied from outside the model (torchtitan style).

A student iteration runs several forward passes (the sCM F_θ and the DMD rollout's last step) before one
backward, and the JVP pass must see the plain module. So instead of wrapping the student in DDP, every rank
runs the whole step on its shard and gradients are averaged explicitly after backward: one flattened
all-reduce per module, which is what DDP does at the end of its bucketing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sync_gradients(module: nn.Module) -> None:
    """Average .grad over all ranks (no-op on one process). Missing grads count as zeros."""
    n = world_size()
    if n == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        k = g.numel()
        p.grad = flat[offset:offset + k].view_as(g).clone()
        offset += k


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s weights."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)
