"""Where the warp-specialised backward differs from the plain one, pass by pass (issue 28).

    python3 experiments/bench/bwd_ws_diag.py        # on an sm_90 GPU; on a CPU: the interpreter, two small shapes

Per shape (bf16, no mask): the backward with WS in both passes, in the dK/dV pass only and in the dQ pass only,
each with its outputs filled with NaN before launch (a row the kernel never writes stays NaN) and without; per
gradient it prints one JSON line: non-finite count, the row ranges holding them, and the largest |difference|
of the finite entries from the plain backward (RCM_KERNELS_BWD_WS=off). Writes $OUT/ws_diag.json. Tiles are
the fixed ones (RCM_KERNELS_AUTOTUNE=0) and TMA is forced on, as the WS path needs.
"""
import json
import os
import sys

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["RCM_KERNELS_AUTOTUNE"] = "0"
os.environ["RCM_KERNELS_TMA"] = "on"
import kernels  # noqa: E402
import kernels.flash_jvp as katt  # noqa: E402

_orig_fixed = katt._fixed_config


def _patched(mode):
    def fixed(name, block_d, fp32, ws_ok=False):
        cfg = _orig_fixed(name, block_d, fp32, ws_ok)
        if name.startswith("_attn_bwd") and cfg.get("WS"):
            keep = {"both": True, "dkdv": name.endswith("dkdv"), "dq": name.endswith("dq")}[mode]
            if not keep:
                cfg = _orig_fixed(name, block_d, fp32, False)
        return cfg
    return fixed


def rows_bad(x):  # x [B,H,L,D] -> list of (start,end) row ranges with any non-finite, over all b,h
    bad = (~torch.isfinite(x.float())).any(-1).any(0).any(0).nonzero().flatten().tolist()
    ranges, s = [], None
    for i, r in enumerate(bad):
        if s is None:
            s = r
        if i + 1 == len(bad) or bad[i + 1] != r + 1:
            ranges.append((s, r))
            s = None
    return ranges


def grads(q, k, v, w):
    xs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    o = kernels.attention(*xs)
    (o.float() * w).sum().backward()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return [t.grad for t in xs]


def main():
    shapes = [(1, 2, 77, 150, 64), (1, 2, 76, 128, 64), (1, 2, 128, 64, 128), (1, 2, 77, 150, 128),
              (1, 2, 256, 256, 128), (1, 12, 8190, 8190, 128)]
    if DEV == "cpu":
        shapes = shapes[:2]
    out = []
    for B, H, LQ, LK, D in shapes:
        g = torch.Generator(device=DEV).manual_seed(0)
        q = torch.randn(B, H, LQ, D, device=DEV, generator=g).bfloat16()
        k = torch.randn(B, H, LK, D, device=DEV, generator=g).bfloat16()
        v = torch.randn(B, H, LK, D, device=DEV, generator=g).bfloat16()
        w = torch.randn(B, H, LQ, D, device=DEV, generator=g)
        os.environ["RCM_KERNELS_BWD_WS"] = "off"
        katt.POISON_OUTPUTS = True
        ref = grads(q, k, v, w)
        os.environ["RCM_KERNELS_BWD_WS"] = "auto"
        for mode in ("both", "dkdv", "dq"):
            for poison in (True, False):
                katt._fixed_config = _patched(mode)
                katt.POISON_OUTPUTS = poison
                try:
                    got = grads(q, k, v, w)
                    row = {"shape": [B, H, LQ, LK, D], "mode": mode, "poison": poison}
                    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
                        fin = torch.isfinite(a)
                        row[name] = {"nonfinite": int((~fin).sum()), "rows": rows_bad(a)[:6],
                                     "maxdiff_finite": float((a.float() - r.float())[fin].abs().max()) if fin.any() else None,
                                     "ref_max": float(r.float().abs().max())}
                except Exception as e:  # noqa: BLE001  (a failed launch is a finding, reported in its row)
                    row = {"shape": [B, H, LQ, LK, D], "mode": mode, "poison": poison, "error": repr(e)[:300]}
                finally:
                    katt._fixed_config = _orig_fixed
                print(json.dumps(row), flush=True)
                out.append(row)
    with open(os.path.join(os.environ.get("OUT", "."), "ws_diag.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
