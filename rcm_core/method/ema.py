"""EDM2 power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics"), §3.

β_i = (1 − 1/i)^(γ+1) at update i = 1, 2, …; then the average is exactly
ema_n = Σ_i w_i θ_i with w_i = (i^(γ+1) − (i−1)^(γ+1)) / n^(γ+1), a weight profile ∝ i^γ.
γ comes from the relative width σ_rel: the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²).
rCM updates it on student steps only and evaluates with it (rcm_method.md §6).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def _by_kind(shadow: list[torch.Tensor], sources: list[torch.Tensor]) -> list[tuple[list, list]]:
    """The (shadow, source) pairs split into FSDP2 shards (DTensors) and plain tensors, each kind as two lists in
    parameter order (as `parallel.sharding._rebuild_optimizer` splits AdamW's groups)."""
    groups: dict[bool, tuple[list, list]] = {}
    for a, b in zip(shadow, sources, strict=True):
        group = groups.setdefault(isinstance(a, DTensor), ([], []))
        group[0].append(a)
        group[1].append(b)
    return list(groups.values())


class PowerEMA:
    """An fp32 shadow copy of a module, updated with power-function weights."""

    def __init__(self, module: nn.Module, sigma_rel: float):
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.module = copy.deepcopy(module).float().requires_grad_(False).eval()
        self.num_updates = 0

    def beta(self, i: int) -> float:
        return (1.0 - 1.0 / i) ** (self.gamma + 1)

    @torch.no_grad()
    def update(self, module: nn.Module, params: list[torch.Tensor] | None = None) -> None:
        """Average `params` (default: module's parameters; pass the fp32 masters when the module computes in
        bf16, rcm_core.parallel.precision) into the shadow; buffers are copied from `module`."""
        self.num_updates += 1
        beta = self.beta(self.num_updates)
        sources = [p.detach().float() for p in (module.parameters() if params is None else params)]
        # One multi-tensor lerp per kind of tensor (a launch per group of tensors on a GPU, not one per parameter).
        # A multi-tensor op takes DTensors or plain tensors, not both: under FSDP2 a bf16 network's fp32
        # modulation tables stay replicated plain tensors beside the sharded rest (parallel.sharding._shard_unit).
        for shadow, source in _by_kind(list(self.module.parameters()), sources):
            torch._foreach_lerp_(shadow, source, 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)

    def compute_copy(self, like: nn.Module) -> nn.Module:
        """The average in the dtypes `like` (the student) computes in, for sampling: a bf16 trunk with its fp32
        islands, as in training. The fp32 shadow itself would run the whole network in fp32 (measured on an H200
        at 32,760 tokens: evaluation of a 1.3B Wan ran > 4 min where bf16 takes seconds). Under FSDP2 the shadow is
        sharded with the student's compute dtypes (rcm_core.parallel.sharding) and is returned as it is."""
        pairs = list(zip(self.module.parameters(), like.parameters()))
        if any(isinstance(p, DTensor) for p, _ in pairs) or all(p.dtype == q.dtype for p, q in pairs):
            return self.module
        copy_ = copy.deepcopy(self.module)
        with torch.no_grad():
            for p, q in zip(copy_.parameters(), like.parameters()):
                p.data = p.data.to(q.dtype)
        return copy_

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
