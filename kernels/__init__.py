"""Attention kernels with forward-mode (JVP) support, each with a pure-PyTorch twin of the same signature.

`attention(q, k, v, *, scale=None, key_padding_mask=None, primal="fused") -> o` and
`attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, key_padding_mask=None, return_lse=False) -> (o, o_t[, lse, lse_t])`,
tensors laid out [batch, heads, seq, head_dim]; key_padding_mask is bool [batch, seq_k], True = attend.
Both run the Triton kernels (kernels/_triton_attention.py) on CUDA and under TRITON_INTERPRET=1, and the
PyTorch twins (kernels/reference.py) otherwise. `merge_attention_partials` merges results over key blocks.
Test: `pytest tests/test_kernels.py`; GPU: `pytest -m gpu tests/test_kernels.py`; bench: `python -m kernels.bench`.
"""
from kernels.flash_jvp import (
           PRIMAL_BACKENDS,
           AttnPartial,
           attention,
           attention_jvp,
           has_tangent,
           merge_attention_partials,
           use_triton,
)
from kernels.reference import attention_jvp_lse_ref, attention_jvp_ref, attention_ref

__all__ = [
           "PRIMAL_BACKENDS",
           "AttnPartial",
           "attention",
           "attention_jvp",
           "attention_jvp_lse_ref",
           "attention_jvp_ref",
           "attention_ref",
           "has_tangent",
           "merge_attention_partials",
           "use_triton",
]
