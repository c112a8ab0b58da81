"""What forward-mode AD costs on the host and in matmuls (issue 28): the numbers behind docs/BENCHMARKS.md's
"JVP goals against arithmetic" paragraphs.

    python experiments/bench/forward_ad_cost.py          # CPU, ~1 min

Prints (1) a 4096×1024 · 1024×1024 linear called on a dual input, in time over the plain call, under PyTorch's
forward-mode rule (nn.Linear) and under `rcm_core.networks.layers.Linear`'s; (2) the aten ops one Wan DiT block
dispatches (D = 64, bf16, 48 latent tokens; the 3-layer network minus the 2-layer one) in a forward and in sCM's
JVP pass along x and t, under each rule, and with `model.compile=blocks`, whose JVP pass runs each elementwise
island's primal and tangent as one compiled function (rcm_core/networks/tangent_islands.py). Host timings move
with the machine's load: the ratios are what to read.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

from rcm_core.config import ModelCfg
from rcm_core.networks import build_network, layers

RULES = {"PyTorch's (nn.Linear)": torch.nn.Linear.forward, "layers.Linear": layers.Linear.forward}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def best_seconds(fn, calls: int = 20, rounds: int = 5) -> float:
    fn()
    return min(_timed(fn, calls) for _ in range(rounds)) / calls


def _timed(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def linear_ratio(rule) -> float:
    """Dual call over plain call of one linear layer, both under no_grad."""
    lin = layers.Linear(1024, 1024)
    x = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        return best_seconds(lambda: rule(lin, dual)) / best_seconds(lambda: rule(lin, x))


def ops_per_block(dual: bool, compile_mode: str = "none") -> int:
    """Aten ops one block dispatches (3-layer network minus 2-layer). compile_mode "blocks": the JVP pass's
    elementwise islands run compiled (networks/tangent_islands.py); counted after a first call compiled them, so
    what a compiled island runs inside its own kernels is not counted, only what it dispatches."""
    def count(layers_: int) -> int:
        cfg = ModelCfg(dim=64, ffn_dim=160, num_heads=4, num_layers=layers_, text_dim=32, dtype="bfloat16",
                       compile=compile_mode)
        torch.manual_seed(0)
        net = build_network(cfg)
        x, t, text = torch.randn(1, 16, 2, 8, 12), torch.full((1,), 0.7), torch.randn(1, 8, 32)

        def call(counter=None):
            with torch.no_grad(), (fwAD.dual_level() if dual else contextlib.nullcontext()):
                xx = fwAD.make_dual(x, torch.randn_like(x)) if dual else x
                tt = fwAD.make_dual(t, torch.ones_like(t)) if dual else t
                with counter or contextlib.nullcontext():
                    net(xx, tt, text)
        if compile_mode != "none":
            call()                                   # compile first: inductor's own work is not the pass's
        counter = _CountOps()
        call(counter)
        return counter.n
    return count(3) - count(2)


def main() -> None:
    torch.set_num_threads(1)
    print("| linear rule | dual ÷ plain call, 4096×1024×1024 | aten ops per block: forward | JVP pass |")
    print("|---|---|---|---|")
    try:
        for name, rule in RULES.items():
            layers.Linear.forward = rule
            print(f"| {name} | {linear_ratio(rule):.2f} | {ops_per_block(False)} | {ops_per_block(True)} |",
                  flush=True)
    finally:
        layers.Linear.forward = RULES["layers.Linear"]
    print(f"| layers.Linear, model.compile=blocks (JVP islands fused) | – | – | "
          f"{ops_per_block(True, 'blocks')} |", flush=True)


if __name__ == "__main__":
    main()
