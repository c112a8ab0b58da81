"""Triton kernels: fused attention forward + JVP (one online-softmax pass) and an FA2-style backward.

Only `@triton.jit` functions live here; launchers, dispatch, autotuning and autograd are in
`kernels/flash_jvp.py`. That module loads this file twice (once compiled for the GPU, once under the
Triton interpreter) because `triton.jit` chooses its mode when it decorates, and tests switch
`TRITON_INTERPRET=1` on at call time. Test: `pytest tests/test_kernels.py`.

Layout: every tensor is [B, H, L, D] with unit stride on D (the launcher guarantees it); other strides
are arbitrary, so permuted views of a packed qkv tensor need no copy.
Loads (TMA constexpr, issue 28): the tiles each loop streams (K, K̇, V, V̇ in the forward and dQ pass, Q and dO in
the dK/dV pass) come through TMA tensor descriptors when the launcher says so (sm_90+, 16-byte aligned), else
through pointers; `_row_source` / `_load_tile` hide which, and both read rows past the end as 0.

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
  * The row max is taken over the raw scores q·kᵀ and then scaled (scale > 0, checked by the launcher), so
    each score costs one FMA, s·scale·log2(e) − m, instead of a multiply before the max and the FMA after it.

Block-causal masks (HAS_CHUNKS, issue 30). CHUNK_END[i] is the end of token i's chunk and CHUNK_START[j] its
start, so query i sees keys j < CHUNK_END[i], and key j is seen by queries i ≥ CHUNK_START[j]; both arrays are
non-decreasing. A query tile therefore sees a key PREFIX: the key tiles below its first row's end are fully
visible (no mask at all), those up to its last row's end are partially visible (the only masked tiles), and the
rest are never loaded. The dK/dV pass is the mirror image over query tiles. The same two-loop split peels the
ragged last key tile off the unmasked kernel, so its full tiles skip the bounds masks too.
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
def _store_tile(base, x, start_r, offs_r, offs_d, n_rows, D, EVEN_R: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, DESC: tl.constexpr):
    # Rows [start_r, start_r + BLOCK_R) of a contiguous [n_rows, D] gradient. DESC (the warp-specialised passes):
    # one TMA store, which drops rows past n_rows. On sm_90 (Triton 3.6, H200 2026-12-05) the pointer store after
    # a warp-specialised loop wrote only the first consumer group's half of the tile: rows 64-127 of every
    # 128-row tile stayed as they were, and other buffers came out changed. The gradients are laid out as the
    # contiguous dO the launcher made, whose alignment WS_OK checked, so the descriptor's rows sit on 16 bytes.
    if DESC:
        tl.make_tensor_descriptor(base, shape=[n_rows, D], strides=[D, 1],
                                  block_shape=[BLOCK_R, BLOCK_D]).store([start_r, 0], x)
    else:
        _store_rows(base, x, offs_r, offs_d, D, n_rows, D, EVEN_R, EVEN_D)


@triton.jit
def _row_source(base, n_rows, D, stride_r, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    # Where a streamed [n_rows, D] operand of one (batch, head) is read from. TMA (sm_90+, issue 28): a tensor
    # descriptor, so each tile is one bulk copy into shared memory issued by one thread, with no per-element
    # address registers (the launcher checked the 16-byte alignment TMA needs). Otherwise the base pointer.
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, D], strides=[stride_r, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit
def _load_tile(src, start_r, offs_r, offs_d, stride_r, n_rows, D, EVEN_R: tl.constexpr, EVEN_D: tl.constexpr,
               TMA: tl.constexpr):
    # Rows [start_r, start_r + BLOCK_R) of a `_row_source`; offs_r is that range. Rows past n_rows and columns
    # past D read as 0 on both paths (TMA fills out-of-bounds elements with zeros).
    if TMA:
        return src.load([start_r, 0])
    else:
        return _load_rows(src, offs_r, offs_d, stride_r, n_rows, D, EVEN_R, EVEN_D)


@triton.jit
def _key_valid(MASK, offs_n, LK, HAS_MASK: tl.constexpr):
    # Keys past the ragged end, and keys the padding mask turns off, are invalid.
    valid = offs_n < LK
    if HAS_MASK:
        valid = valid & (tl.load(MASK + offs_n, mask=offs_n < LK, other=0) != 0)
    return valid


@triton.jit
def _tile_valid(MASK_base, offs_n, LK, CHUNK_END, offs_m, LQ, HAS_MASK: tl.constexpr, KEY_MASK: tl.constexpr,
                CHUNK_MASK: tl.constexpr):
    # [rows, keys] (or [1, keys]) validity of a score tile: the padding mask / ragged end (KEY_MASK) and the
    # block-causal prefix offs_n < CHUNK_END[row] (CHUNK_MASK). Only called on tiles that need one of them. The
    # rows' chunk ends are loaded here, per masked tile, rather than kept in registers through the unmasked loop
    # (which spilled more on sm_90 when they were).
    if CHUNK_MASK:
        row_end = tl.load(CHUNK_END + offs_m, mask=offs_m < LQ, other=0)
    if KEY_MASK:
        valid = _key_valid(MASK_base, offs_n, LK, HAS_MASK)[None, :]
        if CHUNK_MASK:
            valid = valid & (offs_n[None, :] < row_end[:, None])
    else:
        valid = offs_n[None, :] < row_end[:, None]
    return valid


@triton.jit
def _tile_bounds(CHUNK, n_rows, first, BLOCK: tl.constexpr):
    # The chunk bound of a tile's first and last row: the arrays are non-decreasing, so the tile's min and max.
    lo = tl.load(CHUNK + first)
    hi = tl.load(CHUNK + tl.minimum(first + BLOCK, n_rows) - 1)
    return lo, hi


@triton.jit
def _fwd_tile(q, qt, K_src, V_src, KT_src, VT_src, MASK_base, CHUNK_END, offs_m, LQ, start_n, offs_n, offs_d,
              m_i, l_i, r_i, acc, acc_t, s_kn, s_vn, s_tkn, s_tvn, LK, D, scale, qk_scale,
              HAS_TANGENT: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
              IN_BOUNDS: tl.constexpr, EVEN_D: tl.constexpr, KEY_MASK: tl.constexpr, CHUNK_MASK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """One key tile of the online-softmax forward (+ tangent) update. IN_BOUNDS: every key row exists."""
    offs_kn = start_n + offs_n
    k = _load_tile(K_src, start_n, offs_kn, offs_d, s_kn, LK, D, IN_BOUNDS, EVEN_D, TMA)
    v = _load_tile(V_src, start_n, offs_kn, offs_d, s_vn, LK, D, IN_BOUNDS, EVEN_D, TMA)
    # Raw scores q·kᵀ: the exp2 argument s·qk_scale − m is then one FMA per score (qk_scale > 0, so the scaled
    # row max of the raw scores is the row max of the scaled ones).
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC)
    if KEY_MASK or CHUNK_MASK:
        valid = _tile_valid(MASK_base, offs_kn, LK, CHUNK_END, offs_m, LQ, HAS_MASK, KEY_MASK, CHUNK_MASK)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_lp = p.to(k.dtype)
    acc = _dot(p_lp, v, acc * alpha[:, None], UPCAST, PREC)
    if HAS_TANGENT:
        kt = _load_tile(KT_src, start_n, offs_kn, offs_d, s_tkn, LK, D, IN_BOUNDS, EVEN_D, TMA)
        vt = _load_tile(VT_src, start_n, offs_kn, offs_d, s_tvn, LK, D, IN_BOUNDS, EVEN_D, TMA)
        # Ṡ = Q̇Kᵀ + QK̇ᵀ: one accumulator over the doubled inner dimension.
        st = _dot(qt, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC)
        st = _dot(q, tl.trans(kt), st, UPCAST, PREC)
        if KEY_MASK or CHUNK_MASK:
            st = tl.where(valid, st, 0.0)        # Ṡ = 0 off the valid keys: 0·(garbage) can be NaN
        hm = p * (st * scale)                    # P̃⊙Ṡ in natural units
        r_i = r_i * alpha + tl.sum(hm, 1)
        # P̃·V̇ + (P̃⊙Ṡ)·V into ONE accumulator. Casting P̃⊙Ṡ to the input dtype is the largest bf16
        # rounding in the kernel (jvp_attention.md §2); it is what a bf16 PyTorch JVP does too.
        acc_t = _dot(p_lp, vt, acc_t * alpha[:, None], UPCAST, PREC)
        acc_t = _dot(hm.to(k.dtype), v, acc_t, UPCAST, PREC)
    return m_new, l_i, r_i, acc, acc_t


@triton.jit
def _attn_fwd_jvp(Q, K, V, QT, KT, VT, MASK, CHUNK_END, O, OT, LSE, LSET,
                  s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  s_tqb, s_tqh, s_tqm, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn, s_mb,
                  H, LQ, LK, D, scale, LQ_KEY, LK_KEY,
                  HAS_TANGENT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CHUNKS: tl.constexpr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """One program = BLOCK_M query rows of one (batch, head); streams the key tiles it can see once."""
    pid_m = tl.program_id(0)
    if HAS_CHUNKS:
        # Later query tiles see more keys: launch them first so the short ones fill the tail of the grid.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K_src = _row_source(K + b * s_kb + h * s_kh, LK, D, s_kn, BLOCK_N, BLOCK_D, TMA)
    V_src = _row_source(V + b * s_vb + h * s_vh, LK, D, s_vn, BLOCK_N, BLOCK_D, TMA)
    KT_src = K_src
    VT_src = V_src
    if HAS_TANGENT:
        KT_src = _row_source(KT + b * s_tkb + h * s_tkh, LK, D, s_tkn, BLOCK_N, BLOCK_D, TMA)
        VT_src = _row_source(VT + b * s_tvb + h * s_tvh, LK, D, s_tvn, BLOCK_N, BLOCK_D, TMA)
    MASK_base = MASK + b * s_mb
    q = _load_rows(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_qm, LQ, D, EVEN_M, EVEN_D)
    qt = q
    if HAS_TANGENT:
        qt = _load_rows(QT + b * s_tqb + h * s_tqh, offs_m, offs_d, s_tqm, LQ, D, EVEN_M, EVEN_D)
    qk_scale = scale * _LOG2E
    # Finite start for m: a row whose keys are all masked then gives p = exp2(-inf) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_CHUNKS:
        lo_end, hi_end = _tile_bounds(CHUNK_END, LQ, pid_m * BLOCK_M, BLOCK_M)
    else:
        lo_end = LK                                        # every row sees every key
        hi_end = LK
    # Key tiles [0, n_full) are visible to every row of this tile; [n_full, hi_end) only in part.
    n_full = (lo_end // BLOCK_N) * BLOCK_N
    TAIL_KEY_MASK: tl.constexpr = HAS_MASK or (not HAS_CHUNKS)
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, r_i, acc, acc_t = _fwd_tile(
            q, qt, K_src, V_src, KT_src, VT_src, MASK_base, CHUNK_END, offs_m, LQ, start_n, offs_n, offs_d,
            m_i, l_i, r_i, acc, acc_t, s_kn, s_vn, s_tkn, s_tvn, LK, D, scale, qk_scale,
            HAS_TANGENT, HAS_MASK, UPCAST, PREC, True, EVEN_D, HAS_MASK, False, BLOCK_M, BLOCK_N, TMA)
    # Without chunks this is the ragged last tile (none when EVEN_N: then not even compiled); with chunks the
    # tiles a chunk boundary crosses, whose block-causal mask also covers keys past LK (chunk ends are <= LK).
    if HAS_CHUNKS or not EVEN_N:
        for start_n in range(n_full, hi_end, BLOCK_N):
            m_i, l_i, r_i, acc, acc_t = _fwd_tile(
                q, qt, K_src, V_src, KT_src, VT_src, MASK_base, CHUNK_END, offs_m, LQ, start_n, offs_n, offs_d,
                m_i, l_i, r_i, acc, acc_t, s_kn, s_vn, s_tkn, s_tvn, LK, D, scale, qk_scale,
                HAS_TANGENT, HAS_MASK, UPCAST, PREC, False, EVEN_D, TAIL_KEY_MASK, HAS_CHUNKS, BLOCK_M, BLOCK_N, TMA)
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
def _attn_bwd_delta(O, DO, DLSE, DELTA, LQ, D, s_stat, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr):
    """delta = rowsum(dO⊙O) − dlse for BLOCK_M rows of one (batch, head), in fp32 from the stored o and dO (both
    contiguous [B, H, LQ, D]): one read of each, where PyTorch's expression wrote and re-read two fp32 copies.
    DELTA's rows are s_stat apart (LQ, or LQ padded for the warp-specialised passes' descriptors)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + pid_bh * LQ * D, offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D).to(tl.float32)
    do = _load_rows(DO + pid_bh * LQ * D, offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * LQ + offs_m, mask=offs_m < LQ, other=0.0)
    tl.store(DELTA + pid_bh * s_stat + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _row_stats(LSE, DELTA, offs_m, LQ):
    # lse in exp2 units; rows past the end (and fully masked rows, lse = -inf) get +inf so that p = 0 there.
    lse = tl.load(LSE + offs_m, mask=offs_m < LQ, other=float("inf")) * _LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + offs_m, mask=offs_m < LQ, other=0.0)
    return lse, delta


