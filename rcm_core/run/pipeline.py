"""The whole job without Ray: data → teacher (trained here, cached) → rCM distillation → step-count table.

    python -m rcm_core.run [--config experiments/debug_cpu.yaml] [key=value ...]

This is the core engine's own entry point (and what the tests drive); `workflows/distill.py` runs the same
pieces on Ray Train with Ray Data and MLflow.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rcm_core.config import ExperimentCfg, load_config
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import DistillState
from rcm_core.eval.gmm import GaussianMixture as EvalGMM
from rcm_core.eval.features import RandomProjection
from rcm_core.eval.evaluate import EvalBank, StepCountEvaluator, format_table
from rcm_core.run.loop import print_reporter, run_training
from rcm_core.method.tangent_check import TangentCheck, check_rows, time_derivative_check, warn_if_rough
from rcm_core.run.teacher import load_or_train_teacher
from rcm_core.data.toy import GaussianMixture, default_gmm, gmm_batches

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "debug_cpu.yaml"


def toy_gmm(cfg: ExperimentCfg) -> GaussianMixture:
    if cfg.model.in_channels < 2:
        raise ValueError(f"model.in_channels={cfg.model.in_channels}: the toy mixture needs ≥ 2 dimensions")
    return default_gmm(dim=cfg.model.in_channels, classes=max(cfg.model.num_classes, 1))


def eval_gmm(gmm: GaussianMixture) -> EvalGMM:
    return EvalGMM(means=gmm.means, stds=gmm.std, weights=gmm.weights)


def toy_evaluator(cfg: ExperimentCfg, teacher: TrigFlowDenoiser, gmm: GaussianMixture,
                  device: torch.device) -> StepCountEvaluator:
    n = cfg.eval.num_samples
    labels = torch.arange(n) % gmm.num_classes
    bank = EvalBank.make([gmm.dim, 1, 1, 1], labels, cfg.eval.seed)
    return StepCountEvaluator(cfg=cfg, teacher=teacher, bank=bank, device=device, gmm=eval_gmm(gmm),
                              extractors=[RandomProjection(gmm.dim, out_dim=gmm.dim, seed=0)])


def toy_teacher(cfg: ExperimentCfg, gmm: GaussianMixture, device: torch.device) -> TrigFlowDenoiser:
    """The toy's flow-matching teacher, trained once per config and cached under .cache/teachers."""
    batches = gmm_batches(gmm, cfg.teacher.train_batch_size, seed=cfg.train.seed + 1)
    return load_or_train_teacher(cfg, batches, device=device, data_key=f"gmm-{gmm.dim}-{gmm.num_classes}")


def toy_teacher_check(cfg: ExperimentCfg, teacher: TrigFlowDenoiser, gmm: GaussianMixture,
                      device: torch.device) -> TangentCheck:
    """The teacher's JVP-vs-central-difference check (rcm_core.method.tangent_check) on seeded mixture samples, printed."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    x0, labels = gmm.sample(check_rows(gmm.dim), g)
    check = time_derivative_check(teacher, x0.to(device), labels.to(device),
                                  generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    warn_if_rough(check)
    return check


def run_toy(cfg: ExperimentCfg, *, resume: str | None = None,
            reporter=print_reporter) -> tuple[DistillState, StepCountEvaluator]:
    """Train (or load) the toy teacher, distil it, evaluate every step count. Returns state and evaluator."""
    device = torch.device(cfg.train.device)
    gmm = toy_gmm(cfg)
    teacher = toy_teacher(cfg, gmm, device)
    toy_teacher_check(cfg, teacher, gmm, device)
    evaluator = toy_evaluator(cfg, teacher, gmm, device)
    state = run_training(cfg, lambda start: gmm_batches(gmm, cfg.data.batch_size, cfg.train.seed, start),
                         reporter, resume, teacher=teacher, evaluator=evaluator, device=device)
    return state, evaluator


def check_resume_dir(cfg: ExperimentCfg, resume: str | None, *, allow_changed: bool = False) -> dict[str, tuple]:
    """The no-Ray twin of workflows/storage.py check_resume: the config recorded in the checkpoint `resume` names
    (a folder, or 'latest' under train.run_dir) against `cfg`. Keys that shape training must agree unless
    `allow_changed` (--resume-changed); returns the shaping changes that were forced, {} otherwise."""
    from rcm_core.config import check_resume_config, show_changes
    from rcm_core.run.checkpoint import RUN_CONFIG_FILE, latest_checkpoint

    if resume is None:
        return {}
    folder = latest_checkpoint(Path(cfg.train.run_dir) / "checkpoints") if resume == "latest" else Path(resume)
    if folder is None:
        return {}                                  # 'latest' with no checkpoint yet: a fresh start
    recorded = folder / RUN_CONFIG_FILE
    saved = json.loads(recorded.read_text()) if recorded.is_file() else {}
    shaping, free = check_resume_config(
        saved, cfg, allow_changed=allow_changed,
        fixes="Either start afresh (another train.run_dir, or without --resume), or continue the old run anyway "
              "with --resume-changed")
    if free:
        tqdm.write(f"resuming {folder} with: {show_changes(free)}")
    if shaping:
        tqdm.write(f"resuming {folder} despite (--resume-changed): {show_changes(shaping)}")
    return shaping


def cli_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="rCM distillation on the built-in toy problem, without Ray.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="checkpoint folder, or 'latest' under the run dir")
    parser.add_argument("--resume-changed", action="store_true",
                        help="resume even though keys that shape training differ from the checkpoint's config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.reg_weight=0.1")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.data.source != "gmm":
        parser.error(f"data.source={cfg.data.source!r}: without Ray only the toy 'gmm' source runs here; "
                     f"use workflows/distill.py for data sets")
    check_resume_dir(cfg, args.resume, allow_changed=args.resume_changed)      # before any teacher is trained
    _, evaluator = run_toy(cfg, resume=args.resume)
    table = format_table(evaluator.last_report)
    run_dir = Path(cfg.train.run_dir)
    (run_dir / "eval_table.txt").write_text(table + "\n")
    tqdm.write("\n" + table)
    tqdm.write(f"\nrun folder: {run_dir.resolve()} (config/resolved.yaml, checkpoints/, eval_table.txt)")

