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
"""
from __future__ import annotations

import torch


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

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._drop_first_moments()


def _first_state(p: torch.Tensor, group: dict) -> dict:
    """AdamW's state before its first step, as `torch.optim.AdamW._init_group` makes it (the step counter where
    that implementation keeps it: beside the parameter when fused or capturable, else on the CPU), without `exp_avg`."""
    from torch.optim.optimizer import _get_scalar_dtype
    on_device = group["capturable"] or group["fused"]
    step = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device) if on_device
            else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"))
    return {"step": step, "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
