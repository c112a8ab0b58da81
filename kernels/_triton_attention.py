"""Triton kernels: fused attention forward + JVP (one online-softmax pass) and an FA2-style backward.

Only `@triton.jit` functions live here; launchers, dispatch, autotuning and autograd are in
`kernels/attention.py`. That module loads this file twice (once compiled for the GPU, once under the
Triton interpreter) because `triton.jit` chooses its mode when it decorates, and tests switch
`TRITON_INTERPRET=1` on at call time. Test: `pytest tests/test_kernels.py`.

Layout: every tensor is [B, H, L, D] with unit stride on D (the launcher guarantees it); other strides
are arbitrary, so permuted views of a packed qkv tensor need no copy.

Forward + JVP algebra (see shared/reference/jvp_attention.md §2). Per query row we keep, in exp2 units,
  m (running max), l = Σ p̃, acc = Σ p̃·v, acc_t = Σ p̃·(ṡ·v + v̇), r = Σ p̃·ṡ
and finish with o = acc/l, μ = r/l, ȯ = acc_t/l − μ·o, lse = m + log l, lse_t = μ. Choices that save work:
  * ONE tangent accumulator: P̃·V̇ and (P̃⊙Ṡ)·V are chained into the same fp32 accumulator (rCM keeps two),
    saving BLOCK_M×D fp32 registers, the second rescale and one add at the end.
  * Ṡ = Q̇Kᵀ + QK̇ᵀ is likewise two dots chained into one accumulator, i.e. one GEMM over the doubled inner
    dimension [Q̇ | Q]·[K | K̇]ᵀ without materialising the concatenation (wgmma chains the K-loop anyway).
  * Ṡ stays in natural units (scale applied once per tile), while the primal exponent uses scale·log2(e)
    and exp2: μ and the P̃⊙Ṡ product need the true tangent logits.
  * No normalisation inside the loop: all four running sums share the factor exp2(−m), so one α rescales
    them and the division by l happens once at the end (DMF renormalises every step; that costs more).
"""
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # a plain annotated global is rejected by the GPU compiler
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns (triton#11584), so it gets fp32 operands; the GPU keeps
    # the tensor-core dtype. PREC is "ieee" for fp32 inputs so fp32 stays fp32 (not tf32) on the GPU.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, n_rows, D, EVEN_R: tl.constexpr, EVEN_D: tl.constexpr):
    # A [rows, BLOCK_D] tile; out-of-range rows and padded head-dim columns read as 0 (finite), which keeps
    # both the scores and the tangent scores finite on ragged tails.
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if EVEN_R and EVEN_D:
        return tl.load(ptrs)
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, x, offs_r, offs_d, stride_r, n_rows, D, EVEN_R: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if EVEN_R and EVEN_D:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < D))


@triton.jit
def _key_valid(MASK, offs_n, LK, HAS_MASK: tl.constexpr):
    # Keys past the ragged end, and keys the padding mask turns off, are invalid.
    valid = offs_n < LK
    if HAS_MASK:
        valid = valid & (tl.load(MASK + offs_n, mask=offs_n < LK, other=0) != 0)
    return valid


