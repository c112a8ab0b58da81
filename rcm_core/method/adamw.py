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

Loading: a state dict that holds `exp_avg` (a checkpoint of `torch.optim.AdamW`, or `checkpoint.with_first_moments`'
zeros) loads, and the first moments of β₁ = 0 groups are dropped at once.
"""
from __future__ import annotations

import torch


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` without a first-moment buffer between steps for β₁ = 0 groups (module docstring)."""

    def _zero_beta1_params(self):
        for group in self.param_groups:
            if group["betas"][0] == 0:
                yield from group["params"]

    @torch.no_grad()
    def step(self, closure=None):
        # A parameter with a gradient and a state of its own (stepped before) takes its gradient as m for this
        # step; a new one gets AdamW's zero buffer from `_init_group`, dropped below with the others.
        for p in self._zero_beta1_params():
            state = self.state.get(p)
            if p.grad is not None and state and "exp_avg_sq" in state:
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

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._drop_first_moments()
