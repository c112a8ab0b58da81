"""Issue 29: the demo's 2-step student against its 1-step one, as a function of the sampler's mid time and of
training length. Sampling only: it reads checkpoints written by `python -m rcm_core.run` and prints tables.

    OMP_NUM_THREADS=1 .venv/bin/python -m rcm_core.run --config experiments/demo.yaml \\
        train.run_dir=runs/inv/s0 train.seed=0 train.steps=1600     # once per seed; checkpoints every 100
    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench/demo_mid_t.py runs/inv/s0 runs/inv/s1 runs/inv/s2 \\
        [--steps 100,400,1600] [--mid-t 1.3,1.0,0.6] [--four "1.3,1,0.6;0.6,0.4,0.2"] [--metrics gmm_precision,fd_rp2]

For every run folder (its own resolved config: seed, teacher) and checkpoint: the EMA student at 1 step, at 2 steps
for each mid time of --mid-t, and at 4 steps for each list of --four (TrigFlow t; EDM σ = tan t), on the evaluation
bank and per-step noises the run's evaluator uses (eval.seed, 1,000 samples), with 95 % bootstrap half-widths
(stratified by class, eval.bootstrap resamples) as in the step-count table. Metrics other than gmm_* also sample
the teacher (the reference set) and take longer. docs/RESULTS.md §1c has the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rcm_core.config import load_config  # noqa: E402
from rcm_core.eval.evaluate import student_samples  # noqa: E402
from rcm_core.eval.report import EvalConfig, evaluate_step_counts  # noqa: E402
from rcm_core.method.distill import build_state  # noqa: E402
from rcm_core.run.checkpoint import load_checkpoint, load_into_state  # noqa: E402
from rcm_core.run.pipeline import toy_evaluator, toy_gmm, toy_teacher  # noqa: E402


METRICS = ("gmm_precision", "gmm_mode_tv", "gmm_nll", "recall_rp2", "fd_rp2")


def row_name(mid: list[float]) -> str:
    return f"nfe_{len(mid) + 1}" + ("_at_" + "/".join(f"{m:g}" for m in mid) if mid else "")


def mid_t_rows(student, evaluator, schedules: list[list[float]],
               features: bool) -> dict[str, dict[str, tuple[float, float]]]:
    """{row_name(mid): {metric: (value, 95 % half-width)}} for each list of mid times (k − 1 of them for k steps),
    on the run evaluator's bank and per-step noise seeds (rcm_core.eval.evaluate: all k-step rows share their noise);
    `features`: also the teacher reference and the k-NN / Fréchet metrics (slower)."""
    cfg, bank = evaluator.cfg, evaluator.bank
    samples = {}
    for mid in schedules:          # the evaluator's own sampling, one step count and mid-time list at a time
        one = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, step_counts=[len(mid) + 1],
                                                                   mid_t=mid))
        (x, _), = student_samples(student, bank, one, torch.device("cpu")).values()
        samples[row_name(mid)] = x
    ref, floor = (evaluator.teacher_sets()[:2] if features else (samples[row_name([])], None))
    report = evaluate_step_counts(samples, ref, reference_2=floor, labels=bank.labels,
                                  extractors=evaluator.extractors if features else (), gmm=evaluator.gmm,
                                  cfg=EvalConfig(num_resamples=cfg.eval.bootstrap))
    rows = {**report.rows, **({"teacher": report.floor} if floor is not None else {})}
    return {name: {m: (e.value, (e.ci_high - e.ci_low) / 2) for m, e in rows[name].items() if m in METRICS}
            for name in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders of `python -m rcm_core.run` (each with checkpoints/)")
    ap.add_argument("--config", default="experiments/demo.yaml")
    ap.add_argument("--mid-t", default="1.5,1.4,1.3,1.2,1.1,1.0,0.9,0.8,0.6")
    ap.add_argument("--four", default="1.3,1,0.6", help="4-step mid-time lists, ';'-separated")
    ap.add_argument("--metrics", default="gmm_precision,gmm_mode_tv", help=f"any of {','.join(METRICS)}")
    ap.add_argument("--steps", default="", help="comma-separated checkpoint iterations (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mids = [float(m) for m in args.mid_t.split(",")]
    schedules = [[], *[[m] for m in mids], *[[float(m) for m in four.split(",")] for four in args.four.split(";")
                                             if four]]
    features = not all(m.startswith("gmm_") for m in args.metrics.split(","))
    cfg = load_config(args.config, [])
    gmm = toy_gmm(cfg)
    print("mid t -> EDM sigma: " + ", ".join(f"{m:g}->{math.tan(m):.2f}" for m in mids))
    names = [row_name(m).replace("nfe_", "").replace("_at_", "@") for m in schedules] + ["teacher"] * features
    print(f"{'run':<8}{'iter':>5} {'metric':<14}" + "".join(f"{n:>16}" for n in names), flush=True)
    for run in args.runs:
        resolved = Path(run, "config", "resolved.yaml")      # the run's own seed, hence its own teacher
        run_cfg = load_config(resolved, []) if resolved.is_file() else cfg
        teacher = toy_teacher(run_cfg, gmm, torch.device("cpu"))
        evaluator = toy_evaluator(run_cfg, teacher, gmm, torch.device("cpu"))
        ckpts = sorted(Path(run, "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if args.steps:
            ckpts = [p for p in ckpts if p.name.split("_")[1] in args.steps.split(",")]
        for ckpt in ckpts:
            state = build_state(run_cfg, teacher)
            load_into_state(state, load_checkpoint(ckpt))
            student = state.ema.compute_copy(state.student).eval()
            rows = mid_t_rows(student, evaluator, schedules, features)
            for metric in args.metrics.split(","):
                cells = "".join(f"{rows[name][metric][0]:>9.4g} ±{rows[name][metric][1]:<6.2g}" for name in rows)
                print(f"{Path(run).name:<8}{ckpt.name.split('_')[1]:>5} {metric:<14}{cells}", flush=True)


if __name__ == "__main__":
    main()
