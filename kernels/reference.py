"""PyTorch twins of the attention kernels: plain softmax attention and its forward-mode tangent.

These are the references every kernel is checked against (in float64) and the fallback used on CPU.
They materialise the [Lq, Lk] score matrix, so they are for tests and small shapes only.
Layout is [batch, heads, seq, head_dim] throughout.

Block-causal attention (causal video students, issue 30): `chunk_sizes` = token counts of consecutive chunks
of one sequence (q and k the same tokens); a query in chunk i attends the keys of chunks 0..i. It composes with
`key_padding_mask` (both must allow a key). `check_chunk_sizes` is the one validation every path runs.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch


def _positive_ints(chunk_sizes: Sequence[int]) -> tuple[int, ...]:
    try:
        sizes = tuple(operator.index(c) for c in chunk_sizes)
    except TypeError:
        sizes = ()
    if not sizes or min(sizes) <= 0 or any(isinstance(c, bool) for c in chunk_sizes):
        raise ValueError(f"chunk_sizes {chunk_sizes!r}: need a non-empty tuple of positive ints (the token counts "
                         "of consecutive chunks)")
    return sizes


def check_chunk_sizes(chunk_sizes: Sequence[int] | None, lq: int, lk: int) -> tuple[int, ...] | None:
    """chunk_sizes as a tuple of positive ints summing to Lq = Lk, else a one-line ValueError naming the values."""
    if chunk_sizes is None:
        return None
    sizes = _positive_ints(chunk_sizes)
    if lq != lk:
        raise ValueError(f"chunk_sizes needs q and k over the same sequence, got Lq={lq}, Lk={lk} (block-causal "
                         "self-attention only; attend a KV cache with chunk_sizes=None)")
    if sum(sizes) != lq:
        raise ValueError(f"chunk_sizes {sizes} sum to {sum(sizes)}, but the sequence has {lq} tokens: make them "
                         "sum to the q/k length")
    return sizes


def block_causal_mask(chunk_sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """bool [L, L], True = attend: query token i sees key token j iff chunk(j) <= chunk(i)."""
    sizes = _positive_ints(chunk_sizes)
    chunk = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return chunk[None, :] <= chunk[:, None]


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None,
            key_padding_mask: torch.Tensor | None, chunk_sizes: Sequence[int] | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if check_chunk_sizes(chunk_sizes, q.shape[-2], k.shape[-2]) is not None:
        s = s.masked_fill(~block_causal_mask(chunk_sizes, s.device), float("-inf"))
    return s


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    # A fully masked row has no valid key: return zeros instead of NaN (the kernels do the same).
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                  key_padding_mask: torch.Tensor | None = None,
                  chunk_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """o = softmax(scale·q kᵀ) v, differentiable in both modes through plain torch ops."""
    return torch.matmul(_softmax_rows(_scores(q, k, scale, key_padding_mask, chunk_sizes)), v)


def attention_jvp_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, *,
                      scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                      chunk_sizes: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, o_t) by the closed form o_t = P v_t + (P⊙S_t) v − diag(rowsum(P⊙S_t)) o (jvp_attention.md §2)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = _softmax_rows(_scores(q, k, scale, key_padding_mask, chunk_sizes))
    s_t = (torch.matmul(q_t, k.transpose(-1, -2)) + torch.matmul(q, k_t.transpose(-1, -2))) * scale
    h = p * s_t                                   # zero wherever p is zero, masked keys included
    o = torch.matmul(p, v)
    o_t = torch.matmul(p, v_t) + torch.matmul(h, v) - h.sum(-1, keepdim=True) * o
    return o, o_t


def attention_jvp_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, *,
                          scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                          chunk_sizes: Sequence[int] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_t, lse, lse_t): the twin of `attention_jvp(..., return_lse=True)`.

    lse = logsumexp_j S_ij in fp32 or wider (-inf on fully masked rows) and its tangent lse_t = Σ_j P_ij·Ṡ_ij, the pair
    that lets partial results over key blocks be merged exactly (kernels.merge_attention_partials).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = _scores(q, k, scale, key_padding_mask, chunk_sizes)
    p = _softmax_rows(s)
    s_t = (torch.matmul(q_t, k.transpose(-1, -2)) + torch.matmul(q, k_t.transpose(-1, -2))) * scale
    h = p * s_t
    o = torch.matmul(p, v)
    lse_t = h.sum(-1)
    o_t = torch.matmul(p, v_t) + torch.matmul(h, v) - lse_t[..., None] * o
    acc = torch.promote_types(s.dtype, torch.float32)     # fp32 for fp16/bf16, float64 stays float64
    lse = torch.logsumexp(s.to(acc), dim=-1)
    return o, o_t, lse, lse_t.to(acc)
