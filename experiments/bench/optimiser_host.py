"""Host time of the one-GPU masters step (issue 28): what `MasterWeightOptimizer.step` costs the CPU, kernel aside.

    python experiments/bench/optimiser_host.py                # 728 bf16 + 97 fp32 tensors, as Wan2.1-1.3B has

A run that looks for non-finite gradients first (`distill.zero_nonfinite_grads`: β₁ ≠ 0, or the kernel switched
off) reads a flag on the host just before each optimiser step, so nothing is queued on the GPU while the step's
Python runs; where the one pass counts them itself (`MasterWeightOptimizer.counts_nonfinite`) this time is spent
while the backward still runs on the GPU. Host work depends on how many tensors there are, not on their size, so
the network's tensor count is built from 64-element tensors on the CPU, and the one-pass kernel's launch is
replaced by a no-op (its GPU time is `rcm_step.py --adamw-ab`'s to measure). Arms: the product's step (one pass,
the non-finite entries zeroed and counted on the device: the kernel's for the bf16 tensors, a few ops per fp32
tensor); the one pass without a counter; the same with the per-pair checks asked twice (as before the optimiser
told the kernel they were done, `checked=True`); and the casting step it replaced (`RCM_KERNELS_MASTER_ADAMW=off`:
casts, PyTorch's fused AdamW on the CPU, which does compute here, the refresh; its AdamW and casts compute on
these CPU tensors, so its row is an upper bound of a GPU run's host time for it). Prints a table: per arm, the
best of `--rounds` means of `--steps` steps, in ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels.master_adamw as one_pass  # noqa: E402
from rcm_core.method.adamw import AdamW  # noqa: E402
from rcm_core.parallel.precision import with_master_weights  # noqa: E402


class _NoLaunch:
    """Stands in for the compiled kernel module: the launch does nothing (host time only)."""

    @staticmethod
    def launch(*args, **kwargs) -> None:
        return None


def _optimiser(bf16: int, fp32: int, numel: int):
    torch.manual_seed(0)
    params = ([nn.Parameter(torch.randn(numel).bfloat16()) for _ in range(bf16)]
              + [nn.Parameter(torch.randn(numel)) for _ in range(fp32)])
    opt = with_master_weights(params, lambda ms: AdamW(ms, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01,
                                                       fused=True))
    return params, opt


def host_ms(arm: str, bf16: int, fp32: int, steps: int, rounds: int, numel: int = 64) -> float:
    """The best of `rounds` means of `steps` optimiser steps, host time in ms, for `arm`."""
    params, opt = _optimiser(bf16, fp32, numel)
    saved = (one_pass.use_kernel, one_pass.triton_module, one_pass.check, os.environ.get("RCM_KERNELS_MASTER_ADAMW"))
    one_pass.use_kernel = lambda device: True
    one_pass.triton_module = lambda filename, interpret: _NoLaunch
    if arm == "one pass, checks twice":
        check = saved[2]
        one_pass.check = lambda *tensors, each=True, **counter: check(*tensors, **counter)
    os.environ["RCM_KERNELS_MASTER_ADAMW"] = "off" if arm == "casts (before the one pass)" else "on"
    try:
        means = []
        for round_ in range(rounds + 1):                       # round 0 makes the states: not counted
            total = 0.0
            for _ in range(steps):
                for p in params:
                    p.grad = torch.zeros_like(p)
                t0 = time.perf_counter()
                if arm == ARMS[0]:
                    opt.step(nonfinite=torch.zeros((), dtype=torch.int64))
                else:
                    opt.step()
                total += time.perf_counter() - t0
            if round_:
                means.append(total / steps * 1e3)
        return min(means)
    finally:
        one_pass.use_kernel, one_pass.triton_module, one_pass.check = saved[:3]
        if saved[3] is None:
            os.environ.pop("RCM_KERNELS_MASTER_ADAMW", None)
        else:
            os.environ["RCM_KERNELS_MASTER_ADAMW"] = saved[3]


ARMS = ("one pass, counting non-finite entries (the product)", "one pass", "one pass, checks twice",
        "casts (before the one pass)")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", type=int, default=728, help="bf16 tensors (Wan2.1-1.3B: 728)")
    ap.add_argument("--fp32", type=int, default=97, help="fp32 tensors, their own masters (Wan2.1-1.3B: 97)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    out = {arm: host_ms(arm, args.bf16, args.fp32, args.steps, args.rounds) for arm in ARMS}
    print(f"| optimiser step, host time ({args.bf16} bf16 + {args.fp32} fp32 tensors, launch stubbed, best of "
          f"{args.rounds} means of {args.steps}) | ms |\n|---|---|")
    for arm, ms in out.items():
        print(f"| {arm} | {ms:.2f} |")
    return out


if __name__ == "__main__":
    main()
