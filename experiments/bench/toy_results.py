"""The paper's claims in miniature on the toy mixture (issue 4, result 1). Prints the tables of docs/RESULTS.md.

    .venv/bin/python experiments/bench/toy_results.py [--steps 600] [--out runs/toy_results]

One teacher (trained once, cached; time input model.time_scale·s, 10 by default), then sCM, DMD and rCM students,
rCM with λ ∈ {1, 0.1, 0.01, 0.001}, and dCM alone and with DMD (`--runs` picks a subset), all with the same seed,
data and budget; each evaluated at 1, 2 and 4 steps against the teacher at 50 Heun steps (99 NFE), with bootstrap
CIs and the teacher-vs-teacher floor. One torch thread: the tables are the same on every run of one commit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rcm_core.config import load_config  # noqa: E402
from rcm_core.eval.report import format_table  # noqa: E402
from rcm_core.run.pipeline import DEFAULT_CONFIG, run_toy  # noqa: E402

COLUMNS = ["gmm_precision", "gmm_coverage", "gmm_mode_kl", "gmm_nll", "recall_rp2", "div_ratio_rp2", "fd_rp2"]
RUNS = {
    "sCM": ["distill.mode=scm"],
    "DMD": ["distill.mode=dmd"],
    "rCM λ=1": ["distill.mode=rcm", "distill.reg_weight=1.0"],
    "rCM λ=0.1": ["distill.mode=rcm", "distill.reg_weight=0.1"],
    "rCM λ=0.01": ["distill.mode=rcm", "distill.reg_weight=0.01"],
    "rCM λ=0.001": ["distill.mode=rcm", "distill.reg_weight=0.001"],
    "dCM": ["distill.mode=dcm"],                                        # issue 21: discrete-time CM, N = 48
    "dCM N=16": ["distill.mode=dcm", "distill.dcm_total_steps=16"],     # a coarser grid for short runs
    "dCM+DMD λ=0.01": ["distill.mode=dcm_dmd", "distill.reg_weight=0.01"],
    "dCM+DMD N=16 λ=0.01": ["distill.mode=dcm_dmd", "distill.dcm_total_steps=16", "distill.reg_weight=0.01"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="runs/toy_results")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: %(default)s")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    chosen = [n.strip() for n in args.runs.split(",") if n.strip()]
    if unknown := [n for n in chosen if n not in RUNS]:
        raise SystemExit(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    for name in chosen:
        extra = RUNS[name]
        slug = name.replace(" ", "_").replace("λ=", "l")
        cfg = load_config(DEFAULT_CONFIG, [f"train.steps={args.steps}", "train.checkpoint_every=0",
                                           f"train.run_dir={args.out}/{slug}", *extra, *args.overrides])
        _, evaluator = run_toy(cfg, reporter=lambda *a: None)
        table = format_table(evaluator.last_report, columns=COLUMNS)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{slug}.txt").write_text(table + "\n")
        print(f"\n### {name} ({args.steps} iterations)\n```\n{table}\n```", flush=True)


if __name__ == "__main__":
    main()
