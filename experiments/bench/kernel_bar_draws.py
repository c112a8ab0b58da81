"""Where the kernel tests' bars come from (issue 27): the fused attention's errors over many seeded draws.

    python experiments/bench/kernel_bar_draws.py --seeds 0-199 --workers 14 --out draws.json   # Triton interpreter
    python experiments/bench/kernel_bar_draws.py --merge a.json b.json --out draws.json          # draws of several runs
    python experiments/bench/kernel_bar_draws.py --table --out draws.json                        # the table alone

`tests/test_kernels.py` checks each case at one fixed seed (its index), against `BARS` in units of u·max|ref|.
This script runs the same draws (`jvp_draw`, `backward_draw` of that test file, imported from it: one code path) at
every seed of `--seeds`, for every case and dtype, in `--workers` processes, and writes each output's max error in
those units per seed to `--out` (JSON, merged with what the file already holds, so a run cut short or spread over
machines adds up). It prints per test, output and dtype: the draws, the worst, 1.5× the worst (the rule the bars
follow) and the bar in the test, marked TOO LOW where a draw would fail it. On CPU the kernels run under the Triton
interpreter, as in CI: ~2 s a draw on this project's 2-core box (28 s for a seed's 15 case × dtype draws, so 200
seeds are ~93 core-minutes), so run it where cores are idle. Not on the lent H200 host: its Triton 3.6 interpreter
(Python 3.12, its own NumPy) fails every draw in the forward's key loop ("only 0-dimensional arrays can be converted
to Python scalars", 2026-12-04), so its 16 cores cannot stand in for this box's interpreter.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 1.5


def load_tests():
    """tests/test_kernels.py as a module (the tests folder is no package)."""
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("test_kernels", ROOT / "tests" / "test_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case_id(case) -> str:
    return f"{case[2]}x{case[3]}d{case[4]}-{case[5]}"


def one_draw(test: str, case_index: int, dtype_name: str, seed: int) -> tuple[str, str, str, int, dict]:
    """Errors of one (test, case, dtype, seed) in units of u·max|ref|; inf where the kernel wrote non-finite values."""
    import torch
    os.environ["TRITON_INTERPRET"] = "1"          # kernels read it at call time
    torch.set_num_threads(1)
    t = load_tests()
    t.katt.POISON_OUTPUTS = True                   # an unwritten element is NaN, so it shows as inf here
    dtype = getattr(torch, dtype_name)
    cases = t.CASES if test == "jvp" else t.CASES[:2]
    draw = (t.jvp_draw if test == "jvp" else t.backward_draw)(cases[case_index], dtype, "cpu", seed)
    errors = {}
    for name in t.BARS[test]:
        ours, ref, u = draw[name]
        scale = u * ref.double().abs().max().item()
        errors[name] = t._err(ours, ref) / scale if torch.isfinite(ours).all() else math.inf
    return test, case_id(cases[case_index]), dtype_name, seed, errors


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def merge(into: dict, test: str, case: str, dtype: str, seed: int, errors: dict) -> None:
    for name, err in errors.items():
        into.setdefault(test, {}).setdefault(case, {}).setdefault(dtype, {}).setdefault(name, {})[str(seed)] = err


def table(draws: dict) -> str:
    """Per test, output and dtype, over every case and seed: draws, worst, 1.5× worst, the test's bar, verdict."""
    t = load_tests()
    rows = ["| test | output | dtype | draws | worst | 1.5 × worst | bar in the test | |", "|---|---|---|---:|---:|---:|---:|---|"]
    for test, cases in sorted(draws.items()):
        merged: dict = {}
        for per_dtype in cases.values():
            for dtype, outputs in per_dtype.items():
                for name, by_seed in outputs.items():
                    merged.setdefault((name, dtype), []).extend(by_seed.values())
        for (name, dtype), values in sorted(merged.items()):
            bar = t.BARS[test][name][getattr(t.torch, dtype)]
            worst = max(values)
            verdict = "TOO LOW: a draw fails it" if worst > bar else ("under 1.5 × worst" if bar < MARGIN * worst else "")
            rows.append(f"| {test} | {name} | {dtype} | {len(values)} | {worst:.3g} | {MARGIN * worst:.3g} | {bar:g} "
                        f"| {verdict} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-199", help="e.g. 0-199 or 0-9,50-59")
    ap.add_argument("--tests", default="jvp,bwd")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--budget-s", type=float, default=0.0, help="cancel the draws not yet started after this many seconds")
    ap.add_argument("--out", default="kernel_draws.json")
    ap.add_argument("--merge", nargs="+", default=[], help="JSON files of earlier runs to add to --out, then print")
    ap.add_argument("--table", action="store_true", help="print the table of what --out holds; run no draw")
    args = ap.parse_args(argv)
    out = Path(args.out)
    draws = json.loads(out.read_text()) if out.is_file() else {}
    for path in args.merge:
        for test, cases in json.loads(Path(path).read_text()).items():
            for case, per_dtype in cases.items():
                for dtype, outputs in per_dtype.items():
                    for name, by_seed in outputs.items():
                        for seed, err in by_seed.items():
                            merge(draws, test, case, dtype, int(seed), {name: err})
    if not (args.merge or args.table):
        t = load_tests()
        jobs = [(test, i, dtype, seed) for seed in parse_seeds(args.seeds) for test in args.tests.split(",")
                for i in range(len(t.CASES) if test == "jvp" else 2) for dtype in args.dtypes.split(",")]
        done = {(test, case_id(t.CASES[i]), dtype, str(seed)) for test, i, dtype, seed in jobs
                if str(seed) in draws.get(test, {}).get(case_id(t.CASES[i]), {}).get(dtype, {}).get("o", {})}
        jobs = [j for j in jobs if (j[0], case_id(t.CASES[j[1]]), j[2], str(j[3])) not in done]
        print(f"{len(jobs)} draws to run ({len(done)} already in {out}), {args.workers} workers", flush=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(one_draw, *job) for job in jobs]
            for finished, fut in enumerate(as_completed(futures), 1):
                merge(draws, *fut.result())
                if finished % 10 == 0 or finished == len(jobs):
                    out.write_text(json.dumps(draws))
                    print(f"[{time.perf_counter() - t0:.0f} s] {finished}/{len(jobs)} draws", flush=True)
                if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                    cancelled = sum(f.cancel() for f in futures)
                    print(f"--budget-s {args.budget_s:.0f}: {cancelled} draws not started", flush=True)
                    break
    out.write_text(json.dumps(draws))
    print(table(draws))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
