"""Ulysses context (sequence) parallelism for the DiT, with forward-mode (JVP) support.

    .venv/bin/python -m pytest tests/test_parallel.py -q -k context

The tokens of one sample are split in equal contiguous slices over the ranks of a context-parallel (CP)
group; everything per token (patch embedding, norms, MLPs, cross-attention to the replicated text) runs on
the local slice. Only self-attention needs every token: an all-to-all turns q, k, v from sequence-split
[B, H, L/cp, D] into head-split [B, H/cp, L, D], attention runs locally on H/cp heads
(`kernels.attention`), and a second all-to-all turns the output back (DeepSpeed-Ulysses; rCM's
`MinimalA2AAttnOpWithT`, rcm_method.md §5.4). The output projection's result is all-gathered, so every rank
of the group holds the full prediction and computes the same (replicated) loss.

Tangents. Each collective here is an `autograd.Function` with a `jvp` rule. An all-to-all and an all-gather
are linear maps, so the tangent goes through the same collective as the primal: under `torch.func.jvp` the
q/k/v tangents travel through the all-to-all beside q/k/v, and the local attention differentiates in
forward mode (the Triton kernel's fused JVP on GPU, the PyTorch twin on CPU).

Gradients. Every rank of a CP group computes the same loss from the same gathered output. The backward of
the gather keeps only the rank's own slice and multiplies it by cp: each rank then holds cp × its share of
the gradient, so the ordinary average over all ranks (`rcm_core.parallel.sharding.sync_gradients`, or FSDP's
reduce-scatter over dp_shard × cp) yields Σ_shares = the full gradient, averaged over data-parallel ranks
only. This is why batch, noise and times must be identical inside a CP group (`share_within_cp`).

The model holds no sharding code: `apply_context_parallel` sets two hooks the DiT exposes,
`WanDiT.sequence_parallel` (shard tokens + RoPE tables, gather the output) and `WanAttention.attention_fn`
(the self-attention op), torchtitan style.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import kernels

# ----------------------------------------------------------------------------------------------------------
# Collectives that are differentiable in both modes

def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into n chunks along scatter_dim, send chunk j to group rank j, concatenate the received
    chunks (in rank order) along gather_dim."""
    n = dist.get_world_size(group)
    # all_to_all_single on a stacked [n, ...] buffer: gloo implements only this form (no list all_to_all).
    send = torch.stack(x.chunk(n, dim=scatter_dim))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all; linear, so its JVP is the all-to-all of the tangent and its VJP the inverse all-to-all."""

    @staticmethod
    def forward(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ctx.group, ctx.scatter_dim, ctx.gather_dim = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor, *_):
        return _all_to_all(x_t, ctx.group, ctx.scatter_dim, ctx.gather_dim)


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherReplicatedLoss(torch.autograd.Function):
    """All-gather along `dim` for an output whose loss is then computed identically on every rank.

    Backward keeps the rank's own slice times the group size (see the module docstring: averaging the
    gradients over the group then sums the per-rank shares). JVP: the all-gather of the tangent.
    """

    @staticmethod
    def forward(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        return _all_gather(x, group, dim)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.group, ctx.dim = inputs
        ctx.local = x.shape[inputs[2]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r, n = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.narrow(ctx.dim, r * ctx.local, ctx.local) * n, None, None

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor, *_):
        return _all_gather(x_t, ctx.group, ctx.dim)


def gather_replicated_loss(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    return _GatherReplicatedLoss.apply(x, group, dim)


# ----------------------------------------------------------------------------------------------------------
# The two model hooks

class _SharedHook:
    """Hooks hold a process group, which cannot be deep-copied; a copied model (EMA, student from teacher)
    shares the hook, which is right: the copy lives on the same ranks."""

    def __deepcopy__(self, memo):
        return self


class UlyssesAttention(_SharedHook):
    """Self-attention over the whole sequence from sequence-split q, k, v [B, H, L/cp, D]."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attend=None,
                 primal: str = "fused") -> torch.Tensor:
        """`attend(q, k, v)`: the block's self-attention of whole sequences (the DiT passes
        `causal.self_attention` bound to its layout, cache entry and `primal` = model.attention; without it,
        `kernels.attention` with `primal`). After the all-to-all each rank holds the whole sequence for its heads,
        so a block-causal or teacher-forcing layout and a KV cache (kept per rank for its heads) apply unchanged:
        no chunk boundary has to fall on a rank boundary. Passed in, not imported: parallel sits below networks."""
        attend = attend or (lambda q, k, v: kernels.attention(q, k, v, primal=primal))
        # One all-to-all for q, k and v together (and one for their three tangents under JVP).
        qkv = all_to_all(torch.stack([q, k, v]), self.group, scatter_dim=2, gather_dim=3)   # [3, B, H/cp, L, D]
        o = attend(qkv[0], qkv[1], qkv[2])
        return all_to_all(o, self.group, scatter_dim=2, gather_dim=1)                      # [B, H, L/cp, D]


class SequenceShard(_SharedHook):
    """`WanDiT.sequence_parallel`: keep this rank's contiguous token slice, gather the output back."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def _slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        L = x.shape[dim]
        if L % self.size:
            raise ValueError(f"{L} latent tokens cannot be split over a context-parallel group of {self.size}; "
                             f"see rcm_core.parallel.mesh.legal_cp_sizes")
        n = L // self.size
        return x.narrow(dim, self.rank * n, n)

    def shard(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """tokens [B, L, dim], RoPE cos/sin [L, hd/2] → this rank's slice of both (positions stay global)."""
        return self._slice(tokens, 1), (self._slice(rope[0], 0), self._slice(rope[1], 0))

    def shard_frames(self, per_frame: torch.Tensor) -> torch.Tensor:
        """[B, F, …] per-frame modulation (per-frame times: causal teacher forcing, diffusion forcing) → this rank's
        frames. The token slices then hold whole frames, which the DiT's per-frame adaLN view needs."""
        if per_frame.shape[1] % self.size:
            raise ValueError(f"{per_frame.shape[1]} latent frames (per-frame times) cannot be split over a "
                             f"context-parallel group of {self.size}: use a parallel.cp that divides them "
                             f"(teacher forcing packs 2·T frames)")
        return self._slice(per_frame, 1)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """[B, L/cp, ·] → [B, L, ·] on every rank of the group."""
        return gather_replicated_loss(out, self.group, dim=1)


def apply_context_parallel(net: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Install Ulysses CP on a `WanDiT` in place (a group of size 1 leaves it untouched)."""
    if dist.get_world_size(group) == 1:
        return net
    heads = net.cfg.num_heads
    if heads % dist.get_world_size(group):
        raise ValueError(f"model.num_heads={heads} is not divisible by the context-parallel size "
                         f"{dist.get_world_size(group)}")
    net.sequence_parallel = SequenceShard(group)
    attention = UlyssesAttention(group)
    for block in net.blocks:
        block.attn1.attention_fn = attention        # self-attention only: cross-attention keys are replicated
    return net


def remove_context_parallel(net: nn.Module) -> nn.Module:
    net.sequence_parallel = None
    for block in net.blocks:
        block.attn1.attention_fn = None
    return net


def share_within_cp(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Broadcast tensors in place from the group's first rank, so a CP group trains on one sample set
    (use it for a batch read by one reader per CP group)."""
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
