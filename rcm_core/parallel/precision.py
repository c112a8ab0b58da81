"""fp32 master weights for networks that compute in bf16, without FSDP (one process, replicated data parallel).

    .venv/bin/python -m pytest tests/test_precision.py -q

What users of FSDP expect (and what FSDP2's MixedPrecisionPolicy gives under `rcm_core.parallel.sharding`): parameters
and optimiser state in fp32, compute in bf16, gradients reduced in fp32. Without FSDP the module keeps its bf16
working copy (the forward reads it directly, nothing is cast per call) and `MasterWeightOptimizer` holds an fp32
master of every narrow parameter:

    grad (bf16, from backward) → master.grad (fp32; the bf16 grad freed) → AdamW on the masters
                                                                          → working copy = bf16(master)

or, where the inner optimiser offers `step_in_one_pass` (`rcm_core.method.adamw.AdamW`, fused, β₁ = 0: every GPU
run of rCM), all three in one kernel (`kernels.master_adamw`) that reads the bf16 gradient and writes master,
second moment and working copy, with no fp32 gradient in between.

That is the same arithmetic as FSDP2 with fp32 storage and `param_dtype=bf16` on one rank: its all-gather casts
the fp32 shard to bf16 for compute, autograd produces bf16 gradients, and the reduce-scatter upcasts them to
fp32 for the fp32 optimiser. Without masters, an update smaller than half a bf16 ulp of the weight (about 2⁻⁸ of
it) is rounded away: with lr 2e-6 (rCM's 14B rate), AdamW's steps of about lr are lost on every weight larger
than ~5e-4 in magnitude, i.e. on nearly all of them.
Parameters already in ≥ fp32 (Wan's time path and modulation tables, `networks.dit.KEEP_FP32`) are their own
masters.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


CAST_GROUP = 2 ** 25      # elements per group of gradient casts: 128 MiB of fp32 copies beside 64 MiB of bf16


def _groups(pairs: list, elements: int) -> Iterator[list]:
    """`pairs` (parameter, master) in order, in consecutive groups of about `elements` elements (one pair larger
    than that is a group alone)."""
    group, size = [], 0
    for pair in pairs:
        if group and size + pair[0].numel() > elements:
            yield group
            group, size = [], 0
        group.append(pair)
        size += pair[0].numel()
    if group:
        yield group


def is_narrow(p: torch.Tensor) -> bool:
    return p.is_floating_point() and torch.finfo(p.dtype).bits < 32


class MasterWeightOptimizer:
    """Wraps an optimiser built by `build(masters)`; steps fp32 masters and refreshes the module's narrow params.

    Exposes what the training loop touches on an optimiser: `param_groups` (the learning rate), `state`,
    `zero_grad`, `step`, `state_dict` / `load_state_dict` (the masters travel with the moments, so a resumed
    run continues bit-exactly from fp32, not from the rounded working copy)."""

    def __init__(self, params: Iterable[nn.Parameter], build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) if is_narrow(p) else p for p in self.params]
        self.inner = build(self.masters)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in zip(self.params, self.masters):
            if set_to_none:
                p.grad = None
                m.grad = None
            else:
                for t in (p, m):
                    if t.grad is not None:
                        t.grad.zero_()

    def _narrow_pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, m) for p, m in zip(self.params, self.masters) if m is not p]

    def counts_nonfinite(self) -> bool:
        """Whether `step(nonfinite=…)` is worth asking for: the inner optimiser steps the bf16 gradients in one
        pass (`step_in_one_pass`), which zeroes and counts their non-finite entries as it reads them, so only
        the few gradients it leaves need a pass of their own."""
        ready = getattr(self.inner, "one_pass_ready", None)
        return ready is not None and ready()

    @torch.no_grad()
    def step(self, nonfinite: torch.Tensor | None = None) -> None:
        """Casts each bf16 gradient to its master's fp32 gradient and frees it, then steps the masters. The casts
        go a group of tensors at a time (`CAST_GROUP`), each group's bf16 gradients freed once copied, so the step
        holds the fp32 copies and never both whole sets: 2 B per parameter less at its peak (2.6 GiB at
        Wan2.1-1.3B, where the step sets a one-GPU iteration's peak at short sequences). Nothing reads a bf16
        gradient after the step: the next backward starts from `zero_grad`. Multi-tensor copies: one launch per
        group on a GPU, where a loop of per-tensor casts made ~825 launches each way at Wan2.1-1.3B; the arithmetic
        is copy_'s either way. An inner optimiser with `step_in_one_pass` (`rcm_core.method.adamw.AdamW`, fused
        with β₁ = 0) first takes the pairs it can in one kernel, from the bf16 gradients (no fp32 copies at all);
        the rest, and only they, are cast, stepped and refreshed here. Parameters without a gradient are not
        stepped, so their bf16 copies stay as they are.

        `nonfinite` (an int64 counter on the gradients' device): every NaN/Inf gradient entry is set to 0 (stepped
        as 0 inside the one pass) and counted into it, with no host read (rCM's rule, `distill._check_and_step`)."""
        with_grad = []
        for p, m in self._narrow_pairs():
            m.grad = None
            if p.grad is not None:
                with_grad.append((p, m))
        one_pass = getattr(self.inner, "step_in_one_pass", None)
        if one_pass is not None:
            with_grad = one_pass(with_grad, nonfinite=nonfinite)
        if nonfinite is not None:
            wide = [p.grad for p, m in zip(self.params, self.masters) if m is p and p.grad is not None]
            zero_nonfinite_counted(wide + [p.grad for p, _ in with_grad], nonfinite)
        for group in _groups(with_grad, CAST_GROUP):
            fp32 = [torch.empty_like(m) for _, m in group]
            torch._foreach_copy_(fp32, [p.grad for p, _ in group])
            for (p, m), g in zip(group, fp32):
                m.grad, p.grad = g, None
        self.inner.step()
        self._refresh(with_grad)

    @torch.no_grad()
    def _refresh(self, pairs: list | None = None) -> None:
        """The bf16 parameters from their masters (`pairs`, default every narrow one)."""
        pairs = self._narrow_pairs() if pairs is None else pairs
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])

    def master_parameters(self) -> list[torch.Tensor]:
        """The fp32 values, in the module's parameter order (what the EMA should average)."""
        return list(self.masters)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(),
                "masters": [m.detach().clone() for p, m in zip(self.params, self.masters) if m is not p]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        narrow = [m for p, m in zip(self.params, self.masters) if m is not p]
        if len(state["masters"]) != len(narrow):
            raise ValueError(f"checkpoint holds {len(state['masters'])} fp32 masters, this model has {len(narrow)} "
                             "narrow parameters: it was written by another model or precision")
        for m, saved in zip(narrow, state["masters"]):
            m.copy_(saved)
        self.inner.load_state_dict(state["inner"])
        self._refresh()


