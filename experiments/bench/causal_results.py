"""Causal rCM on moving Fashion-MNIST video latents (issue 30, item 5): the causal table for docs/RESULTS.md.

    # 1. the data set, as for fashion_results.py (carry runs/data/fashion_video to the GPU machine)
    python experiments/bench/fashion_results.py --prepare-only --data runs/data/fashion_video
    # 2. on one GPU (a 10-minute device call; --resume continues a cut run: finished stages are loaded, a stage cut
    #    mid-way continues from its last checkpoint, so --stage-seconds may exceed one call; keep --out where the
    #    next call finds it, e.g. /tmp of a machine still warm)
    RCM_KERNELS_AUTOTUNE=0 python3 experiments/bench/causal_results.py --data runs/data/fashion_video \
        --out /tmp/causal --archive $OUT/causal_results.tar.gz
    # or from fashion_results.py's teacher and classifier (its --export-weights), so FD_feat compares with its tables
    #   ... --config experiments/fashion_quality.yaml --teacher runs/carry/fq/teacher.pt \
    #       --classifier runs/carry/fq/feature_net.pt
    # CPU smoke test of the whole pipeline (meaningless numbers, a few minutes on 2 cores)
    python experiments/bench/causal_results.py --tiny --out /tmp/causal_tiny

Stages (each timed, its EMA network saved under <out>/runs/<stage>/ so --resume skips it): data → feature
classifier → bidirectional teacher (flow matching; or --teacher) → bidirectional rCM student (the baseline) → `tf`
(the teacher fine-tuned block-causal with the clean context: the causal teacher) → `tf_dcm` and `tf_scm` from the
causal teacher, each scored at --curve-points evenly spaced iterations at 2 steps per chunk (the convergence
comparison; the official claim: sCM gets there faster) → `sf_dmd` from the --sf-init student with the
bidirectional teacher and a fake score. Chunks of one latent frame ([1 | 1 | …], model.first_chunk_t = chunk_t = 1),
intermediate times the official 4-step ones (RF 15/16, 5/6, 5/8).

Tables (rcm_core/eval metrics against the bidirectional teacher's samples, 95 % bootstrap half-widths, the teacher's
disjoint-seed floor last): (1) the causal student at 1/2/4 steps per chunk and at the official per-chunk counts
(4 for the first chunk, 2 after: "causal/4+2", its nfe the mean per chunk), the bidirectional rCM student at 1/2/4
steps and the causal teacher (its guided Euler ODE streamed chunk by chunk); (1b) per latent frame, every set of
(1) and the teacher: class accuracy and RMS over the teacher's (a weak first chunk shows in the first columns);
(2) fd_feat at 2 steps per chunk against iterations, tf_dcm beside tf_scm; (3) latency at batch --latency-batch:
time to the first chunk and per chunk of the causal student beside the time to the whole video of the
bidirectional one; (4) 2× the trained frames
(extrapolation): class accuracy in the first and in the extra frames, label agreement, motion and latent RMS of the
second half over the first (≈ 1: no collapse, ≪ 1: frozen or faded). Budgets: --stage-seconds times a few
iterations of each stage first and sets its iterations; 0 keeps the config's train.steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_results as fr  # noqa: E402  (data, classifier, teacher and timing helpers of the bidirectional table)

from rcm_core.config import ExperimentCfg, load_config, save_resolved  # noqa: E402
from rcm_core.data.latents import MANIFEST, LatentDataset  # noqa: E402
from rcm_core.eval.curves import CurveRecorder, curve_steps, curve_table, series  # noqa: E402
from rcm_core.eval.evaluate import EvalBank, StepCountEvaluator, sample_in_chunks  # noqa: E402
from rcm_core.eval.features import (  # noqa: E402
    RandomProjection,
    load_feature_net,
    save_feature_net,
    train_feature_classifier,
)
from rcm_core.eval.report import EvalConfig, evaluate_step_counts, format_table  # noqa: E402
from rcm_core.eval.video import frame_difference_energy, temporal_consistency  # noqa: E402
from rcm_core.method.samplers import consistency_sample, teacher_nfe  # noqa: E402
from rcm_core.method.streaming import (  # noqa: E402
    DEFAULT_MID_T,
    stream_chunks,
    stream_sample,
    stream_teacher_sample,
)

CAUSAL = ["model.causal=true", "model.first_chunk_t=1", "model.chunk_t=1"]
STAGES = {  # name → overrides on top of the base config (the causal ones add CAUSAL and the official times)
    "rCM": ["distill.mode=rcm"],
    "tf": ["distill.mode=tf"],
    "tf_dcm": ["distill.mode=tf_dcm"],
    "tf_scm": ["distill.mode=tf_scm"],
    "sf_dmd": ["distill.mode=sf_dmd", "distill.sf_steps_per_chunk=[4]"],
}
TINY_STAGE_STEPS = 6
FIRST_CHUNK_STEPS = 4     # official inference: 4 steps for the first chunk (no context yet), 2 for the later ones


def stage_cfg(base: ExperimentCfg, name: str, out: Path) -> ExperimentCfg:
    extra = STAGES[name] + ([] if name == "rCM" else [*CAUSAL, f"sampler.mid_t={DEFAULT_MID_T}"])
    return load_config(None, [*extra, f"train.run_dir={out / 'runs' / name}"], base=fr._as_dict(base))


STAGE_CHECKPOINTS = 10    # checkpoints per stage: a call cut mid-stage loses at most a tenth of it (--resume)


def train_stage(name: str, cfg: ExperimentCfg, teacher, batches, device, out: Path, *, seconds: float,
                probe_iters: int, resume: bool, student_init=None, evaluator=None, curve=None):
    """Train one stage (or load its saved EMA network with --resume); returns (EMA network, {"iterations",
    "seconds"}): the seconds include the budget probe and the curve points, and a resumed stage keeps the numbers of
    the call that trained it, so the table's header is the same whether or not the run was cut.

    A stage longer than one call: its plan (iterations, curve points so far, seconds so far) is written to
    plan.json when it starts and at each of its STAGE_CHECKPOINTS checkpoints; --resume continues it from the last
    checkpoint with the planned iterations (no new budget probe) and the curve points recorded up to there, so the
    finished stage equals an uncut one (the loop resumes exactly)."""
    from rcm_core.run.checkpoint import latest_checkpoint
    from rcm_core.run.loop import run_training
    from rcm_core.run.teacher import load_teacher, save_teacher

    path = out / "runs" / name / "ema.pt"
    record = path.with_name("stage.json")      # what the saved network was trained with, for the table's header
    plan_file = path.with_name("plan.json")    # a stage in progress
    if resume and path.is_file():
        if not record.is_file():
            raise SystemExit(f"--resume: {path} has no {record.name} beside it (saved by an older version of this "
                             f"script), so its iteration count is unknown: delete {path.parent} and train it again")
        done = json.loads(record.read_text())
        fr.log(f"{name}: loaded {path} ({done['iterations']} iterations, trained in {done['seconds']:.0f} s)")
        return load_teacher(path, cfg, device), done
    t0 = time.perf_counter()
    ckpt = latest_checkpoint(path.parent / "checkpoints") if resume and plan_file.is_file() else None
    if ckpt is not None:
        plan = json.loads(plan_file.read_text())
        cfg.train.steps, cfg.distill.tangent_warmup = plan["iterations"], plan["tangent_warmup"]
        at = int(ckpt.name.split("_")[1])
        plan["points"] = [p for p in plan["points"] if p["iteration"] <= at]   # later ones are scored again
        fr.log(f"{name}: resuming at iteration {at} of {cfg.train.steps} from {ckpt}")
    else:
        if seconds > 0:
            probe = copy.deepcopy(cfg)
            if student_init is not None:
                probe.distill.student_checkpoint = ""
            sec = fr.student_iter_time(probe, teacher, batches, device, probe_iters)
            cfg.train.steps = fr.round_steps(seconds / sec)
            cfg.distill.tangent_warmup = min(cfg.distill.tangent_warmup, cfg.train.steps // 10)
            fr.log(f"{name}: {sec * 1e3:.1f} ms/iteration → {cfg.train.steps} iterations")
        plan = {"iterations": cfg.train.steps, "tangent_warmup": cfg.distill.tangent_warmup, "points": [],
                "seconds": 0.0}
    cfg.train.checkpoint_every = max(cfg.train.steps // STAGE_CHECKPOINTS, 1)
    before = plan["seconds"]
    path.parent.mkdir(parents=True, exist_ok=True)

    def keep(points=None):
        """At each checkpoint and curve point: the plan as it stands, for a call that is cut next."""
        if points is not None:
            plan["points"] = points
        plan["seconds"] = before + time.perf_counter() - t0
        plan_file.write_text(json.dumps(plan))

    keep()
    recorder = None
    if evaluator is not None:        # `curve` evenly spaced points (rcm_core/eval/curves.py, shared with fashion)
        done_at = {p["iteration"] for p in plan["points"]}
        recorder = CurveRecorder(evaluator, [i for i in curve_steps(cfg.train.steps, curve) if i not in done_at],
                                 points=list(plan["points"]), on_point=keep)
        cfg.train.eval_every = 1     # the loop asks every iteration; the recorder scores only its own

    def reporter(step, metrics, ckpt_dir):
        if ckpt_dir is not None:
            keep()

    state = run_training(cfg, batches.stream(cfg.data.batch_size, cfg.train.seed), reporter,
                         "latest" if ckpt is not None else None, teacher=teacher, device=device, evaluator=recorder)
    points = series(recorder.points, "nfe_2", "fd_feat") if recorder is not None else []
    save_teacher(state.ema.module, cfg, path)
    (out / "runs" / name / "curve.json").write_text(json.dumps(points))
    done = {"iterations": cfg.train.steps, "seconds": before + time.perf_counter() - t0}
    record.write_text(json.dumps(done))
    plan_file.unlink()
    shutil.rmtree(path.parent / "checkpoints", ignore_errors=True)      # the stage is done: ema.pt is what is kept
    return state.ema.module, done


def stream_fn(model, steps: int, cfg: ExperimentCfg, seed: int = 0, later_steps: int | None = None):
    """Stream with `steps` per chunk, or `steps` for the first chunk and `later_steps` for every later one."""
    g = torch.Generator(device=model.net.patch_embedding.weight.device).manual_seed(seed)
    per_chunk = [steps] if later_steps is None else [steps, later_steps]
    return lambda z, c: stream_sample(model, z, c, steps_per_chunk=per_chunk, mid_t_per_chunk=[cfg.sampler.mid_t],
                                      sigma_max=cfg.sampler.sigma_max, generator=g)


def per_frame_table(samples: dict[str, torch.Tensor], reference: torch.Tensor, labels: torch.Tensor, net) -> str:
    """Table 1b: class accuracy of each latent frame (the frame classifier's per-frame logits) and each frame's RMS
    over the teacher's, per sample set: where a causal student is weak (the first chunk has no context) shows as
    its first columns, beside the bidirectional student and the teachers on the same bank."""
    sets = {"teacher (bidirectional)": reference, **samples}
    rms_ref = reference.float().square().mean(dim=(0, 1, 3, 4)).sqrt()
    acc_rows, rms_rows = [], []
    for name, x in sets.items():
        x = x.float()
        logits = net.extract(x.to(next(net.parameters()).device)).frame_logits.cpu()
        right = (logits.argmax(-1) == labels[:, None].cpu()).double().mean(dim=0)
        rms = x.square().mean(dim=(0, 1, 3, 4)).sqrt() / rms_ref
        acc_rows.append(f"{name:24s}" + "".join(f"{v:7.3f}" for v in right.tolist()))
        rms_rows.append(f"{name:24s}" + "".join(f"{v:7.3f}" for v in rms.tolist()))
    head = f"{'frame':24s}" + "".join(f"{i:7d}" for i in range(reference.shape[2]))
    return ("class accuracy per latent frame\n" + head + "\n" + "\n".join(acc_rows)
            + "\n\nRMS per latent frame / the teacher's\n" + head + "\n" + "\n".join(rms_rows))


def causal_table(cfg, causal_cfg, bidir, causal, causal_teacher, evaluator: StepCountEvaluator, bank, device):
    """Table 1: causal student at 1/2/4 steps per chunk and with the official per-chunk counts (FIRST_CHUNK_STEPS
    for the first chunk, 2 after), bidirectional rCM at 1/2/4, the causal teacher."""
    ref, floor, _ = evaluator.teacher_sets()
    s, samples, costs = cfg.sampler, {}, {}
    for steps in s.step_counts:
        g = torch.Generator(device=device).manual_seed(bank.seed + 1000 * steps)
        bi = lambda z, c, n=steps, g=g: consistency_sample(bidir, z, c, steps=n, sigma_max=s.sigma_max,  # noqa: E731
                                                           mid_t=s.mid_t, generator=g)
        ca = stream_fn(causal, steps, causal_cfg, bank.seed + 1000 * steps)
        for name, fn in ((f"causal/nfe_{steps}", ca), (f"rCM/nfe_{steps}", bi)):
            samples[name] = sample_in_chunks(fn, bank.noise, bank.labels, device)
            costs[name] = {"nfe": float(steps), "sec_per_sample": fr.seconds_per_sample(fn, bank, device)}
    # the official inference schedule: more steps where there is no context yet (the first chunk), 2 after it
    first = stream_fn(causal, FIRST_CHUNK_STEPS, causal_cfg, bank.seed + 999, later_steps=2)
    name = f"causal/{FIRST_CHUNK_STEPS}+2"
    samples[name] = sample_in_chunks(first, bank.noise, bank.labels, device)
    n_chunks = len(causal.net.chunks.chunk_spans(bank.noise.shape[2]))
    costs[name] = {"nfe": (FIRST_CHUNK_STEPS + 2 * (n_chunks - 1)) / n_chunks,
                   "sec_per_sample": fr.seconds_per_sample(first, bank, device)}
    ct = lambda z, c: stream_teacher_sample(causal_teacher, z, c, steps=s.teacher_steps,  # noqa: E731
                                            guidance=cfg.teacher.guidance, shift=s.teacher_shift)
    samples["causal_teacher"] = sample_in_chunks(ct, bank.noise, bank.labels, device)
    nfe = teacher_nfe(s.teacher_steps, "euler", cfg.teacher.guidance)
    costs["causal_teacher"] = {"nfe": float(nfe), "sec_per_sample": fr.seconds_per_sample(ct, bank, device, reps=3)}
    t_name = f"teacher_nfe_{teacher_nfe(s.teacher_steps, s.teacher_solver, cfg.teacher.guidance)}"
    costs[t_name] = {"nfe": float(t_name.split("_")[-1]), "sec_per_sample": fr.teacher_seconds_per_sample(
        cfg, evaluator.teacher, bank, device)}
    dev = lambda x: x.to(device)  # noqa: E731
    report = evaluate_step_counts({k: dev(v) for k, v in samples.items()}, dev(ref), reference_2=dev(floor),
                                  labels=dev(bank.labels), extractors=evaluator.extractors,
                                  classifier=evaluator.classifier, costs=costs, floor_name=t_name,
                                  cfg=EvalConfig(num_resamples=cfg.eval.bootstrap))
    fr.add_speedup(report)
    return report, samples


def latency_table(cfg, causal_cfg, bidir, causal, bank, device, batch: int) -> str:
    """Table 3: time to the first chunk and per chunk (causal) beside the time to the whole video (bidirectional)."""
    z, c = bank.noise[:batch].to(device), bank.labels[:batch].to(device)
    lines = ["steps  bidirectional: video ms  causal: first chunk ms  per chunk ms (mean)  whole video ms  chunks"]
    for steps in cfg.sampler.step_counts:
        bi = lambda n=steps: consistency_sample(bidir, z, c, steps=n, sigma_max=cfg.sampler.sigma_max,  # noqa: E731
                                                mid_t=cfg.sampler.mid_t)
        bi()
        fr._sync(device)
        t = time.perf_counter()
        bi()
        fr._sync(device)
        t_bi = time.perf_counter() - t
        marks = []
        for rep in range(2):                                  # the first pass warms the kernels up
            marks = []
            fr._sync(device)
            t = time.perf_counter()
            for _ in stream_chunks(causal, z, c, steps_per_chunk=[steps], mid_t_per_chunk=[causal_cfg.sampler.mid_t],
                                   sigma_max=causal_cfg.sampler.sigma_max):
                fr._sync(device)
                marks.append(time.perf_counter() - t)
        per = [b - a for a, b in zip([0.0, *marks], marks)]
        lines.append(f"{steps:5d}  {t_bi * 1e3:24.2f}  {marks[0] * 1e3:22.2f}  {sum(per) / len(per) * 1e3:19.2f}  "
                     f"{marks[-1] * 1e3:14.2f}  {len(marks):6d}")
    return "\n".join(lines)


def extrapolation_table(cfg, causal_cfg, bidir, causal, net, bank, device, steps: int = 2) -> str:
    """Table 4: 2× the trained latent frames, sampled by both students (the causal one: twice the chunks)."""
    n = min(bank.noise.shape[0], 512)
    shape = list(bank.noise.shape[1:])
    shape[1] *= 2
    z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(bank.seed + 7)).to(device)
    c = bank.labels[:n].to(device)
    T = shape[1] // 2
    rows = [("student             class_acc first T  class_acc extra T  label_agree  frame_cos  motion 2nd/1st  "
             "rms 2nd/1st")]
    for name, fn in (("causal", stream_fn(causal, steps, causal_cfg, 11)),
                     ("rCM bidirectional", lambda zz, cc: consistency_sample(
                         bidir, zz, cc, steps=steps, sigma_max=cfg.sampler.sigma_max, mid_t=cfg.sampler.mid_t))):
        x = sample_in_chunks(fn, z, c, device).float()
        logits = net.extract(x.to(next(net.parameters()).device)).frame_logits.cpu()
        right = (logits.argmax(-1) == bank.labels[:n, None]).double()
        tc = temporal_consistency(x, net)
        motion = frame_difference_energy(x[:, :, T:]).mean() / frame_difference_energy(x[:, :, :T]).mean()
        rms = x[:, :, T:].square().mean().sqrt() / x[:, :, :T].square().mean().sqrt()
        rows.append(f"{name:18s}  {right[:, :T].mean():17.3f}  {right[:, T:].mean():17.3f}  {tc.label_agreement:11.3f}"
                    f"  {tc.frame_cosine:9.3f}  {motion:14.3f}  {rms:11.3f}")
    head = f"{steps} steps (per chunk for the causal student), {2 * T} latent frames (trained on {T}), {n} videos"
    return head + "\n" + "\n".join(rows)


def run(cfg: ExperimentCfg, args) -> str:
    from rcm_core.run.teacher import load_teacher, save_teacher, train_teacher

    device, out = torch.device(args.device), Path(args.out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    clock = fr.Clock(device)
    cfg.train.device = str(device)
    data = args.data or str(out / "data")
    with clock.phase("data"):
        if not (Path(data) / MANIFEST).is_file():
            fr.prepare_data(cfg, data)
        ds = LatentDataset(data)
        m = ds.manifest
        fr.check_data_matches(m, cfg, data)
        batches = fr.DeviceBatches(ds, device)
    with clock.phase("feature classifier"):
        lat, lab = torch.from_numpy(ds.arrays["latent"]), torch.from_numpy(ds.arrays["label"])
        n_hold = max(len(ds) // 10, 1)
        net = feature_classifier(args, out, lat[n_hold:], lab[n_hold:], device)
        held = float((net.extract(lat[:n_hold]).video_logits.argmax(-1).cpu() == lab[:n_hold]).double().mean())
    with clock.phase("teacher"):
        path = Path(args.teacher or out / "teacher.pt")
        if path.is_file() and (args.teacher or args.resume):
            teacher = load_teacher(path, cfg, device)
        else:
            if args.teacher_seconds > 0:
                sec = fr.teacher_step_time(cfg, batches, device, args.probe_iters)
                cfg.teacher.train_steps = fr.round_steps(args.teacher_seconds / sec, 50)
            teacher = train_teacher(cfg, batches.stream(cfg.teacher.train_batch_size, cfg.train.seed + 1)(0),
                                    device=device)
            save_teacher(teacher, cfg, path)
    bank = EvalBank.make(m.latent_shape, torch.arange(cfg.eval.num_samples) % max(m.num_classes or 1, 1),
                         cfg.eval.seed)
    extractors = [net, RandomProjection(math.prod(m.latent_shape), 64, seed=0)]
    evaluator = StepCountEvaluator(cfg=cfg, teacher=teacher, bank=bank, device=device, classifier=net,
                                   extractors=extractors)
    with clock.phase("teacher samples"):
        evaluator.teacher_sets()
    n_curve = min(cfg.eval.num_samples, args.curve_samples)
    curve_cfg = load_config(None, ["sampler.step_counts=[2]", f"sampler.mid_t={DEFAULT_MID_T}"],
                            base=fr._as_dict(cfg))
    curve_eval = StepCountEvaluator(cfg=curve_cfg, teacher=teacher, bank=EvalBank.make(
        m.latent_shape, torch.arange(n_curve) % max(m.num_classes or 1, 1), cfg.eval.seed + 1), device=device,
        classifier=net, extractors=extractors)
    kw = {"batches": batches, "device": device, "out": out, "seconds": args.stage_seconds,
          "probe_iters": args.probe_iters, "resume": args.resume}
    nets, iters, curves = {}, {}, {}
    for name in ("rCM", "tf", "tf_dcm", "tf_scm", "sf_dmd"):
        scfg = stage_cfg(cfg, name, out)
        stage_teacher, init, ev = teacher, None, None
        if name in ("tf_dcm", "tf_scm"):
            stage_teacher, ev = nets["tf"], curve_eval
        if name == "sf_dmd":
            scfg.distill.student_checkpoint = str(out / "runs" / args.sf_init / "ema.pt")
            init = scfg.distill.student_checkpoint
        if args.tiny:
            scfg.train.steps = TINY_STAGE_STEPS
        with clock.phase(f"stage {name}"):
            nets[name], iters[name] = train_stage(name, scfg, stage_teacher, **kw, student_init=init, evaluator=ev,
                                                  curve=args.curve_points)
        if ev is not None:
            curves[name] = json.loads((out / "runs" / name / "curve.json").read_text())
    causal_cfg = stage_cfg(cfg, "sf_dmd", out)
    with clock.phase("tables"):
        report, samples = causal_table(cfg, causal_cfg, nets["rCM"], nets["sf_dmd"], nets["tf"], evaluator, bank,
                                       device)
        ref = evaluator.teacher_sets()[0]
        tables = {"causal": format_table(report, columns=fr.COLUMNS),
                  "per_frame": per_frame_table(samples, ref, bank.labels, net),
                  "convergence": curve_table(curves),
                  "latency": latency_table(cfg, causal_cfg, nets["rCM"], nets["sf_dmd"], bank, device,
                                           args.latency_batch),
                  "extrapolation": extrapolation_table(cfg, causal_cfg, nets["rCM"], nets["sf_dmd"], net, bank,
                                                       device)}
        for k, v in tables.items():
            (out / "tables" / f"{k}.txt").write_text(v + "\n")
        fr.pictures_of({k.replace("/", "_"): v[:64] for k, v in samples.items()}, m, out / "samples",
                       labels=bank.labels[:64])
    save_resolved(cfg, out)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    head = (f"Card: {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Data: {m.num_rows} videos, latent "
            f"{m.latent_shape}; classifier held-out accuracy {held:.3f}"
            + (f" (loaded from {args.classifier})" if args.classifier else "") + ". Iterations (training s): "
            + ", ".join(f"{k} {v['iterations']} ({v['seconds']:.0f} s)" for k, v in iters.items())
            + f"; sf_dmd from {args.sf_init}. Chunks [1 | 1 | …], "
            f"mid times RF 15/16, 5/6, 5/8. Phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.phases.items()))
    md = head + "\n" + "\n".join(f"\n### {k}\n```\n{v}\n```" for k, v in tables.items()) + "\n"
    (out / "tables" / "causal.md").write_text(md)
    if args.archive:
        write_archive(out, Path(args.archive))
    return md


def write_archive(out: Path, archive: Path) -> None:
    import tarfile
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for sub in ("tables", "samples", "config"):
            if (out / sub).exists():
                tar.add(out / sub, arcname=f"causal_results/{sub}")
        for curve in (out / "runs").glob("*/curve.json"):
            tar.add(curve, arcname=f"causal_results/curves/{curve.parent.name}.json")


def feature_classifier(args, out: Path, latents: torch.Tensor, labels: torch.Tensor, device):
    """The feature net every table is scored with, saved as <out>/feature_net.pt: --classifier's (section 2's
    feature space, so FD_feat compares with fashion_results' tables), else with --resume the one saved there (the
    curve points recorded before a cut were scored with it; retrained, the same seed is not bit-equal on a GPU),
    else trained on (latents, labels)."""
    saved = out / "feature_net.pt"
    if args.classifier:
        net = load_feature_net(args.classifier, device=device)
    elif args.resume and saved.is_file():
        net = load_feature_net(saved, device=device)
    else:
        net = train_feature_classifier(latents, labels, steps=args.classifier_steps, seed=0, device=device,
                                       batch_size=256)
    save_feature_net(net, saved)
    return net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(fr.DEFAULT_CONFIG))
    ap.add_argument("--data", default="")
    ap.add_argument("--out", default="runs/causal_results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", default="", help="a bidirectional teacher .pt (e.g. fashion_results.py's)")
    ap.add_argument("--teacher-seconds", type=float, default=90.0)
    ap.add_argument("--stage-seconds", type=float, default=45.0, help="per stage; 0 = train.steps as configured")
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--classifier", default="", help="a feature_net.pt from an earlier run (fashion_results.py's), "
                    "so FD_feat compares across the tables; default: train one here")
    ap.add_argument("--probe-iters", type=int, default=10)
    ap.add_argument("--curve-points", type=int, default=6, help="evaluations along tf_dcm and tf_scm")
    ap.add_argument("--curve-samples", type=int, default=500)
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--sf-init", choices=["tf_dcm", "tf_scm"], default="tf_dcm",
                    help="the student sf_dmd starts from (official recommendation: tf_dcm)")
    ap.add_argument("--resume", action="store_true", help="load stages already saved under --out")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and counts: the whole pipeline on a CPU")
    ap.add_argument("--archive", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [*(fr.TINY_OVERRIDES if args.tiny else []), *args.overrides])
    if args.tiny:
        args.stage_seconds, args.teacher_seconds = 0.0, 0.0
        args.classifier_steps, args.probe_iters, args.curve_samples = 30, 3, 64
        cfg.eval.num_samples, cfg.sampler.teacher_steps = 64, 4
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    t = time.perf_counter()
    print("\n" + run(cfg, args), flush=True)
    print(f"wall time {time.perf_counter() - t:.1f} s; tables in {Path(args.out) / 'tables'}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
