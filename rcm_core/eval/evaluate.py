"""Step-count evaluation of a distillation run: student at 1/2/4 steps against the teacher at N steps.

A fixed evaluation bank (noises, per-step noises, labels, all from `eval.seed`) is shared by every sampler, so
paired MSE is defined; the teacher is sampled twice, from the bank's noise (the reference) and from a disjoint
seed set (the teacher-vs-teacher noise floor). Metrics come from `rcm_core.eval` and are keyed
`eval/nfe_<N>/<metric>` and `eval/teacher_nfe_<N>/<metric>`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from rcm_core.config import ExperimentCfg
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.eval.features import FeatureExtractor, FeatureNet
from rcm_core.eval.report import EvalConfig, StepCountReport, evaluate_step_counts, format_table, mlflow_metrics
from rcm_core.method.samplers import consistency_sample, teacher_nfe, teacher_sample
from rcm_core.method.streaming import stream_sample, stream_teacher_sample


@dataclass
class EvalBank:
    noise: torch.Tensor          # [N, C, T, H, W]
    labels: torch.Tensor         # [N] conditions (int labels) or [N, L, D] context
    noise_floor: torch.Tensor    # disjoint seeds for the teacher-vs-teacher floor
    seed: int

    @classmethod
    def make(cls, shape: Sequence[int], conds: torch.Tensor, seed: int) -> "EvalBank":
        g = torch.Generator().manual_seed(seed)
        n = conds.shape[0]
        noise = torch.randn(n, *shape, generator=g)
        return cls(noise=noise, labels=conds, noise_floor=torch.randn(n, *shape, generator=g), seed=seed)


def _timed(fn) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sample_in_chunks(fn, noise: torch.Tensor, conds: torch.Tensor, device: torch.device,
                     chunk: int = 512) -> torch.Tensor:
    outs = []
    for i in range(0, noise.shape[0], chunk):
        outs.append(fn(noise[i:i + chunk].to(device), conds[i:i + chunk].to(device)).float().cpu())
    return torch.cat(outs)


def teacher_samples(teacher: TrigFlowDenoiser, bank: EvalBank, cfg: ExperimentCfg,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    s = cfg.sampler
    run = lambda z, c: teacher_sample(teacher, z, c, steps=s.teacher_steps, guidance=cfg.teacher.guidance,  # noqa
                                      shift=s.teacher_shift, solver=s.teacher_solver)
    if is_causal(teacher):      # a causal teacher (tf_scm / tf_dcm) is solved chunk by chunk, Euler
        run = lambda z, c: stream_teacher_sample(teacher, z, c, steps=s.teacher_steps,  # noqa
                                                 guidance=cfg.teacher.guidance, shift=s.teacher_shift)
    ref, sec = _timed(lambda: sample_in_chunks(run, bank.noise, bank.labels, device))
    floor = sample_in_chunks(run, bank.noise_floor, bank.labels, device)
    return ref, floor, sec / bank.noise.shape[0]


def student_samples(student: TrigFlowDenoiser, bank: EvalBank, cfg: ExperimentCfg,
                    device: torch.device) -> dict[str, tuple[torch.Tensor, float]]:
    out = {}
    for steps in cfg.sampler.step_counts:
        g = torch.Generator(device=device).manual_seed(bank.seed + 1000 * steps)   # fixed per-step noises
        run = lambda z, c: consistency_sample(student, z, c, steps=steps, sigma_max=cfg.sampler.sigma_max,  # noqa
                                              mid_t=cfg.sampler.mid_t, generator=g)
        if is_causal(student):  # streamed chunk by chunk, `steps` per chunk, the context it was trained for
            run = lambda z, c: stream_sample(student, z, c, steps_per_chunk=[steps], generator=g,  # noqa
                                             mid_t_per_chunk=[cfg.sampler.mid_t], sigma_max=cfg.sampler.sigma_max,
                                             context=cfg.distill.chunk_context,
                                             last_step_from=cfg.distill.last_step_from_chunk)
        x, sec = _timed(lambda: sample_in_chunks(run, bank.noise, bank.labels, device))
        out[f"nfe_{steps}"] = (x, sec / bank.noise.shape[0])
    return out


def is_causal(model: TrigFlowDenoiser) -> bool:
    """A block-causal network (Causal rCM) samples chunk by chunk with its KV cache."""
    return bool(getattr(model.net, "causal", False))


@dataclass
class StepCountEvaluator:
    """`evaluator(state, step) -> metrics` for `run_training`; keeps the last report and samples for pictures."""
    cfg: ExperimentCfg
    teacher: TrigFlowDenoiser
    bank: EvalBank
    device: torch.device
    extractors: Sequence[FeatureExtractor] = ()
    classifier: FeatureNet | None = None
    gmm: object | None = None
    last_report: StepCountReport | None = None
    last_samples: dict[str, torch.Tensor] = field(default_factory=dict)
    _teacher_cache: tuple | None = None

    def teacher_sets(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self._teacher_cache is None:          # the teacher is frozen: sample it once per run
            self._teacher_cache = teacher_samples(self.teacher, self.bank, self.cfg, self.device)
        return self._teacher_cache

    def evaluate(self, student: TrigFlowDenoiser) -> StepCountReport:
        ref, floor, t_sec = self.teacher_sets()
        s = self.cfg.sampler
        t_name = f"teacher_nfe_{teacher_nfe(s.teacher_steps, s.teacher_solver, self.cfg.teacher.guidance)}"
        students = student_samples(student, self.bank, self.cfg, self.device)
        samples = {name: x for name, (x, _) in students.items()}
        costs = {name: {"nfe": float(name.split("_")[1]), "sec_per_sample": sec} for name, (_, sec) in students.items()}
        costs[t_name] = {"nfe": float(t_name.split("_")[-1]), "sec_per_sample": t_sec}   # fills the floor row
        labels = self.bank.labels if self.bank.labels.dim() == 1 else None
        # Metrics and their bootstrap run where the samples are (report.py): on the run's device, not the CPU.
        dev = lambda x: None if x is None else x.to(self.device)
        report = evaluate_step_counts({k: dev(v) for k, v in samples.items()}, dev(ref), reference_2=dev(floor),
                                      labels=dev(labels), extractors=self.extractors, classifier=self.classifier,
                                      gmm=self.gmm, costs=costs, floor_name=t_name,
                                      cfg=EvalConfig(num_resamples=self.cfg.eval.bootstrap))
        self.last_report, self.last_samples = report, {**samples, "teacher_reference": ref}
        return report

    def subset(self, n: int, cfg: ExperimentCfg | None = None) -> StepCountEvaluator:
        """An evaluator on the first `n` rows of this bank (its classes cycle, so the first n stay balanced) that
        reuses this one's teacher samples of those rows instead of sampling the teacher again; `cfg` may change
        what only evaluation reads (e.g. eval.bootstrap) — its teacher and sampler.teacher_* must match."""
        total = self.bank.noise.shape[0]
        if not 0 < n <= total:
            raise ValueError(f"subset of {n} rows: the evaluation bank has {total} (eval.num_samples); "
                             f"choose 1..{total}")
        if cfg is not None:
            def key(c: ExperimentCfg) -> tuple:
                return c.sampler.teacher_steps, c.sampler.teacher_solver, c.sampler.teacher_shift, c.teacher.guidance
            if key(cfg) != key(self.cfg):
                raise ValueError(f"subset: the teacher samples were made with (teacher_steps, teacher_solver, "
                                 f"teacher_shift, guidance) = {key(self.cfg)}, the new config asks for {key(cfg)}")
        ref, floor, t_sec = self.teacher_sets()
        bank = EvalBank(noise=self.bank.noise[:n], labels=self.bank.labels[:n], noise_floor=self.bank.noise_floor[:n],
                        seed=self.bank.seed)
        return StepCountEvaluator(cfg=cfg or self.cfg, teacher=self.teacher, bank=bank, device=self.device,
                                  extractors=self.extractors, classifier=self.classifier, gmm=self.gmm,
                                  _teacher_cache=(ref[:n], floor[:n], t_sec))

    def forwards_per_evaluation(self) -> tuple[int, int]:
        """(network forwards of the teacher's two sample sets, made once per run; of the students, every time)."""
        s, n = self.cfg.sampler, self.bank.noise.shape[0]
        nfe = teacher_nfe(s.teacher_steps, s.teacher_solver, self.cfg.teacher.guidance)
        return 2 * n * nfe, n * sum(s.step_counts)

    def __call__(self, state, step: int) -> dict[str, float]:
        if self._teacher_cache is None:
            teacher, students = self.forwards_per_evaluation()
            tqdm.write(f"evaluation: {self.bank.noise.shape[0]} samples; {teacher} teacher forwards once per run, "
                       f"{students} student forwards per evaluation (sampler.*, eval.num_samples)")
        t0 = time.perf_counter()
        metrics = mlflow_metrics(self.evaluate(state.ema.compute_copy(state.student)))
        metrics["timing/eval_seconds"] = time.perf_counter() - t0   # not eval/…: that namespace is per step count
        return metrics


__all__ = ["EvalBank", "StepCountEvaluator", "format_table"]
