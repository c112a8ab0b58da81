"""sCM vs DMD vs rCM on moving Fashion-MNIST video latents (issue 4, result 2): prints table 2 of docs/RESULTS.md.

    # 1. here, where Debian's Fashion-MNIST is installed: write the data set to carry (6000 rows float16, 38 MiB;
    #    runs/ is git-ignored, so name the folder in the device call's `carry`)
    python experiments/bench/fashion_results.py --prepare-only --data runs/data/fashion_video
    # 2. on the GPU machine (needs pyarrow, numpy, pyyaml, tqdm, Pillow; no ray, mlflow or scikit-learn)
    RCM_KERNELS_AUTOTUNE=0 python3 experiments/bench/fashion_results.py --data runs/data/fashion_video --out /tmp/fashion --archive $OUT/fashion_results.tar.gz
    # CPU smoke test of the whole pipeline (meaningless numbers, a few minutes on 2 cores)
    python experiments/bench/fashion_results.py --tiny --out /tmp/fashion_tiny

Phases (each timed and printed): data → owned feature classifier (trained on the data set's frames, held-out
accuracy printed) → teacher (flow matching, class-conditional DiT) → evaluation bank and the teacher's samples
(50 guided Euler steps, twice: reference and the disjoint-seed floor) → sCM, DMD and rCM students, each started
from the teacher with the same seed, data and number of iterations → each EMA student at 1/2/4 steps.
Metrics (rcm_core/eval): Fréchet distance, precision/recall and diversity ratio in the classifier's feature space
(`_feat`) and a 64-d random projection (`_rp64`), class accuracy, temporal consistency (label agreement, frame
cosine, motion ratio), paired MSE to the teacher from the same noise, seconds per sample (median of synchronised
passes over one batch of 512 already on the device) and the speed-up over the teacher; 95 % bootstrap half-widths;
the last row of each table is the teacher against itself on other seeds (the noise floor).

Budgets: --teacher-seconds / --student-seconds time a few iterations first and set teacher.train_steps and one
train.steps for all three students (the slowest method's pace fits the budget; tangent warm-up keeps its share
of train.steps); 0 uses the config's numbers as they stand. Everything lands under --out: tables/*.txt and
tables/table2.md, samples/<method>/nfe_<N>.png|.gif, the teacher and the classifier; --archive packs the tables
and pictures (not the weights) into one .tar.gz.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from rcm_core.config import ExperimentCfg, load_config, save_resolved
from rcm_core.data.latents import MANIFEST, LatentBatch, LatentDataset, Manifest, write_shards
from rcm_core.eval.features import (
    FeatureNet,
    RandomProjection,
    save_feature_net,
    train_feature_classifier,
)
from rcm_core.eval.metrics import Estimate
from rcm_core.eval.report import StepCountReport, format_table
from rcm_core.eval.evaluate import EvalBank, StepCountEvaluator
from rcm_core.method.samplers import consistency_sample, teacher_sample

DEFAULT_CONFIG = ROOT / "experiments" / "fashion_video.yaml"
METHODS = {"sCM": ["distill.mode=scm"], "DMD": ["distill.mode=dmd"], "rCM": ["distill.mode=rcm"]}
# Chosen by name with --methods (not run by default): discrete-time CM alone and with the DMD term (issue 21).
# The official grid has N = 48 steps; N = 16 is the coarser grid that converged within a short budget on the toy.
MORE_METHODS = {"dCM": ["distill.mode=dcm"], "dCM_DMD": ["distill.mode=dcm_dmd"],
                "dCM_N16": ["distill.mode=dcm", "distill.dcm_total_steps=16"],
                "dCM_DMD_N16": ["distill.mode=dcm_dmd", "distill.dcm_total_steps=16"]}
# The table's columns (format_table keeps this order); the full set of metrics goes to tables/<method>_full.txt.
COLUMNS = ["nfe", "sec_per_sample", "speedup", "fd_feat", "precision_feat", "recall_feat", "div_ratio_feat",
           "fd_rp64", "class_acc", "label_agree", "frame_cos", "motion_ratio", "paired_mse"]
# --tiny: the whole pipeline on a CPU in a few minutes (shapes and counts only; the numbers mean nothing).
TINY_OVERRIDES = ["model.dim=32", "model.ffn_dim=64", "model.num_heads=2", "model.num_layers=1", "model.text_dim=16",
                  "model.label_tokens=2", "data.frames=4", "data.canvas=16", "data.item_size=8", "data.num_rows=256",
                  "data.rows_per_shard=128", "data.batch_size=16", "teacher.train_steps=30",
                  "teacher.train_batch_size=32", "train.steps=10", "distill.tangent_warmup=3", "optim.lr_warmup=2",
                  "sampler.teacher_steps=4", "eval.num_samples=100", "eval.bootstrap=5", "train.log_every=5"]


def log(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


@dataclass
class Clock:
    """Wall time per phase (CUDA is synchronised at each phase boundary so the numbers are honest)."""
    device: torch.device
    phases: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                clock.sync()
                self.start = time.perf_counter()
                log(f"== {name} ...")

            def __exit__(self, *exc):
                clock.sync()
                clock.phases[name] = time.perf_counter() - self.start
                log(f"== {name}: {clock.phases[name]:.1f} s (total {time.perf_counter() - clock.t0:.1f} s)")
        return _Phase()


# ----------------------------------------------------------------------------------------------------------
# Data: a latent data set folder (Parquet + manifest.json), written here or by workflows/prepare_latents.py.

def prepare_data(cfg: ExperimentCfg, url: str, *, latent_dtype: str = "float16") -> Manifest:
    """Write cfg.data.num_rows moving-Fashion-MNIST rows to `url` (float16 halves what has to be carried)."""
    from tqdm import tqdm

    from workflows.prepare_latents import moving_fashion_rows

    with tqdm(total=cfg.data.num_rows, desc="prepare moving_fashion", unit="row", file=sys.stderr) as bar:
        rows, info = moving_fashion_rows(cfg.data, bar)
        m = write_shards(rows, url, rows_per_shard=cfg.data.rows_per_shard, latent_dtype=latent_dtype, **info)
    size = sum(f.stat().st_size for f in Path(url).iterdir()) / 2**20
    log(f"wrote {m.num_rows} rows, latent {m.latent_shape} {m.latent_dtype}, images from "
        f"{m.source.get('images')}, {size:.1f} MiB, to {url}")
    return m


def check_data_matches(m: Manifest, cfg: ExperimentCfg, url: str) -> None:
    want = [cfg.model.in_channels, cfg.data.frames, cfg.data.canvas // cfg.data.patch, cfg.data.canvas // cfg.data.patch]
    if list(m.latent_shape) != want or (m.num_classes or 0) != cfg.model.num_classes:
        raise SystemExit(f"{url}: latent {m.latent_shape} with {m.num_classes} classes, but the config wants {want} "
                         f"with {cfg.model.num_classes} (prepare it with the same config and overrides, or --tiny)")


class DeviceBatches:
    """The whole (normalised) data set on the device; batches follow `LatentDataset.indices` (seeded per epoch)."""

    def __init__(self, ds: LatentDataset, device: torch.device):
        self.ds = ds
        self.latent = torch.from_numpy(ds.arrays["latent"]).to(device)
        self.label = torch.from_numpy(ds.arrays["label"]).to(device)

    def stream(self, batch_size: int, seed: int) -> Callable[[int], Iterator[LatentBatch]]:
        def from_step(start: int) -> Iterator[LatentBatch]:
            step = start
            while True:
                idx = torch.from_numpy(self.ds.indices(step, batch_size, seed)).to(self.latent.device)
                yield LatentBatch(latent=self.latent[idx], label=self.label[idx])
                step += 1
        return from_step


# ----------------------------------------------------------------------------------------------------------
# Budgets: a few timed iterations set the step counts.

def _per_step(run: Callable[[int], None], warmup: int, timed: int, device: torch.device) -> float:
    run(warmup)                               # compile / autotune the kernels outside the timing
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    run(timed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / timed


def teacher_step_time(cfg: ExperimentCfg, batches: DeviceBatches, device: torch.device, timed: int) -> float:
    from rcm_core.run.teacher import train_teacher

    probe = copy.deepcopy(cfg)

    def run(n: int) -> None:
        probe.teacher.train_steps = n
        train_teacher(probe, batches.stream(probe.teacher.train_batch_size, 999)(0), device=device)
    return _per_step(run, 5, timed, device)


def student_iter_time(cfg: ExperimentCfg, teacher, batches: DeviceBatches, device: torch.device, timed: int) -> float:
    """Seconds per iteration of this mode after warm-up (rCM probed past its tangent warm-up: the dearer mix)."""
    from rcm_core.method.distill import build_state, distill_step, uses_dmd

    probe = copy.deepcopy(cfg)
    probe.distill.tangent_warmup = 0
    state = build_state(probe, copy.deepcopy(teacher))
    stream = batches.stream(probe.data.batch_size, 999)(0)
    g = torch.Generator(device=device).manual_seed(0)

    def run(n: int) -> None:
        for _ in range(n):
            distill_step(state, next(stream), probe, g)
    # whole student:critic cycles, so the mix of the timed iterations is the run's mix
    f = probe.distill.student_update_freq if uses_dmd(probe.distill) else 1
    return _per_step(run, f, max(1, timed // f) * f, device)


def round_steps(n: float, quantum: int = 10) -> int:
    return max(quantum, int(n // quantum) * quantum)


# ----------------------------------------------------------------------------------------------------------
# The run.

@dataclass
class Result:
    reports: dict[str, StepCountReport]
    tables: dict[str, str]               # method → plain-text table (COLUMNS)
    markdown: str                        # everything printed, markdown-ready
    phases: dict[str, float]
    train_steps: int
    teacher_steps: int
    pictures: list[Path]
    out: Path


def add_speedup(report: StepCountReport) -> None:
    """speedup = the teacher's seconds per sample over the row's (a cost column, no CI)."""
    teacher = report.floor["sec_per_sample"].value if report.floor else float("nan")
    for metrics in report.all_rows().values():
        sec = metrics.get("sec_per_sample")
        if sec is not None:
            v = teacher / sec.value if sec.value > 0 else float("nan")
            metrics["speedup"] = Estimate(v, v, v)
    if "speedup" not in report.cost_metrics:
        report.cost_metrics = (*report.cost_metrics, "speedup")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_sample(fn: Callable, bank: EvalBank, device: torch.device, *, batch: int = 512,
                       reps: int = 5) -> float:
    """Median over `reps` synchronised passes of `fn(noise, cond)` on one batch already on the device, per
    sample: the sampler's own cost (the evaluator's timing also holds host copies, which rival a 1-step pass)."""
    z, c = bank.noise[:batch].to(device), bank.labels[:batch].to(device)
    fn(z, c)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn(z, c)
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / z.shape[0]


def set_speed(report: StepCountReport, cfg: ExperimentCfg, student, teacher_sec: float, bank: EvalBank,
              device: torch.device) -> None:
    """Replace sec_per_sample by `seconds_per_sample` timings and add speedup = teacher's / the row's."""
    s = cfg.sampler
    for steps in s.step_counts:
        g = torch.Generator(device=device).manual_seed(0)
        sec = seconds_per_sample(lambda z, c, steps=steps, g=g: consistency_sample(
            student, z, c, steps=steps, sigma_max=s.sigma_max, mid_t=s.mid_t, generator=g), bank, device)
        report.rows[f"nfe_{steps}"]["sec_per_sample"] = Estimate(sec, sec, sec)
    if report.floor is not None:
        report.floor["sec_per_sample"] = Estimate(teacher_sec, teacher_sec, teacher_sec)
    add_speedup(report)


def teacher_seconds_per_sample(cfg: ExperimentCfg, teacher, bank: EvalBank, device: torch.device) -> float:
    s = cfg.sampler
    return seconds_per_sample(lambda z, c: teacher_sample(teacher, z, c, steps=s.teacher_steps,
                                                          guidance=cfg.teacher.guidance, shift=s.teacher_shift,
                                                          solver=s.teacher_solver), bank, device, reps=3)


def summary_table(reports: dict[str, StepCountReport]) -> str:
    """All methods in one table (rows method/nfe_N), the teacher's floor row once at the bottom."""
    first = next(iter(reports.values()))
    rows = {f"{name}/{row}": metrics for name, rep in reports.items() for row, metrics in rep.rows.items()}
    merged = StepCountReport(rows, first.floor_name, first.floor, first.cost_metrics)
    return format_table(merged, columns=COLUMNS)


