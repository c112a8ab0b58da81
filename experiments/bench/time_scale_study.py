"""Which time input k·s should teachers trained here use? (issue 18) Prints one table, kept in docs/RESULTS.md.

    .venv/bin/python experiments/bench/time_scale_study.py [--scales 1000 100 10 1] [--steps 400] [--lrs 1e-3]

For each k: the debug_cpu toy teacher is retrained with `model.time_scale=k` (cached under .cache/teachers,
so toy_results.py reuses the k=10 one), its JVP-vs-central-difference ratio (rcm_core.method.tangent_check) is measured,
and a pure-sCM student is distilled from it at each learning rate. Columns: the teacher's own precision (50 Heun
steps, from the report's floor row), the worst JVP/central-difference ratio over the grid, the EMA student's
1/2/4-step precision and 2-step coverage, and the tangent norm ‖g‖ (train/scm_g_norm) over the first and the
last log window: its steady rise is the failure's early sign. One torch thread, every seed fixed: the table is
the same on every run on one machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rcm_core.config import load_config  # noqa: E402
from rcm_core.run.pipeline import DEFAULT_CONFIG, run_toy, toy_gmm, toy_teacher, toy_teacher_check  # noqa: E402


def teacher_ratio(cfg) -> float:
    """The check run_toy prints before distilling, kept for the table."""
    gmm, device = toy_gmm(cfg), torch.device(cfg.train.device)
    return toy_teacher_check(cfg, toy_teacher(cfg, gmm, device), gmm, device).max_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[1000.0, 100.0, 10.0, 1.0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--steps", type=int, default=400, help="sCM iterations per student")
    ap.add_argument("--out", default="runs/time_scale_study")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. eval.num_samples=500")
    args = ap.parse_args()
    torch.set_num_threads(1)
    head = (f"| time input | teacher precision | JVP/CD ratio (max) | lr | sCM 1 / 2 / 4-step precision "
            f"| 2-step coverage | ‖g‖ first → last |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in args.scales:
        for lr in args.lrs:
            slug = f"k{k:g}_lr{lr:g}"
            cfg = load_config(DEFAULT_CONFIG, [f"model.time_scale={k}", "distill.mode=scm", f"optim.lr={lr}",
                                               f"train.steps={args.steps}", "train.checkpoint_every=0",
                                               "train.log_every=50", f"train.run_dir={args.out}/{slug}",
                                               *args.overrides])
            ratio = teacher_ratio(cfg)
            g_norms: list[float] = []
            _, ev = run_toy(cfg, reporter=lambda step, m, ck: g_norms.append(m["train/scm_g_norm"])
                            if "train/scm_g_norm" in m else None)
            rows, floor = ev.last_report.rows, ev.last_report.floor
            prec = " / ".join(f"{rows[f'nfe_{n}']['gmm_precision'].value:.2f}" for n in cfg.sampler.step_counts)
            lines.append(f"| {k:g}·s | {floor['gmm_precision'].value:.2f} | {ratio:.2f} | {lr:g} | {prec} | "
                         f"{rows['nfe_2']['gmm_coverage'].value:.3f} | {g_norms[0]:.2f} → {g_norms[-1]:.2f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(table + "\n")
    print(f"\n{table}")


if __name__ == "__main__":
    main()
