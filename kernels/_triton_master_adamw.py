"""Triton kernel of `kernels.master_adamw` (only the `@triton.jit` function and its launch; the maths, the tables
and the dispatch are documented there). Loaded once per mode by `kernels._modes`."""
import triton
import triton.language as tl


@triton.jit
def _master_adamw(addresses, numels, chunk_tensor, chunk_start, n_tensors, nonfinite, lr, lr_wd, beta2,
                  one_minus_beta2, log_beta2, eps, BLOCK: tl.constexpr, ZERO_NONFINITE: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.load(chunk_tensor + pid)
    # a multiple of BLOCK elements, and every tensor starts 16-byte aligned (`kernels.master_adamw.check`): the
    # hints let the loads and stores go 16 bytes at a time (scalar 2-byte accesses otherwise, at ~1.4 TB/s)
    first = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    left = tl.load(numels + i) - first
    # the table's rows: gradient, master, second moment, working weight, step counter (int64 addresses)
    grad = tl.multiple_of(tl.load(addresses + i).to(tl.pointer_type(tl.bfloat16)), 16) + first
    master = tl.multiple_of(tl.load(addresses + n_tensors + i).to(tl.pointer_type(tl.float32)), 16) + first
    exp_avg_sq = tl.multiple_of(tl.load(addresses + 2 * n_tensors + i).to(tl.pointer_type(tl.float32)), 16) + first
    weight = tl.multiple_of(tl.load(addresses + 3 * n_tensors + i).to(tl.pointer_type(tl.bfloat16)), 16) + first
    step = tl.load(tl.load(addresses + 4 * n_tensors + i).to(tl.pointer_type(tl.float32)))
    bias_correction2_sqrt = tl.sqrt(_one_minus_exp(step * log_beta2))
    if left >= BLOCK:      # every chunk but a tensor's last: no mask, so nothing stops the wide accesses
        _step_chunk(grad, master, exp_avg_sq, weight, left, nonfinite, lr, lr_wd, beta2, one_minus_beta2, eps,
                    bias_correction2_sqrt, BLOCK, False, ZERO_NONFINITE)
    else:
        _step_chunk(grad, master, exp_avg_sq, weight, left, nonfinite, lr, lr_wd, beta2, one_minus_beta2, eps,
                    bias_correction2_sqrt, BLOCK, True, ZERO_NONFINITE)


@triton.jit
def _step_chunk(grad, master, exp_avg_sq, weight, left, nonfinite, lr, lr_wd, beta2, one_minus_beta2, eps,
                bias_correction2_sqrt, BLOCK: tl.constexpr, MASKED: tl.constexpr, ZERO_NONFINITE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < left
        g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(master + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq + offs, mask=mask, other=0.0)
    else:
        g = tl.load(grad + offs).to(tl.float32)
        p = tl.load(master + offs)
        v = tl.load(exp_avg_sq + offs)
    if ZERO_NONFINITE:     # a NaN fails every comparison; masked lanes loaded 0, finite
        finite = tl.abs(g) < float("inf")
        g = tl.where(finite, g, 0.0)
        bad = tl.sum((~finite).to(tl.int64), axis=0)
        if bad > 0:        # in a healthy run never: no atomics on the one counter from ~0.7 M programs
            tl.atomic_add(nonfinite, bad)

    p = p - p * lr_wd
    v = v * beta2 + one_minus_beta2 * (g * g)
    p = p - lr * g / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    w = _to_bf16_nearest_even(p)

    if MASKED:
        tl.store(master + offs, p, mask=mask)
        tl.store(exp_avg_sq + offs, v, mask=mask)
        tl.store(weight + offs, w, mask=mask)
    else:
        tl.store(master + offs, p)
        tl.store(exp_avg_sq + offs, v)
        tl.store(weight + offs, w)


@triton.jit
def _one_minus_exp(x):
    """1 − eˣ for x ≤ 0 to fp32's relative precision: 1 − β₂ᵗ at small t is 1 minus a number near 1 (t = 1:
    0.001; a plain 1 − exp in fp32 gives it 1.3e-5 off, the step 6.4e-6 off, ~100 fp32 ulps of the step). Near 0
    a Taylor series (|x| < 0.5: the first left-out term is < 2.7e-10 of the sum), elsewhere no cancellation."""
    series = -x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6 * (1 + x / 7 * (1 + x / 8 * (
        1 + x / 9))))))))
    return tl.where(x > -0.5, series, 1 - tl.exp(x))


@triton.jit
def _to_bf16_nearest_even(x):
    """fp32 → bf16 rounded to nearest, ties to even, as PyTorch's copy_ rounds, spelled out in integer ops: the
    interpreter (Triton 3.6) truncates a plain `.to(tl.bfloat16)`, so CPU tests would check another rounding than
    the GPU's. NaN stays NaN (the add below could carry a NaN's low payload bits into infinity)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
    return rounded.to(tl.bfloat16, bitcast=True)


# Every product and sum rounds as written, as in the interpreter and the twin: with FMA contraction the kernels
# with and without a counter (two compilations, ZERO_NONFINITE being a constexpr) fused v·β₂ + (1−β₂)·g² into
# different FMAs (H100, sm_90, 2026-12-05: 386 of 4,183 second moments one ulp apart), so the counter changed the
# step. The kernel is memory-bound: 9.49 → 9.53 ms for 1.40 G parameters without contraction (H100, 2026-12-05).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def launch(addresses, numels, chunk_tensor, chunk_start, nonfinite, scalars: dict, block: int, num_warps: int):
    """One program per chunk; `scalars` the fp32 constants `kernels.master_adamw.constants` names; `nonfinite` an
    int64 counter that non-finite gradient entries are counted into (and stepped as 0), or None (stepped as they
    are, as PyTorch's AdamW would)."""
    zero = nonfinite is not None          # (without a counter the argument is a placeholder, never read)
    _master_adamw[(chunk_tensor.numel(),)](addresses, numels, chunk_tensor, chunk_start, addresses.shape[1],
                                           nonfinite if zero else numels, **scalars, BLOCK=block,
                                           ZERO_NONFINITE=zero, num_warps=num_warps, **COMPILE_OPTIONS)