@triton.jit
def _stats_source(STATS, pid_bh, LQ, s_stat, BLOCK_M: tl.constexpr, DESC: tl.constexpr):
    # One (batch, head)'s fp32 row statistics (lse or delta). On the warp-specialised path (whose compiler pass
    # takes no pointer load) a 1-D descriptor over rows s_stat apart, which the launcher pads to 16-byte multiples
    # (TMA's rule for a descriptor's base). The plain path indexes rows s_stat apart as well: under WS_OK the
    # autotuner also tries plain tiles, which read the same padded buffers (s_stat is LQ when WS_OK is off).
    if DESC:
        return tl.make_tensor_descriptor(STATS + pid_bh * s_stat, shape=[LQ], strides=[1], block_shape=[BLOCK_M])
    else:
        return STATS + pid_bh * s_stat


@triton.jit
def _load_stats(LSE_src, DELTA_src, start_m, offs_m, LQ, DESC: tl.constexpr):
    # Rows [start_m, start_m + BLOCK_M) of lse (in exp2 units) and delta. Through descriptors, rows past LQ read 0,
    # harmless there because their q and dO rows read 0 too (p = 1 times a zero dO row, ds = 1·(0 − 0)); that path
    # runs without mask or chunks, so no lse is -inf.
    if DESC:
        return LSE_src.load([start_m]) * _LOG2E, DELTA_src.load([start_m])
    else:
        return _row_stats(LSE_src, DELTA_src, offs_m, LQ)