@torch.no_grad()
def zero_nonfinite_counted(grads: list[torch.Tensor], counter: torch.Tensor) -> None:
    """Set each NaN/Inf entry of `grads` to 0 in place and add their number to `counter`, all on the device (no
    host read). For the few tensors a one-pass step leaves (Wan's fp32 time path and norms: ~100 tensors), a
    handful of launches per group of `CAST_GROUP` elements, not a few per tensor: the group is copied into one
    buffer, zeroed and counted there, and copied back (one multi-tensor copy)."""
    for group in _groups([(g, None) for g in grads if g.numel()], CAST_GROUP):
        for dtype in dict.fromkeys(g.dtype for g, _ in group):
            same = [g for g, _ in group if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            finite = torch.isfinite(flat)
            counter += flat.numel() - finite.sum()
            flat.masked_fill_(~finite, 0)
            torch._foreach_copy_(same, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in same]),
                                                                           same)])


def with_master_weights(params: Iterable[nn.Parameter],
                        build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
    """`build(params)` when every parameter is ≥ fp32, else a `MasterWeightOptimizer` around it."""
    params = list(params)
    if not any(is_narrow(p) for p in params):
        return build(params)
    return MasterWeightOptimizer(params, build)


def master_parameters(module: nn.Module, opt) -> list[torch.Tensor]:
    """The parameters the EMA should average: the fp32 masters when `opt` keeps them, else the module's own."""
    if isinstance(opt, MasterWeightOptimizer):
        return opt.master_parameters()
    return list(module.parameters())
