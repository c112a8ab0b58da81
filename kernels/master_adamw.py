"""One pass over memory for the one-GPU master-weight AdamW step with β₁ = 0 (rCM's setting), issue 28.

    .venv/bin/python -m pytest tests/test_master_adamw.py -q          # interpreter vs float64 and vs PyTorch

Without FSDP a bf16 network keeps fp32 masters (`rcm_core.parallel.precision`), and its optimiser step was three
passes over memory: cast every bf16 gradient to an fp32 copy, PyTorch's fused AdamW over the masters, and a copy
of the masters back into the bf16 working weights. At Wan2.1-1.3B that moves ~57 GB (~26 ms on an H200, 10 % of
an 8K flow-matching step) and holds 4 B per parameter of fp32 gradient copies at the step's peak. With β₁ = 0
AdamW needs nothing but the gradient, the master, the second moment and the step counter, so one kernel reads
the bf16 gradient (2 B), master (4) and second moment (4), and writes master (4), second moment (4) and the bf16
working weight (2): 20 B per parameter, no fp32 gradient anywhere.

The arithmetic is PyTorch's fused AdamW's (`torch._fused_adamw_`, "ADAMW" mode), in fp32, in its order:
    p ← p − lr·wd·p;  v ← β₂·v + (1 − β₂)·g²;  p ← p − lr·g / (√v / √(1 − β₂ᵗ) + ε);  w ← bf16(p)
where t is the parameter's step counter after this step's increment (the caller increments it first, as
PyTorch does). `master_adamw_ref` is the same in PyTorch ops (the twin: CPU runs without the interpreter).

Non-finite gradients: given a counter (`nonfinite`), the kernel steps every NaN/Inf gradient entry as 0 and adds
their number to it on the device, which is rCM's rule (official grad_clip callback: such entries are zeroed
before the step, and counted). The training step then needs no host sync before it to look for them
(`rcm_core.method.distill`); without a counter they are stepped as they are, as PyTorch's AdamW would.

Multi-tensor: the ~825 tensors of a 1.3B network are one launch. The kernel reads each tensor's addresses from
an int64 table (gradient, master, second moment, working weight, step counter) and each program handles
`BLOCK` elements of one tensor, named by two small tables (tensor index, first element) that depend only on
the tensors' sizes and are cached (one launch per tensor would pay Triton's host-side launch cost ~825 times).
"""
from __future__ import annotations

import functools
import math
import os

import torch

from kernels._modes import interpret as _interpret, triton_module

# Elements per program and warps: 20 B per element, 40 KB of traffic per program, ~0.7 M programs at 1.3B. Swept
# on an H100 (2026-12-05, 1.3B's 728 bf16 tensors, one median of 7 each): BLOCK 1024 / 2048 / 4096 / 8192 with 4
# warps 14.0 / 14.9 / 15.2 / 16.2 ms, with 8 warps 14.2 / 13.6 / 13.9 / 17.2 ms (2.06 TB/s at best).
BLOCK = 2048
NUM_WARPS = 8


def enabled() -> bool:
    """RCM_KERNELS_MASTER_ADAMW=off sends the masters' step back to casts + PyTorch's fused AdamW + refresh (read at
    call time): the A/B baseline of `experiments/bench/rcm_step.py`, and a way round a suspected kernel fault. Off,
    the step holds 2 B per parameter more than the planner counts (its fp32 gradient copies)."""
    mode = os.environ.get("RCM_KERNELS_MASTER_ADAMW", "on")
    if mode not in ("on", "off"):
        raise ValueError(f"RCM_KERNELS_MASTER_ADAMW={mode!r}: use on or off")
    return mode == "on"


def use_kernel(device: torch.device) -> bool:
    """The Triton kernel on CUDA, or anywhere under the interpreter; the PyTorch twin otherwise."""
    return device.type == "cuda" or _interpret()


def constants(*, lr: float, beta2: float, weight_decay: float, eps: float) -> dict[str, float]:
    """The step's constants, each computed in double on the host and then used as an fp32 number by the kernel
    and its twin alike (Triton passes Python floats as fp32): 1 − β₂ from the double β₂ is 0.001 to fp32's
    precision, where 1 − fp32(β₂) would be 0.00099998713, 1.3e-5 off, and the bias correction 1 − exp(t·ln β₂)
    needs ln β₂ to fp32's precision, not fp32(β₂)'s."""
    return {"lr": lr, "lr_wd": lr * weight_decay, "beta2": beta2, "one_minus_beta2": 1 - beta2,
            "log_beta2": math.log(beta2), "eps": eps}


def master_adamw_ref(grads: list[torch.Tensor], masters: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                     weights: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta2: float,
                     weight_decay: float, eps: float, nonfinite: torch.Tensor | None = None) -> None:
    """The twin, in place, tensor by tensor: fp32 arithmetic of the same constants in the kernel's order (the
    gradients are read, not written, as the kernel's: a non-finite entry counted into `nonfinite` steps as 0)."""
    if not grads:
        return
    c = {k: torch.tensor(x, dtype=torch.float32, device=masters[0].device) for k, x in
         constants(lr=lr, beta2=beta2, weight_decay=weight_decay, eps=eps).items()}
    for g, p, v, w, t in zip(grads, masters, exp_avg_sqs, weights, steps):
        g = g.float()
        if nonfinite is not None:
            finite = torch.isfinite(g)
            nonfinite += (~finite).sum()
            g = torch.where(finite, g, 0.0)
        p.sub_(p * c["lr_wd"])
        v.mul_(c["beta2"]).add_(c["one_minus_beta2"] * (g * g))
        bias_correction2_sqrt = (-torch.expm1(t.float() * c["log_beta2"])).sqrt()
        p.sub_(c["lr"] * g / (v.sqrt() / bias_correction2_sqrt + c["eps"]))
        w.copy_(p)


