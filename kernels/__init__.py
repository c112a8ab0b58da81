"""Attention kernels with forward-mode (JVP) support, each with a pure-PyTorch twin of the same signature.

`attention(q, k, v, *, scale=None, key_padding_mask=None, chunk_sizes=None, primal="fused") -> o` and
`attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, key_padding_mask=None, chunk_sizes=None, return_lse=False)
-> (o, o_t[, lse, lse_t])`, tensors laid out [batch, heads, seq, head_dim]; key_padding_mask is bool
[batch, seq_k], True = attend. chunk_sizes (block-causal, issue 30): a tuple of positive ints, the token counts
of consecutive chunks, summing to the sequence length, with q and k the same sequence; query tokens of chunk i
attend key tokens of chunks 0..i; None = full attention. A wrong sum or Lq ≠ Lk raises a one-line ValueError.
Forward, forward-mode JVP (torch.func.jvp / forward_ad through `attention`) and backward all take it; the Triton
kernels skip the key tiles a query tile cannot see and mask only the tiles a chunk boundary crosses.
`block_causal_mask(chunk_sizes)` is the same pattern as a bool [L, L] matrix (True = attend).
primal (`PRIMAL_BACKENDS`, issue 28): "fused" | "sdpa_grad" | "sdpa" sends tangent-free calls to PyTorch SDPA;
calls with a tangent (`has_tangent`) and block-causal calls always run the fused kernel.
Both run the Triton kernels (kernels/_triton_attention.py) on CUDA and under TRITON_INTERPRET=1, and the
PyTorch twins (kernels/reference.py) otherwise; on sm_90+ GPUs the kernels stream their tiles through TMA tensor
descriptors (RCM_KERNELS_TMA=auto|off|on, kernels/flash_jvp.py); on sm_90 the backward passes may also
autotune warp-specialised tiles where every load can be a descriptor load (RCM_KERNELS_BWD_WS=auto|off).
`merge_attention_partials` merges results over key blocks. `prepare_compile()`, called before torch.compile traces
a caller of `attention`, keeps the fused path's graph break to the kernel call itself.
Test: `pytest tests/test_kernels.py`; GPU: `pytest -m gpu tests/test_kernels.py`; bench: `python -m kernels.bench`
(block-causal vs unmasked: `python -m kernels.bench --block-causal`).

Beside attention, `kernels.master_adamw` (imported by its user, `rcm_core.method.adamw`): the one-GPU master-weight
AdamW step (β₁ = 0) in one multi-tensor pass from bf16 gradients, with its twin `master_adamw_ref`.
"""
from kernels.flash_jvp import (
           PRIMAL_BACKENDS,
           AttnPartial,
           attention,
           attention_jvp,
           has_tangent,
           merge_attention_partials,
           prepare_compile,
           use_triton,
)
from kernels.reference import attention_jvp_lse_ref, attention_jvp_ref, attention_ref, block_causal_mask

__all__ = [
           "PRIMAL_BACKENDS",
           "AttnPartial",
           "attention",
           "attention_jvp",
           "attention_jvp_lse_ref",
           "attention_jvp_ref",
           "attention_ref",
           "block_causal_mask",
           "has_tangent",
           "merge_attention_partials",
           "prepare_compile",
           "use_triton",
]