@triton.jit
def _attn_fwd_jvp(Q, K, V, QT, KT, VT, MASK, O, OT, LSE, LSET,
                  s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  s_tqb, s_tqh, s_tqm, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn, s_mb,
                  H, LQ, LK, D, scale, LQ_KEY, LK_KEY,
                  HAS_TANGENT: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """One program = BLOCK_M query rows of one (batch, head); streams all key blocks once."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K_base = K + b * s_kb + h * s_kh
    V_base = V + b * s_vb + h * s_vh
    KT_base = KT + b * s_tkb + h * s_tkh
    VT_base = VT + b * s_tvb + h * s_tvh
    MASK_base = MASK + b * s_mb
    q = _load_rows(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_qm, LQ, D, EVEN_M, EVEN_D)
    if HAS_TANGENT:
        qt = _load_rows(QT + b * s_tqb + h * s_tqh, offs_m, offs_d, s_tqm, LQ, D, EVEN_M, EVEN_D)
    qk_scale = scale * _LOG2E
    # Finite start for m: a row whose keys are all masked then gives p = exp2(-inf) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    NEED_KMASK: tl.constexpr = HAS_MASK or (not EVEN_N)
    for start_n in range(0, LK, BLOCK_N):
        offs_kn = start_n + offs_n
        k = _load_rows(K_base, offs_kn, offs_d, s_kn, LK, D, EVEN_N, EVEN_D)
        v = _load_rows(V_base, offs_kn, offs_d, s_vn, LK, D, EVEN_N, EVEN_D)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC) * qk_scale
        if NEED_KMASK:
            valid = _key_valid(MASK_base, offs_kn, LK, HAS_MASK)
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lp = p.to(k.dtype)
        acc = _dot(p_lp, v, acc * alpha[:, None], UPCAST, PREC)
        if HAS_TANGENT:
            kt = _load_rows(KT_base, offs_kn, offs_d, s_tkn, LK, D, EVEN_N, EVEN_D)
            vt = _load_rows(VT_base, offs_kn, offs_d, s_tvn, LK, D, EVEN_N, EVEN_D)
            # Ṡ = Q̇Kᵀ + QK̇ᵀ: one accumulator over the doubled inner dimension.
            st = _dot(qt, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC)
            st = _dot(q, tl.trans(kt), st, UPCAST, PREC)
            if NEED_KMASK:
                st = tl.where(valid[None, :], st, 0.0)   # Ṡ = 0 off the valid keys: 0·(garbage) can be NaN
            hm = p * (st * scale)                        # P̃⊙Ṡ in natural units
            r_i = r_i * alpha + tl.sum(hm, 1)
            # P̃·V̇ + (P̃⊙Ṡ)·V into ONE accumulator. Casting P̃⊙Ṡ to the input dtype is the largest bf16
            # rounding in the kernel (jvp_attention.md §2); it is what a bf16 PyTorch JVP does too.
            acc_t = _dot(p_lp, vt, acc_t * alpha[:, None], UPCAST, PREC)
            acc_t = _dot(hm.to(k.dtype), v, acc_t, UPCAST, PREC)
        m_i = m_new
    # Fully masked rows (l = 0) give o = ȯ = 0 and lse = -inf (the right weight for merging partials).
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o = acc * inv_l[:, None]
    o_base = pid_bh * LQ * D
    _store_rows(O + o_base, o.to(O.dtype.element_ty), offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D)
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    if EVEN_M:
        tl.store(LSE + pid_bh * LQ + offs_m, lse)
    else:
        tl.store(LSE + pid_bh * LQ + offs_m, lse, mask=offs_m < LQ)
    if HAS_TANGENT:
        mu = r_i * inv_l                       # μ = Σ P·Ṡ, also the tangent of the log-sum-exp
        ot = acc_t * inv_l[:, None] - mu[:, None] * o
        _store_rows(OT + o_base, ot.to(OT.dtype.element_ty), offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D)
        if EVEN_M:
            tl.store(LSET + pid_bh * LQ + offs_m, mu)
        else:
            tl.store(LSET + pid_bh * LQ + offs_m, mu, mask=offs_m < LQ)


@triton.jit
def _row_stats(LSE, DELTA, offs_m, LQ):
    # lse in exp2 units; rows past the end (and fully masked rows, lse = -inf) get +inf so that p = 0 there.
    lse = tl.load(LSE + offs_m, mask=offs_m < LQ, other=float("inf")) * _LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + offs_m, mask=offs_m < LQ, other=0.0)
    return lse, delta


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, MASK, LSE, DELTA, DK, DV,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb,
                   H, LQ, LK, D, scale, LQ_KEY, LK_KEY,
                   HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """dK, dV for BLOCK_N keys: stream query blocks, recompute Pᵀ from the saved lse (FA2 backward).
    dO is contiguous [B, H, LQ, D]; DELTA = rowsum(dO⊙O) − dlse, so a gradient reaching lse is exact too."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * s_kb + h * s_kh, offs_n, offs_d, s_kn, LK, D, EVEN_N, EVEN_D)
    v = _load_rows(V + b * s_vb + h * s_vh, offs_n, offs_d, s_vn, LK, D, EVEN_N, EVEN_D)
    valid = _key_valid(MASK + b * s_mb, offs_n, LK, HAS_MASK)
    Q_base = Q + b * s_qb + h * s_qh
    DO_base = DO + pid_bh * LQ * D
    qk_scale = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, LQ, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(Q_base, offs_m, offs_d, s_qm, LQ, D, EVEN_M, EVEN_D)
        do = _load_rows(DO_base, offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D)
        lse, delta = _row_stats(LSE + pid_bh * LQ, DELTA + pid_bh * LQ, offs_m, LQ)
        s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(valid[:, None], p_t, 0.0)
        dv = _dot(p_t.to(q.dtype), do, dv, UPCAST, PREC)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST, PREC)
    dk = dk * scale
    _store_rows(DK + pid_bh * LK * D, dk.to(DK.dtype.element_ty), offs_n, offs_d, D, LK, D, EVEN_N, EVEN_D)
    _store_rows(DV + pid_bh * LK * D, dv.to(DV.dtype.element_ty), offs_n, offs_d, D, LK, D, EVEN_N, EVEN_D)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, MASK, LSE, DELTA, DQ,
                 s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb,
                 H, LQ, LK, D, scale, LQ_KEY, LK_KEY,
                 HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """dQ for BLOCK_M query rows: stream key blocks (a separate pass, so no atomics are needed)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_qm, LQ, D, EVEN_M, EVEN_D)
    do = _load_rows(DO + pid_bh * LQ * D, offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D)
    lse, delta = _row_stats(LSE + pid_bh * LQ, DELTA + pid_bh * LQ, offs_m, LQ)
    K_base = K + b * s_kb + h * s_kh
    V_base = V + b * s_vb + h * s_vh
    qk_scale = scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(K_base, offs_n, offs_d, s_kn, LK, D, EVEN_N, EVEN_D)
        v = _load_rows(V_base, offs_n, offs_d, s_vn, LK, D, EVEN_N, EVEN_D)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if HAS_MASK or (not EVEN_N):
            p = tl.where(_key_valid(MASK + b * s_mb, offs_n, LK, HAS_MASK)[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(q.dtype), k, dq, UPCAST, PREC)
    dq = dq * scale
    _store_rows(DQ + pid_bh * LQ * D, dq.to(DQ.dtype.element_ty), offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D)