def pictures_of(samples: dict[str, torch.Tensor], m: Manifest, out_dir: Path, labels=None) -> list[Path]:
    from rcm_core.eval.samples import save_sample_pictures
    try:
        return save_sample_pictures(samples, m, out_dir, labels=labels)
    except ImportError as e:                     # Pillow missing: keep the numbers, say what is missing
        log(f"no pictures ({e}); install Pillow for PNG/GIF")
        return []


def warm_up_samplers(cfg: ExperimentCfg, teacher, bank: EvalBank, device: torch.device, chunk: int = 512) -> None:
    """One pass of each sampler at the evaluation chunk sizes, so Triton compilation is not in sec_per_sample."""
    from rcm_core.eval.evaluate import sample_in_chunks

    s = cfg.sampler
    sample_in_chunks(lambda z, c: teacher_sample(teacher, z, c, steps=1, guidance=cfg.teacher.guidance,
                                                 shift=s.teacher_shift, solver=s.teacher_solver),
                     bank.noise, bank.labels, device, chunk)
    sample_in_chunks(lambda z, c: consistency_sample(teacher, z, c, steps=2, sigma_max=s.sigma_max, mid_t=s.mid_t),
                     bank.noise, bank.labels, device, chunk)


def teacher_time_check(cfg: ExperimentCfg, teacher, lat: torch.Tensor, lab: torch.Tensor, device: torch.device):
    """The JVP-vs-central-difference check every distillation runs first (rcm_core.method.tangent_check, issue 18)."""
    from rcm_core.method.tangent_check import check_rows, time_derivative_check, warn_if_rough

    n = check_rows(math.prod(lat.shape[1:]))
    check = time_derivative_check(teacher, lat[:n].to(device), lab[:n].to(device),
                                  generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    warn_if_rough(check)
    log(check.table())
    return check


def run(cfg: ExperimentCfg, *, data: str, out: Path, device: torch.device, teacher_seconds: float = 0.0,
        student_seconds: float = 0.0, classifier_steps: int = 1500, teacher_path: str = "",
        methods: dict[str, list[str]] | None = None, keep_checkpoints: bool = False,
        probe_iters: int = 20, archive: str = "") -> Result:
    from rcm_core.run.loop import run_training
    from rcm_core.run.teacher import load_teacher, save_teacher, train_teacher

    methods = methods or METHODS
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    clock = Clock(device)
    cfg = copy.deepcopy(cfg)
    cfg.train.device = str(device)

    with clock.phase("data"):
        if not (Path(data) / MANIFEST).is_file():
            log(f"{data}: no {MANIFEST}; generating {cfg.data.num_rows} rows there")
            prepare_data(cfg, data)
        ds = LatentDataset(data)
        m = ds.manifest
        check_data_matches(m, cfg, data)
        batches = DeviceBatches(ds, device)
        log(f"{len(ds)} rows, latent {m.latent_shape} ({m.latent_dtype} on disk), images from "
            f"{m.source.get('images')}")

    with clock.phase("feature classifier"):
        lat, lab = torch.from_numpy(ds.arrays["latent"]), torch.from_numpy(ds.arrays["label"])
        n_hold = max(len(ds) // 10, 1)
        net = train_feature_classifier(lat[n_hold:], lab[n_hold:], steps=classifier_steps, seed=0, device=device,
                                       batch_size=256)
        held_acc = float((net.extract(lat[:n_hold]).video_logits.argmax(-1).cpu() == lab[:n_hold]).double().mean())
        save_feature_net(net, out / "feature_net.pt")
        log(f"classifier {net.version}: held-out video accuracy {held_acc:.3f} on {n_hold} real videos")

    with clock.phase("teacher"):
        if teacher_path:
            teacher = load_teacher(teacher_path, cfg, device)
            log(f"teacher loaded from {teacher_path}")
        else:
            if teacher_seconds > 0:
                sec = teacher_step_time(cfg, batches, device, probe_iters)
                cfg.teacher.train_steps = round_steps(teacher_seconds / sec, 50)
                log(f"teacher: {sec * 1e3:.1f} ms/step → {cfg.teacher.train_steps} steps for {teacher_seconds:.0f} s")
            t = time.perf_counter()
            teacher = train_teacher(cfg, batches.stream(cfg.teacher.train_batch_size, cfg.train.seed + 1)(0),
                                    device=device)
            clock.sync()
            log(f"teacher: {cfg.teacher.train_steps} steps in {time.perf_counter() - t:.1f} s")
            save_teacher(teacher, cfg, out / "teacher.pt")
        teacher_time_check(cfg, teacher, lat, lab, device)

    with clock.phase("teacher samples (reference + floor)"):
        n = cfg.eval.num_samples
        bank = EvalBank.make(m.latent_shape, torch.arange(n) % max(m.num_classes or 1, 1), cfg.eval.seed)
        warm_up_samplers(cfg, teacher, bank, device)
        evaluator = StepCountEvaluator(cfg=cfg, teacher=teacher, bank=bank, device=device, classifier=net,
                                       extractors=[net, RandomProjection(math.prod(m.latent_shape), 64, seed=0)])
        evaluator.teacher_sets()
        t_sec = teacher_seconds_per_sample(cfg, teacher, bank, device)
        log(f"teacher: {t_sec * 1e3:.3f} ms per sample ({cfg.sampler.teacher_steps} {cfg.sampler.teacher_solver} "
            f"steps, guidance {cfg.teacher.guidance})")

    if student_seconds > 0:
        with clock.phase("student budget probe"):
            pace = {}
            for name, extra in methods.items():
                probe_cfg = load_config(None, extra, base=_as_dict(cfg))
                pace[name] = student_iter_time(probe_cfg, teacher, batches, device, probe_iters)
                log(f"{name}: {pace[name] * 1e3:.1f} ms/iteration")
            steps = round_steps(student_seconds / max(pace.values()))
            share = cfg.distill.tangent_warmup / max(cfg.train.steps, 1)
            cfg.train.steps, cfg.distill.tangent_warmup = steps, round(share * steps)
            log(f"students: {steps} iterations each (tangent warm-up {cfg.distill.tangent_warmup})")

    reports, tables, pictures, train_rows = {}, {}, [], []
    pictures += pictures_of({"data": torch.from_numpy(ds.arrays["latent"][:16])}, m, out / "samples")
    for name, extra in methods.items():
        slug = name.replace(" ", "_").replace("λ=", "l")
        mcfg = load_config(None, [*extra, f"train.run_dir={out / 'runs' / slug}"], base=_as_dict(cfg))
        with clock.phase(f"distill {name}"):
            state = run_training(mcfg, batches.stream(mcfg.data.batch_size, mcfg.train.seed), _quiet,
                                 teacher=teacher, device=device)
        with clock.phase(f"evaluate {name}"):
            report = evaluator.evaluate(state.ema.module)
            set_speed(report, cfg, state.ema.module, t_sec, bank, device)
            tables[name] = format_table(report, columns=COLUMNS)
            (out / "tables" / f"{slug}.txt").write_text(tables[name] + "\n")
            (out / "tables" / f"{slug}_full.txt").write_text(format_table(report) + "\n")
            (out / "tables" / f"{slug}.json").write_text(json.dumps(
                {row: {k: [e.value, e.ci_low, e.ci_high] for k, e in mets.items()}
                 for row, mets in report.all_rows().items()}, indent=1))
            pictures += pictures_of(evaluator.last_samples, m, out / "samples" / slug, labels=bank.labels)
            reports[name] = report
            log(f"\n### {name}\n{tables[name]}")
        train_rows.append((name, mcfg.train.steps, state.student_iter, state.critic_iter,
                           clock.phases[f"distill {name}"]))
        if keep_checkpoints:
            save_teacher(state.ema.module, mcfg, out / "runs" / slug / "ema_student.pt")
        else:
            shutil.rmtree(out / "runs" / slug / "checkpoints", ignore_errors=True)
        del state
        if archive:                              # after every method: a run cut short still returns its tables
            write_archive(out, Path(archive))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_resolved(cfg, out)

    tables["all"] = summary_table(reports)
    (out / "tables" / "all.txt").write_text(tables["all"] + "\n")
    md = markdown(cfg, m, device, net, held_acc, reports, tables, train_rows, clock.phases)
    (out / "tables" / "table2.md").write_text(md)
    if archive:
        write_archive(out, Path(archive))
    return Result(reports, tables, md, clock.phases, cfg.train.steps, cfg.teacher.train_steps, pictures, out)


def _quiet(step: int, metrics: dict, ckpt_dir) -> None:
    pass


def _as_dict(cfg: ExperimentCfg) -> dict:
    from rcm_core.config import to_dict
    return to_dict(cfg)


def markdown(cfg: ExperimentCfg, m: Manifest, device: torch.device, net: FeatureNet, held_acc: float,
             reports: dict[str, StepCountReport], tables: dict[str, str], train_rows: list, phases: dict) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mc = cfg.model
    per_row = any(name.startswith("rCM-l") for name in tables)
    lam = "λ as in each row's name (rCM-l<λ>)" if per_row else f"λ = {cfg.distill.reg_weight}"
    lines = [
        (f"Card: {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Data: {m.num_rows} videos "
         f"(images from {m.source.get('images')}), latent {m.latent_shape}. Teacher: DiT {mc.num_layers}×{mc.dim} "
         f"({mc.num_heads} heads), {cfg.teacher.train_steps} flow-matching steps at batch "
         f"{cfg.teacher.train_batch_size}, sampled with {cfg.sampler.teacher_steps} {cfg.sampler.teacher_solver} "
         f"steps at guidance {cfg.teacher.guidance}. Students: {cfg.train.steps} iterations at batch "
         f"{cfg.data.batch_size}, tangent warm-up {cfg.distill.tangent_warmup}, 1 student : "
         f"{cfg.distill.student_update_freq - 1} critic, {lam}. Evaluation: "
         f"{cfg.eval.num_samples} samples, {cfg.eval.bootstrap} bootstrap resamples; classifier {net.version} "
         f"(held-out video accuracy {held_acc:.3f})."),
        "",
        "| method | iterations | student updates | critic updates | wall s |",
        "|---|---|---|---|---|",
        *[f"| {n} | {s} | {su} | {cu} | {w:.1f} |" for n, s, su, cu, w in train_rows],
        "",
        "| phase | wall s |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in phases.items()],
        f"| total | {sum(phases.values()):.1f} |",
    ]
    for name, table in tables.items():
        title = "All methods (teacher floor last)" if name == "all" else f"{name} ({cfg.train.steps} iterations)"
        lines += ["", f"### {title}", "```", table, "```"]
    return "\n".join(lines) + "\n"


def write_archive(out: Path, archive: Path) -> Path:
    """Tables and pictures (no weights) in one .tar.gz (the GPU machine returns few files)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for sub in ("tables", "samples"):
            if (out / sub).exists():
                tar.add(out / sub, arcname=f"fashion_results/{sub}")
        for f in ("config/resolved.yaml",):
            if (out / f).exists():
                tar.add(out / f, arcname=f"fashion_results/{f}")
    return archive


def pick_methods(names: str, lambdas: str) -> dict[str, list[str]]:
    """The students to train, in order: the named METHODS, with rCM replaced by one student per λ if given.
    Every student starts from the same teacher with the same seed, data and iterations, so rows compare."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    known = {**METHODS, **MORE_METHODS}
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise SystemExit(f"--methods {names!r}: choose from {', '.join(known)} (comma-separated)")
    out: dict[str, list[str]] = {}
    for name in chosen:
        if name == "rCM" and lambdas:
            for lam in (float(v) for v in lambdas.split(",")):
                out[f"rCM-l{lam:g}"] = [*METHODS["rCM"], f"distill.reg_weight={lam!r}"]
        else:
            out[name] = known[name]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--data", default="", help="latent data set folder (manifest.json + Parquet); written there "
                                                "first if it has no manifest (default: <out>/data)")
    ap.add_argument("--prepare-only", action="store_true", help="write the data set to --data and stop")
    ap.add_argument("--out", default="runs/fashion_results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher-seconds", type=float, default=120.0, help="0 = teacher.train_steps as configured")
    ap.add_argument("--student-seconds", type=float, default=60.0, help="per method; 0 = train.steps as configured")
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--probe-iters", type=int, default=20, help="timed iterations per budget probe")
    ap.add_argument("--teacher", default="", help="a teacher .pt from an earlier run (skips teacher training)")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="TF32 matmuls and convolutions on CUDA (parameters and the time path stay fp32)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and counts: the whole pipeline on a CPU")
    ap.add_argument("--archive", default="", help="also pack tables and pictures into this .tar.gz")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep run checkpoints and EMA students")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    ap.add_argument("--methods", default="sCM,DMD,rCM",
                    help="comma-separated, from " + ",".join({**METHODS, **MORE_METHODS}))
    ap.add_argument("--rcm-lambdas", default="", help="comma-separated λ values: one rCM student each (named "
                    "rCM-l<λ>) instead of one at distill.reg_weight; the λ ablation on this data set")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. distill.reg_weight=0.1")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [*(TINY_OVERRIDES if args.tiny else []), *args.overrides]
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    data = args.data or str(out / "data")
    if args.prepare_only:
        prepare_data(cfg, data)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.tiny:              # short budgets: the timing probes run too
        args.teacher_seconds = min(args.teacher_seconds, 5.0)
        args.student_seconds = min(args.student_seconds, 3.0)
        args.classifier_steps = min(args.classifier_steps, 30)
        args.probe_iters = min(args.probe_iters, 5)
    t = time.perf_counter()
    res = run(cfg, data=data, out=out, device=device, teacher_seconds=args.teacher_seconds,
              student_seconds=args.student_seconds, classifier_steps=args.classifier_steps,
              teacher_path=args.teacher, keep_checkpoints=args.keep_checkpoints, probe_iters=args.probe_iters,
              archive=args.archive, methods=pick_methods(args.methods, args.rcm_lambdas))
    print("\n" + res.markdown, flush=True)
    print(f"wall time {time.perf_counter() - t:.1f} s; tables in {out / 'tables'}, pictures in {out / 'samples'}",
          flush=True)
    if args.archive:
        print(f"archive: {args.archive}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