@functools.lru_cache(maxsize=8)
def _chunks(numels: tuple[int, ...], device: torch.device, block: int) -> tuple[torch.Tensor, ...]:
    """Each tensor's size, and (tensor index, first element) of every program: `BLOCK`-element chunks of each
    tensor in turn."""
    index, start = [], []
    for i, n in enumerate(numels):
        firsts = range(0, n, block)
        index.extend([i] * len(firsts))
        start.extend(firsts)
    return (torch.tensor(numels, dtype=torch.int64).to(device), torch.tensor(index, dtype=torch.int32).to(device),
            torch.tensor(start, dtype=torch.int64).to(device))


def _address_table(grads, masters, exp_avg_sqs, weights, steps, device: torch.device) -> torch.Tensor:
    """int64 [5, T]: the addresses the kernel reads its tensors from (rebuilt every step: gradients are new)."""
    rows = [[t.data_ptr() for t in ts] for ts in (grads, masters, exp_avg_sqs, weights, steps)]
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def aligned(t: torch.Tensor) -> bool:
    """Whether `t` starts on a 16-byte boundary, which the kernel's wide loads assume (PyTorch's allocator gives
    512-byte aligned blocks; an offset view may not be)."""
    return t.data_ptr() % 16 == 0


def refusal(g: torch.Tensor, p: torch.Tensor, v: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> str | None:
    """Why the kernel cannot step this gradient, master, second moment, working weight and counter, or None when
    it can (the one predicate: `check` raises it, `rcm_core.method.adamw` leaves such tensors to the casts)."""
    if p.dtype != torch.float32 or v.dtype != torch.float32 or t.dtype != torch.float32:
        return f"masters, second moments and step counters must be float32, got {p.dtype}, {v.dtype}, {t.dtype}"
    if g.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return (f"gradients and working weights must be bfloat16, got {g.dtype}, {w.dtype} (other precisions "
                "take the unfused step)")
    if not (g.shape == p.shape == v.shape == w.shape) or t.numel() != 1:
        return (f"shapes differ: gradient {tuple(g.shape)}, master {tuple(p.shape)}, second moment "
                f"{tuple(v.shape)}, weight {tuple(w.shape)}, step {tuple(t.shape)}")
    if not all(x.is_contiguous() and aligned(x) for x in (g, p, v, w)):
        return ("every tensor must be contiguous and start 16-byte aligned (a fresh allocation is; a view into the "
                "middle of one may not be)")
    if not (g.device == p.device == v.device == w.device == t.device):
        return f"tensors on several devices: {g.device}, {p.device}, {v.device}, {w.device}, {t.device}"
    return None


def check(grads, masters, exp_avg_sqs, weights, steps, *, each: bool = True, nonfinite=None) -> None:
    """One-line ValueErrors for what the kernel cannot take: lists of one length, a counter that is one int64
    element beside the gradients, and (`each`) every tensor set held to `refusal`."""
    n = len(grads)
    if not (len(masters) == len(exp_avg_sqs) == len(weights) == len(steps) == n):
        raise ValueError(f"master_adamw: {n} gradients but {len(masters)} masters, {len(exp_avg_sqs)} second "
                         f"moments, {len(weights)} working weights, {len(steps)} step counters")
    if nonfinite is not None and (nonfinite.dtype != torch.int64 or nonfinite.numel() != 1
                                  or (n and nonfinite.device != grads[0].device)):
        raise ValueError(f"master_adamw: nonfinite must be one int64 element on the gradients' device, got "
                         f"{nonfinite.dtype} of {nonfinite.numel()} on {nonfinite.device}; make it with "
                         "torch.zeros((), dtype=torch.int64, device=...)")
    if not each:
        return
    for tensors in zip(grads, masters, exp_avg_sqs, weights, steps):
        reason = refusal(*tensors)
        if reason is not None:
            raise ValueError(f"master_adamw: {reason}")


def master_adamw(grads: list[torch.Tensor], masters: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 weights: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta2: float,
                 weight_decay: float, eps: float, checked: bool = False,
                 nonfinite: torch.Tensor | None = None) -> None:
    """One AdamW step (β₁ = 0) of fp32 `masters` from bf16 `grads`, in place, and the bf16 `weights` refreshed
    from them; `steps` already incremented. All tensors on one device, contiguous and aligned (`check`).
    `checked`: the caller has held every tensor set to `refusal` already (the optimiser does, to choose the pairs
    the kernel takes), so it is not asked twice: 8.3–8.8 → 5.9–6.8 ms of the step's host time at 825 tensors on the
    development CPU (launch stubbed). `nonfinite`: an int64 counter (one element, the gradients' device) the
    non-finite gradient entries are added to, each stepped as 0 (module docstring); no host read either way."""
    if not grads:
        return
    check(grads, masters, exp_avg_sqs, weights, steps, each=not checked, nonfinite=nonfinite)
    device = grads[0].device
    if not use_kernel(device):
        master_adamw_ref(grads, masters, exp_avg_sqs, weights, steps, lr=lr, beta2=beta2,
                         weight_decay=weight_decay, eps=eps, nonfinite=nonfinite)
        return
    numels, index, start = _chunks(tuple(g.numel() for g in grads), device, BLOCK)
    table = _address_table(grads, masters, exp_avg_sqs, weights, steps, device)
    triton_module("_triton_master_adamw.py", _interpret()).launch(
        table, numels, index, start, nonfinite, constants(lr=lr, beta2=beta2, weight_decay=weight_decay, eps=eps),
        BLOCK, NUM_WARPS)
