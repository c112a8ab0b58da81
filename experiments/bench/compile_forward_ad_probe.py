"""Does torch.compile keep forward-mode (dual-tensor) tangents? The question behind `model.compile` leaving the JVP
pass eager (issue 28, lever 2). Prints one line per backend and route; exits 1 if inductor drops the tangent.

    python experiments/bench/compile_forward_ad_probe.py              # CPU, float64
    python3 experiments/bench/compile_forward_ad_probe.py --device cuda --dtype float32

Routes: "dual" calls the compiled function on `forward_ad` dual tensors (how rcm_core's JVP pass runs, because
FSDP2's all-gathers fail inside functorch); "func.jvp" compiles `torch.func.jvp` of the same function. Seen on
torch 2.13.0+cpu (2026-12-02): dual + inductor returns the right primal and tangent None (no error, no warning);
dual + eager / aot_eager and func.jvp + inductor keep it (max tangent error ≤ 4.4e-16).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F


def block(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A residual LayerNorm → linear → tanh-GELU branch: the elementwise + matmul mix of a DiT block."""
    return x + F.gelu(lin(F.layer_norm(x, x.shape[-1:])), approximate="tanh")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16).to(args.device, dt)
    x = torch.randn(2, 8, 16, device=args.device, dtype=dt)
    x_dot = torch.randn_like(x)
    fn = lambda a: block(lin, a)                                          # noqa: E731
    with torch.no_grad():
        ref, ref_t = torch.func.jvp(fn, (x,), (x_dot,))
    dropped = False
    for backend in ("eager", "aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend)
        with torch.no_grad(), fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(compiled(fwAD.make_dual(x, x_dot)))
        err = "tangent None" if tangent is None else f"tangent max error {(tangent - ref_t).abs().max().item():.1e}"
        print(f"dual     {backend:9s} primal max error {(primal - ref).abs().max().item():.1e}, {err}")
        dropped |= backend == "inductor" and tangent is None
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, a_dot: torch.func.jvp(fn, (a,), (a_dot,)), backend="inductor")
    with torch.no_grad():
        primal, tangent = compiled(x, x_dot)
    print(f"func.jvp inductor  primal max error {(primal - ref).abs().max().item():.1e}, "
          f"tangent max error {(tangent - ref_t).abs().max().item():.1e}")
    print(f"torch {torch.__version__} on {args.device}: inductor "
          + ("DROPS forward-AD tangents: keep the JVP pass eager" if dropped else "keeps forward-AD tangents"))
    return 1 if dropped else 0


if __name__ == "__main__":
    sys.exit(main())
