"""What forward-mode AD costs on the host and in matmuls (issue 28): the numbers behind docs/BENCHMARKS.md's
"JVP goals against arithmetic" paragraphs.

    python experiments/bench/forward_ad_cost.py          # CPU, ~3 min (inductor compiles on the way)

Prints (1) a 4096×1024 · 1024×1024 linear called on a dual input, in time over the plain call, under PyTorch's
forward-mode rule (nn.Linear) and under `rcm_core.networks.layers.Linear`'s; (2) the aten ops one Wan DiT block
dispatches (D = 64, bf16, 48 latent tokens; the 3-layer network minus the 2-layer one) in a forward and in sCM's
JVP pass along x and t, under each rule; (3) a bf16 DiT's JVP pass against float64, eager and with
`model.compile=blocks`, whose JVP pass runs each elementwise island's primal and tangent as one compiled function
(rcm_core/networks/tangent_islands.py). Host timings move with the machine's load: the
ratios are what to read.
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


def ops_per_block(dual: bool) -> int:
    """Aten ops one block dispatches (3-layer network minus 2-layer), eager. Not used for `model.compile=blocks`:
    under a TorchDispatchMode compiled code runs op by op (one fused island dispatched 35 aten ops where eager
    forward-mode AD dispatched 51, 2026-12-03), so counting cannot see what fusing saves; the GPU A/B can
    (`rcm_step.py --islands-ab`)."""
    def count(layers_: int) -> int:
        cfg = ModelCfg(dim=64, ffn_dim=160, num_heads=4, num_layers=layers_, text_dim=32, dtype="bfloat16")
        torch.manual_seed(0)
        net = build_network(cfg)
        x, t, text = torch.randn(1, 16, 2, 8, 12), torch.full((1,), 0.7), torch.randn(1, 8, 32)
        with torch.no_grad(), (fwAD.dual_level() if dual else contextlib.nullcontext()):
            xx = fwAD.make_dual(x, torch.randn_like(x)) if dual else x
            tt = fwAD.make_dual(t, torch.ones_like(t)) if dual else t
            with _CountOps() as counter:
                net(xx, tt, text)
        return counter.n
    return count(3) - count(2)


def bf16_errors() -> dict[str, tuple[float, float]]:
    """A bf16 two-block DiT's JVP pass against the same weights in float64: max relative error of (primal,
    tangent) eager, and with `model.compile=blocks` (islands fused) — the fused path must not be less exact."""
    from rcm_core.networks import tangent_islands
    from rcm_core.networks.dit import set_compile

    def build(dtype: str):
        torch.manual_seed(0)
        return build_network(ModelCfg(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_channels=4, text_dim=16,
                                      dtype=dtype, attention="sdpa"))
    ref, low = build("float64"), build("bfloat16")
    gen = torch.Generator().manual_seed(0)
    for p in ref.parameters():                      # off adaLN-zero's identity start: a real function
        torch.nn.init.normal_(p, std=0.2, generator=gen)
    low.load_state_dict({k: v.to(low.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    x, x_t = torch.randn(2, 4, 2, 4, 4, generator=gen), torch.randn(2, 4, 2, 4, 4, generator=gen)
    t, ctx = torch.tensor([300.0, 700.0]), torch.randn(2, 5, 16, generator=gen)

    def jvp(net, dt):
        with torch.no_grad(), fwAD.dual_level():
            y = net(fwAD.make_dual(x.to(dt), x_t.to(dt)), fwAD.make_dual(t.double(), torch.ones(2).double()),
                    ctx.to(dt))
            return [v.double() for v in fwAD.unpack_dual(y)[:2]]

    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()          # noqa: E731
    want = jvp(ref, torch.float64)
    eager = jvp(low, torch.bfloat16)
    set_compile(low, "blocks")
    fused = jvp(low, torch.bfloat16)
    with tangent_islands.unfused():
        assert all(torch.equal(a, b) for a, b in zip(jvp(low, torch.bfloat16), eager))   # the switch works
    return {"eager": tuple(rel(a, b) for a, b in zip(eager, want)),
            "islands fused": tuple(rel(a, b) for a, b in zip(fused, want))}


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
    print("\n| bf16 DiT JVP pass vs float64 | primal max rel error | tangent max rel error |\n|---|---|---|")
    for name, (primal, tangent) in bf16_errors().items():
        print(f"| {name} | {primal:.2e} | {tangent:.2e} |", flush=True)


if __name__ == "__main__":
    main()
