"""AdamW that holds no first moment between steps where β₁ = 0 (rCM's setting: Table 4, `optim.betas: [0, 0.999]`).

    .venv/bin/python -m pytest tests/test_adamw_kernel.py -q

With β₁ = 0 AdamW's first moment is the step's gradient: m ← β₁·m + (1 − β₁)·g = g, whatever m held before
(PyTorch computes it as `lerp(m, g, 1)`, which returns g exactly in every implementation: single-tensor, foreach,
fused). Yet `torch.optim.AdamW` keeps m as a buffer of its own, 4 B per parameter per trained network between
steps (issue 28: 5.3 GiB per network at Wan2.1-1.3B on one GPU, 2 × 7.1 GB per GPU for 14B over 8 shards). This
subclass hands AdamW the gradient itself as m for the step (the kernel writes g over g) and drops the reference
after it, so between steps the state holds `step` and `exp_avg_sq` only, and the gradient's memory goes when the
gradients are freed (`distill._free_gradients`, `zero_grad`). Same arithmetic, same bits: every kernel computes
m = g before using it. Groups with β₁ ≠ 0 keep their first moment as AdamW does.

A network's first step makes its state without a zero first moment either (`_first_state`). Loading: a state
dict that holds `exp_avg` (a checkpoint of `torch.optim.AdamW`, or `checkpoint.with_first_moments`'
zeros) loads, and the first moments of β₁ = 0 groups are dropped at once.

One pass with fp32 masters (`step_in_one_pass`, issue 28): when `parallel.precision.MasterWeightOptimizer` steps
fp32 masters of bf16 parameters, a fused β₁ = 0 group takes the bf16 gradients directly, through
`kernels.master_adamw` (cast, AdamW and the bf16 refresh in one kernel, no fp32 gradient copies), with PyTorch's
fused arithmetic; everything else steps as above. Given a counter, that kernel also steps each non-finite
gradient entry as 0 and counts it on the device (rCM's rule), so the training step need not look for them first.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import master_adamw as one_pass


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` without a first-moment buffer between steps for β₁ = 0 groups (module docstring)."""

    def _zero_beta1_params(self):
        for group in self._zero_beta1_groups():
            yield from group["params"]

    def _zero_beta1_groups(self):
        return [g for g in self.param_groups if g["betas"][0] == 0 and not g["amsgrad"]]

    @torch.no_grad()
    def step(self, closure=None):
        # Every parameter with a gradient takes it as m for this step. One stepping for the first time gets its
        # state made here as `_init_group` makes it, less the zero first moment (made and dropped there, it would
        # put 4 B per parameter on the first step's peak: 5.3 GiB at Wan2.1-1.3B, measured on an H100).
        for group in self._zero_beta1_groups():
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(_first_state(p, group))
                state["exp_avg"] = p.grad
        try:
            return super().step(closure)
        finally:
            self._drop_first_moments()

    def _drop_first_moments(self) -> None:
        for p in self._zero_beta1_params():
            state = self.state.get(p)
            if state:
                state.pop("exp_avg", None)

    def one_pass_ready(self) -> bool:
        """Whether `step_in_one_pass` takes any pairs: a fused β₁ = 0 group, the kernel switched on."""
        return bool(self._one_pass_groups())

    @torch.no_grad()
    def step_in_one_pass(self, pairs: list[tuple[nn.Parameter, torch.Tensor]],
                         nonfinite: torch.Tensor | None = None) -> list:
        """Steps the fp32 masters of `pairs` (bf16 parameter with its gradient, master without one) that one
        kernel can take, from the bf16 gradients, writes the parameters' new bf16 values, frees those gradients,
        and returns the pairs it left for the ordinary step (`_one_pass_ready`). Counters as `step`: incremented
        first, made at a first step without a first moment. `nonfinite` (an int64 counter on their device): the
        taken gradients' NaN/Inf entries are stepped as 0 and counted into it (`kernels.master_adamw`)."""
        group_of = {id(p): group for group in self._one_pass_groups() for p in group["params"]}
        taken: dict[int, tuple[dict, list]] = {}          # per param group: (group, its pairs)
        left = []
        for p, m in pairs:
            group = group_of.get(id(m))
            if group is not None and not self.state[m]:
                self.state[m].update(_first_state(m, group))
            if group is None or not _one_pass_ready(p, m, self.state[m]):
                left.append((p, m))
            else:
                taken.setdefault(id(group), (group, []))[1].append((p, m))
        for group, batch in taken.values():
            steps = [self.state[m]["step"] for _, m in batch]
            torch._foreach_add_(steps, 1)
            one_pass.master_adamw([p.grad for p, _ in batch], [m for _, m in batch],
                                  [self.state[m]["exp_avg_sq"] for _, m in batch], [p for p, _ in batch], steps,
                                  lr=group["lr"], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                                  eps=group["eps"], checked=True,      # each pair passed `_one_pass_ready`
                                  nonfinite=nonfinite)
            for p, _ in batch:
                p.grad = None
        return left

    def _one_pass_groups(self):
        """β₁ = 0 groups on PyTorch's fused implementation, whose arithmetic the kernel repeats: no amsgrad,
        maximize or differentiable step, a float learning rate; none while RCM_KERNELS_MASTER_ADAMW=off."""
        if not one_pass.enabled():
            return []
        return [g for g in self._zero_beta1_groups() if g["fused"] and not g["maximize"] and not g["differentiable"]
                and not isinstance(g["lr"], torch.Tensor)]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._drop_first_moments()


def _one_pass_ready(p: nn.Parameter, master: torch.Tensor, state: dict) -> bool:
    """Whether `kernels.master_adamw` takes this pair (`refusal`: a bf16 parameter and gradient beside an fp32
    master with its second moment, contiguous and 16-byte aligned, and the step counter a fused AdamW keeps, fp32
    beside the parameter; a checkpoint loaded from a CPU run keeps its counters on the CPU until
    `distill.reapply_adamw_kernel` moves them)."""
    g, step, v = p.grad, state.get("step"), state.get("exp_avg_sq")
    return (g is not None and step is not None and v is not None
            and one_pass.refusal(g, master, v, p, step) is None)


def _first_state(p: torch.Tensor, group: dict) -> dict:
    """AdamW's state before its first step, as `torch.optim.AdamW._init_group` makes it (the step counter where
    that implementation keeps it: beside the parameter when fused or capturable, else on the CPU), without `exp_avg`."""
    from torch.optim.optimizer import _get_scalar_dtype
    on_device = group["capturable"] or group["fused"]
    step = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device) if on_device
            else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"))
    return {"step": step, "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