@triton.jit
def _dkdv_tile(k, v, Q_src, DO_src, LSE_row, DELTA_row, CHUNK_END, start_m, offs_m0, offs_d, offs_n, key_ok,
               dk, dv, s_qm, LQ, D, qk_scale,
               HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, IN_BOUNDS: tl.constexpr,
               EVEN_D: tl.constexpr, CHUNK_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TMA: tl.constexpr, WS: tl.constexpr):
    """One query tile's contribution to dK, dV (Pᵀ recomputed from lse). key_ok: [keys] validity."""
    offs_m = start_m + offs_m0
    q = _load_tile(Q_src, start_m, offs_m, offs_d, s_qm, LQ, D, IN_BOUNDS, EVEN_D, TMA)
    do = _load_tile(DO_src, start_m, offs_m, offs_d, D, LQ, D, IN_BOUNDS, EVEN_D, TMA)
    lse, delta = _load_stats(LSE_row, DELTA_row, start_m, offs_m, LQ, WS)
    s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
               UPCAST, PREC) * qk_scale
    p_t = tl.math.exp2(s_t - lse[None, :])
    if CHUNK_MASK:
        row_end = tl.load(CHUNK_END + offs_m, mask=offs_m < LQ, other=0)
        p_t = tl.where(key_ok[:, None] & (offs_n[:, None] < row_end[None, :]), p_t, 0.0)
    elif HAS_MASK:
        # Only padding-masked keys need zeroing (their dK, dV rows are 0). Keys past LK, read as 0 rows, feed only
        # their own dK, dV rows, which are never stored: no select per score for them (issue 28).
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    dv = _dot(p_t.to(q.dtype), do, dv, UPCAST, PREC)
    dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST, PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, MASK, CHUNK_END, CHUNK_START, LSE, DELTA, DK, DV,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb,
                   H, LQ, LK, D, scale, LQ_KEY, LK_KEY, s_stat,
                   HAS_MASK: tl.constexpr, HAS_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
                   WS_OK: tl.constexpr, WS: tl.constexpr):
    """dK, dV for BLOCK_N keys: stream the query tiles that see them, recompute Pᵀ from the saved lse (FA2
    backward). dO is contiguous [B, H, LQ, D]; DELTA = rowsum(dO⊙O) − dlse, so a gradient reaching lse is
    exact too. With chunks, query tiles before the keys' chunk are skipped and only the tiles a chunk
    boundary crosses are masked.

    WS (a tile of the autotune space, only where the launcher says WS_OK: sm_90, no mask, no chunks, TMA-aligned
    operands; lse and delta rows s_stat apart): the query loop is warp-specialised by Triton's Hopper pass (a
    producer warp group issuing the loads, two consumer groups computing: FlashAttention-3's structure, issue
    28). That pass takes only descriptor loads in the kernel (Triton 3.6 fails to compile it with any pointer
    load, even one outside the loop), so WS reads K, V, lse and delta through descriptors too."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    WARP_SPEC: tl.constexpr = WS and WS_OK
    STREAM_TMA: tl.constexpr = TMA or WARP_SPEC
    if WARP_SPEC:
        k = _row_source(K + b * s_kb + h * s_kh, LK, D, s_kn, BLOCK_N, BLOCK_D, True).load([pid_n * BLOCK_N, 0])
        v = _row_source(V + b * s_vb + h * s_vh, LK, D, s_vn, BLOCK_N, BLOCK_D, True).load([pid_n * BLOCK_N, 0])
    else:
        k = _load_rows(K + b * s_kb + h * s_kh, offs_n, offs_d, s_kn, LK, D, EVEN_N, EVEN_D)
        v = _load_rows(V + b * s_vb + h * s_vh, offs_n, offs_d, s_vn, LK, D, EVEN_N, EVEN_D)
    key_ok = _key_valid(MASK + b * s_mb, offs_n, LK, HAS_MASK)
    Q_src = _row_source(Q + b * s_qb + h * s_qh, LQ, D, s_qm, BLOCK_M, BLOCK_D, STREAM_TMA)
    DO_src = _row_source(DO + pid_bh * LQ * D, LQ, D, D, BLOCK_M, BLOCK_D, STREAM_TMA)
    LSE_row = _stats_source(LSE, pid_bh, LQ, s_stat, BLOCK_M, WARP_SPEC)
    DELTA_row = _stats_source(DELTA, pid_bh, LQ, s_stat, BLOCK_M, WARP_SPEC)
    qk_scale = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query tiles [m_lo, m_full) see these keys in part (masked); [m_full, LQ) see them all.
    if HAS_CHUNKS:
        first_start, last_start = _tile_bounds(CHUNK_START, LK, pid_n * BLOCK_N, BLOCK_N)
        m_lo = (first_start // BLOCK_M) * BLOCK_M
        m_full = ((last_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    # The unmasked loop first: ptxas spilled more inside it (sm_90) when it came second.
    for start_m in tl.range(m_full, LQ, BLOCK_M, warp_specialize=WARP_SPEC):
        dk, dv = _dkdv_tile(k, v, Q_src, DO_src, LSE_row, DELTA_row, CHUNK_END, start_m, offs_m0, offs_d,
                            offs_n, key_ok, dk, dv, s_qm, LQ, D, qk_scale, HAS_MASK, UPCAST, PREC, EVEN_M, EVEN_D,
                            False, BLOCK_M, BLOCK_N, STREAM_TMA, WARP_SPEC)
    if HAS_CHUNKS:
        for start_m in range(m_lo, m_full, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, Q_src, DO_src, LSE_row, DELTA_row, CHUNK_END, start_m, offs_m0, offs_d,
                                offs_n, key_ok, dk, dv, s_qm, LQ, D, qk_scale, HAS_MASK, UPCAST, PREC, False,
                                EVEN_D, True, BLOCK_M, BLOCK_N, STREAM_TMA, False)
    dk = dk * scale
    _store_tile(DK + pid_bh * LK * D, dk.to(DK.dtype.element_ty), pid_n * BLOCK_N, offs_n, offs_d, LK, D, EVEN_N,
                EVEN_D, BLOCK_N, BLOCK_D, WARP_SPEC)
    _store_tile(DV + pid_bh * LK * D, dv.to(DV.dtype.element_ty), pid_n * BLOCK_N, offs_n, offs_d, LK, D, EVEN_N,
                EVEN_D, BLOCK_N, BLOCK_D, WARP_SPEC)


@triton.jit
def _dq_tile(q, do, lse, delta, K_src, V_src, MASK_base, CHUNK_END, offs_m, LQ, start_n, offs_n0, offs_d, dq,
             s_kn, s_vn, LK, D, qk_scale,
             HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, IN_BOUNDS: tl.constexpr,
             EVEN_D: tl.constexpr, KEY_MASK: tl.constexpr, CHUNK_MASK: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """One key tile's contribution to dQ."""
    offs_n = start_n + offs_n0
    k = _load_tile(K_src, start_n, offs_n, offs_d, s_kn, LK, D, IN_BOUNDS, EVEN_D, TMA)
    v = _load_tile(V_src, start_n, offs_n, offs_d, s_vn, LK, D, IN_BOUNDS, EVEN_D, TMA)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if KEY_MASK or CHUNK_MASK:
        p = tl.where(_tile_valid(MASK_base, offs_n, LK, CHUNK_END, offs_m, LQ, HAS_MASK, KEY_MASK, CHUNK_MASK), p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PREC)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(q.dtype), k, dq, UPCAST, PREC)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, MASK, CHUNK_END, CHUNK_START, LSE, DELTA, DQ,
                 s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_mb,
                 H, LQ, LK, D, scale, LQ_KEY, LK_KEY, s_stat,
                 HAS_MASK: tl.constexpr, HAS_CHUNKS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
                 WS_OK: tl.constexpr, WS: tl.constexpr):
    """dQ for BLOCK_M query rows: stream the key tiles they see (a separate pass, so no atomics are needed);
    the same full / partial / skipped split of key tiles as the forward. WS, WS_OK: as in `_attn_bwd_dkdv` (the
    unmasked key loop warp-specialised; q, dO, lse and delta then come through descriptors too). Triton 3.6's
    pass compiles no second loop after the specialised one (it failed for sm_90 on most tiles, 2026-12-04), so at
    a ragged key count the WS path runs one loop over every key tile, each with the key-range select."""
    pid_m = tl.program_id(0)
    if HAS_CHUNKS:
        pid_m = tl.num_programs(0) - 1 - pid_m     # longest rows first, as in the forward
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    WARP_SPEC: tl.constexpr = WS and WS_OK
    STREAM_TMA: tl.constexpr = TMA or WARP_SPEC
    if WARP_SPEC:
        q = _row_source(Q + b * s_qb + h * s_qh, LQ, D, s_qm, BLOCK_M, BLOCK_D, True).load([pid_m * BLOCK_M, 0])
        do = _row_source(DO + pid_bh * LQ * D, LQ, D, D, BLOCK_M, BLOCK_D, True).load([pid_m * BLOCK_M, 0])
    else:
        q = _load_rows(Q + b * s_qb + h * s_qh, offs_m, offs_d, s_qm, LQ, D, EVEN_M, EVEN_D)
        do = _load_rows(DO + pid_bh * LQ * D, offs_m, offs_d, D, LQ, D, EVEN_M, EVEN_D)
    lse, delta = _load_stats(_stats_source(LSE, pid_bh, LQ, s_stat, BLOCK_M, WARP_SPEC),
                             _stats_source(DELTA, pid_bh, LQ, s_stat, BLOCK_M, WARP_SPEC), pid_m * BLOCK_M, offs_m,
                             LQ, WARP_SPEC)
    K_src = _row_source(K + b * s_kb + h * s_kh, LK, D, s_kn, BLOCK_N, BLOCK_D, STREAM_TMA)
    V_src = _row_source(V + b * s_vb + h * s_vh, LK, D, s_vn, BLOCK_N, BLOCK_D, STREAM_TMA)
    MASK_base = MASK + b * s_mb
    qk_scale = scale * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_CHUNKS:
        lo_end, hi_end = _tile_bounds(CHUNK_END, LQ, pid_m * BLOCK_M, BLOCK_M)
    else:
        lo_end = LK
        hi_end = LK
    n_full = (lo_end // BLOCK_N) * BLOCK_N
    TAIL_KEY_MASK: tl.constexpr = HAS_MASK or (not HAS_CHUNKS)
    WS_RAGGED: tl.constexpr = WARP_SPEC and not EVEN_N      # one loop, every tile masked (see the docstring)
    n_loop = n_full
    if WS_RAGGED:
        n_loop = LK
    for start_n in tl.range(0, n_loop, BLOCK_N, warp_specialize=WARP_SPEC):
        dq = _dq_tile(q, do, lse, delta, K_src, V_src, MASK_base, CHUNK_END, offs_m, LQ, start_n, offs_n0, offs_d,
                      dq, s_kn, s_vn, LK, D, qk_scale, HAS_MASK, UPCAST, PREC, not WS_RAGGED, EVEN_D,
                      HAS_MASK or WS_RAGGED, False, BLOCK_M, BLOCK_N, STREAM_TMA)
    if HAS_CHUNKS or not (EVEN_N or WS_RAGGED):
        for start_n in range(n_full, hi_end, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, K_src, V_src, MASK_base, CHUNK_END, offs_m, LQ, start_n, offs_n0,
                          offs_d, dq, s_kn, s_vn, LK, D, qk_scale, HAS_MASK, UPCAST, PREC, False, EVEN_D,
                          TAIL_KEY_MASK, HAS_CHUNKS, BLOCK_M, BLOCK_N, STREAM_TMA)
    dq = dq * scale
    _store_tile(DQ + pid_bh * LQ * D, dq.to(DQ.dtype.element_ty), pid_m * BLOCK_M, offs_m, offs_d, LQ, D, EVEN_M,
                EVEN_D, BLOCK_M, BLOCK_D, WARP_SPEC)
