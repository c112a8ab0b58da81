"""PyTorch twins of the attention kernels: plain softmax attention and its forward-mode tangent.

These are the references every kernel is checked against (in float64) and the fallback used on CPU.
They materialise the [Lq, Lk] score matrix, so they are for tests and small shapes only.
Layout is [batch, heads, seq, head_dim] throughout.
"""
from __future__ import annotations

import math

import torch


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float | None,
            key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return s


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    # A fully masked row has no valid key: return zeros instead of NaN (the kernels do the same).
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """o = softmax(scale·q kᵀ) v, differentiable in both modes through plain torch ops."""
    return torch.matmul(_softmax_rows(_scores(q, k, scale, key_padding_mask)), v)


def attention_jvp_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, *,
                      scale: float | None = None,
                      key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, o_t) by the closed form o_t = P v_t + (P⊙S_t) v − diag(rowsum(P⊙S_t)) o (jvp_attention.md §2)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = _softmax_rows(_scores(q, k, scale, key_padding_mask))
    s_t = (torch.matmul(q_t, k.transpose(-1, -2)) + torch.matmul(q, k_t.transpose(-1, -2))) * scale
    h = p * s_t                                   # zero wherever p is zero, masked keys included
    o = torch.matmul(p, v)
    o_t = torch.matmul(p, v_t) + torch.matmul(h, v) - h.sum(-1, keepdim=True) * o
    return o, o_t


def attention_jvp_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, *,
                          scale: float | None = None, key_padding_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_t, lse, lse_t): the twin of `attention_jvp(..., return_lse=True)`.

    lse = logsumexp_j S_ij in fp32 or wider (-inf on fully masked rows) and its tangent lse_t = Σ_j P_ij·Ṡ_ij, the pair
    that lets partial results over key blocks be merged exactly (kernels.merge_attention_partials).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = _scores(q, k, scale, key_padding_mask)
    p = _softmax_rows(s)
    s_t = (torch.matmul(q_t, k.transpose(-1, -2)) + torch.matmul(q, k_t.transpose(-1, -2))) * scale
    h = p * s_t
    o = torch.matmul(p, v)
    lse_t = h.sum(-1)
    o_t = torch.matmul(p, v_t) + torch.matmul(h, v) - lse_t[..., None] * o
    acc = torch.promote_types(s.dtype, torch.float32)     # fp32 for fp16/bf16, float64 stays float64
    lse = torch.logsumexp(s.to(acc), dim=-1)
    return o, o_t, lse, lse_t.to(acc)
