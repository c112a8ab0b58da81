"""One rCM iteration: `distill_step(state, batch, cfg, generator) -> metrics` (rcm_method.md §3.5–3.6).

Iteration i is a student step if i < H (pure-consistency warm-up) or (i − H) mod F == 0, otherwise a
critic (fake-score) step. A student step adds the consistency loss (sCM, or dCM for the dcm modes) and,
after warm-up, λ times the DMD loss, then takes one optimiser step and updates the power-EMA. The five modes
(rcm, scm, dmd, dcm, dcm_dmd) are the same code with one term swapped or off (`consistency_term`, `uses_dmd`).

Causal rCM's five (rcm_core.method.causal) run through the same step: `tf` / `df` swap the consistency term for
a causal diffusion loss, `tf_scm` / `tf_dcm` are sCM / dCM with the clean video as teacher-forcing context for
teacher and student, and `sf_dmd` is DMD on a chunk-by-chunk student rollout. `build_state` sets each network's
attention pattern: the student is block-causal, the teacher too for the teacher-forcing consistency modes (a
`tf`/`df` run's student), the fake score and the `sf_dmd` teacher bidirectional.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from rcm_core.config import CAUSAL_MODES, DistillCfg, ExperimentCfg, OptimCfg
from rcm_core.data.latents import LatentBatch
from rcm_core.method.causal import (
    context_times,
    diffusion_forcing_loss,
    noisy_context,
    self_forcing_rollout,
    self_forcing_steps,
    teacher_forcing_loss,
)
from rcm_core.method.denoiser import TrigFlowDenoiser, check_latents
from rcm_core.method.ema import PowerEMA
from rcm_core.method.losses import (
    dcm_loss,
    dmd_loss,
    fake_score_loss,
    scm_loss,
    student_rollout,
)
from rcm_core.method.timesteps import sample_dcm_times, sample_p_D, sample_p_G
from rcm_core.parallel.precision import master_parameters, with_master_weights
from rcm_core.parallel.sharding import sync_gradients


@dataclass
class DistillState:
    teacher: TrigFlowDenoiser
    student: TrigFlowDenoiser
    fake: TrigFlowDenoiser | None
    ema: PowerEMA
    opt_student: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer | None
    iteration: int = 0          # all iterations
    student_iter: int = 0       # student-phase iterations (LR schedule, EMA, rollout cycle advance on these)
    critic_iter: int = 0
    counters: dict[str, float] = field(default_factory=lambda: {"nan_samples": 0.0, "nonfinite_grads": 0.0})
    stopped: str | None = None  # why the run ended before cfg.train.steps (a reporter asked), else None


def make_optimizer(params, lr: float, cfg: OptimCfg):
    """AdamW with β₁ = 0 as in rCM (Table 4); no gradient clipping (paper: "crucial for stability").
    bf16 parameters get fp32 masters (rcm_core.parallel.precision); under FSDP2 the parameters themselves are fp32
    (rcm_core.parallel.sharding rebuilds the optimiser on them)."""
    return with_master_weights(params, lambda ps: torch.optim.AdamW(
        ps, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps))


def consistency_term(cfg: DistillCfg) -> str | None:
    """"scm", "dcm" or None: the consistency objective `distill.mode` asks for."""
    return {"rcm": "scm", "scm": "scm", "dcm": "dcm", "dcm_dmd": "dcm", "tf_scm": "scm", "tf_dcm": "dcm"}.get(cfg.mode)


def uses_dmd(cfg: DistillCfg) -> bool:
    """True when the mode adds the DMD term, so a fake score (critic) is trained beside the student."""
    return cfg.mode in ("rcm", "dmd", "dcm_dmd", "sf_dmd")


def causal_roles(mode: str) -> dict[str, bool]:
    """Which networks attend block-causally: the student of every causal mode, the teacher in the teacher-forcing
    consistency modes (it is a `tf`/`df` run's causal student); the fake score and sf_dmd's teacher never."""
    causal = mode in CAUSAL_MODES
    return {"student": causal, "teacher": mode in ("tf_scm", "tf_dcm"), "fake": False}


def build_state(cfg: ExperimentCfg, teacher: TrigFlowDenoiser,
                student_init: TrigFlowDenoiser | None = None) -> DistillState:
    """Student and fake score start as copies of the teacher (rCM: full-parameter training from the teacher);
    `student_init` (distill.student_checkpoint) replaces the teacher as the student's start (Causal rCM's sf_dmd
    starts from the teacher-forcing CM student, its teacher and fake score from the bidirectional teacher)."""
    if cfg.model.causal and cfg.distill.mode not in CAUSAL_MODES:
        raise ValueError(f"model.causal=true but distill.mode={cfg.distill.mode} trains a bidirectional student; "
                         f"use a causal mode ({', '.join(CAUSAL_MODES)}) or model.causal=false")
    teacher.requires_grad_(False).eval()
    roles = causal_roles(cfg.distill.mode)
    student = copy.deepcopy(student_init or teacher).requires_grad_(True).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train() if uses_dmd(cfg.distill) else None
    for role, model in (("teacher", teacher), ("student", student), ("fake", fake)):
        if model is not None and hasattr(model.net, "causal"):
            model.net.causal = roles[role]
    return DistillState(
        teacher=teacher, student=student, fake=fake, ema=PowerEMA(student, cfg.ema.sigma_rel),
        opt_student=make_optimizer(student.parameters(), cfg.optim.lr, cfg.optim),
        opt_fake=make_optimizer(fake.parameters(), cfg.optim.fake_lr, cfg.optim) if fake else None)


def is_student_phase(i: int, cfg: DistillCfg) -> bool:
    if not uses_dmd(cfg):
        return True
    warmup = cfg.tangent_warmup if consistency_term(cfg) else 0
    return i < warmup or (i - warmup) % cfg.student_update_freq == 0


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up from 1e-6× to 1× over `warmup` steps, then constant (official LambdaLinearScheduler)."""
    if warmup <= 0 or step >= warmup:
        return 1.0
    return 1e-6 + (1.0 - 1e-6) * step / warmup


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def zero_nonfinite_grads(module: nn.Module) -> int:
    """Replace NaN/Inf gradient entries by 0 and return how many there were (official grad_clip callback)."""
    bad = 0
    for p in module.parameters():
        if p.grad is not None:
            mask = ~torch.isfinite(p.grad)
            n = int(mask.sum())
            if n:
                bad += n
                p.grad[mask] = 0
    return bad


def rollout_steps(state: DistillState, cfg: DistillCfg, generator: torch.Generator) -> int:
    """N ∈ 1..N_max: cycled by the student iteration (official code) or uniform (paper). N_max is the first chunk's
    maximum for sf_dmd (distill.sf_steps_per_chunk), distill.max_rollout_steps otherwise."""
    n_max = (cfg.sf_steps_per_chunk or [cfg.max_rollout_steps])[0] if cfg.mode == "sf_dmd" else cfg.max_rollout_steps
    if cfg.rollout_length == "cycle":
        return state.student_iter % n_max + 1
    return int(torch.randint(1, n_max + 1, (1,), generator=generator))


def _rollout(state: DistillState, x0: torch.Tensor, cond: torch.Tensor, cfg: ExperimentCfg, g: torch.Generator,
             steps: int, grad_module: TrigFlowDenoiser | None) -> torch.Tensor:
    """The student's x̂0 for DMD and the critic: an N-step rollout with decreasing random times (rCM), or for
    sf_dmd a chunk-by-chunk rollout with the KV cache on the per-chunk schedule (self forcing)."""
    d = cfg.distill
    if d.mode != "sf_dmd":
        return student_rollout(state.student, _noise_like(x0, g), cond, steps=steps, generator=g,
                               times_fn=lambda n: sample_p_D(n, shift=d.p_D_shift, generator=g, device=x0.device),
                               grad_module=grad_module)
    n_chunks = len(state.student.net.chunks.chunk_frames(x0.shape[2]))
    per_chunk = self_forcing_steps(steps, d.sf_steps_per_chunk or [d.max_rollout_steps], n_chunks)
    return self_forcing_rollout(state.student, _noise_like(x0, g), cond, steps=per_chunk,
                                mid_t=d.sf_mid_t or [cfg.sampler.mid_t], generator=g, grad_module=grad_module,
                                context_t=chunk_context_times(cfg, n_chunks))


def chunk_context_times(cfg: ExperimentCfg, n_chunks: int) -> list[float]:
    """The context time each chunk leaves (0 = clean), from distill.chunk_context and the rollout schedule."""
    d = cfg.distill
    return context_times(n_chunks, context=d.chunk_context, last_step_from=d.last_step_from_chunk,
                         max_steps=d.sf_steps_per_chunk or [d.max_rollout_steps],
                         mid_t=d.sf_mid_t or [cfg.sampler.mid_t])


def teacher_forcing_contexts(state: DistillState, x0: torch.Tensor, cfg: ExperimentCfg, g: torch.Generator):
    """(the student's context, the teacher's): both the clean video at t = 0, or with distill.chunk_context=
    last_step the student's noised to the time the sampler will cache (official `_noisy_ctx`; the causal teacher
    keeps the clean context it was trained with)."""
    clean = (x0, torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device))
    spans = state.student.net.chunks.chunk_spans(x0.shape[2])
    t_chunks = chunk_context_times(cfg, len(spans))
    return (noisy_context(x0, t_chunks, spans, g) if any(t_chunks) else clean), clean


def _causal_diffusion_loss(state: DistillState, x0: torch.Tensor, cond: torch.Tensor, cfg: ExperimentCfg,
                           g: torch.Generator, grad_student: TrigFlowDenoiser):
    """tf: one time for the noisy video, the video as context; df: one time per chunk, no context. Times from the
    shift-s RF schedule p_D (the official tf/df configs draw UniformShift(5), i.e. p_D at distill.p_D_shift = 5)."""
    d, B = cfg.distill, x0.shape[0]
    draw = lambda n: sample_p_D(n, shift=d.p_D_shift, generator=g, device=x0.device)
    if d.mode == "tf":
        context, _ = teacher_forcing_contexts(state, x0, cfg, g)
        return teacher_forcing_loss(grad_student, x0, cond, t=draw(B), eps=_noise_like(x0, g), context=context)
    spans = state.student.net.chunks.chunk_spans(x0.shape[2])
    return diffusion_forcing_loss(grad_student, x0, cond, t_chunks=draw(B * len(spans)).reshape(B, len(spans)),
                                  spans=spans, eps=_noise_like(x0, g))


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _student_step(state: DistillState, batch: LatentBatch, cfg: ExperimentCfg, g: torch.Generator,
                  grad_student: TrigFlowDenoiser) -> dict[str, float]:
    d, x0, cond = cfg.distill, batch.latent, batch_condition(batch)
    B, frames = x0.shape[0], x0.shape[2]
    consistency = consistency_term(d)
    in_warmup = uses_dmd(d) and consistency is not None and state.iteration < d.tangent_warmup
    r = min(1.0, state.iteration / d.tangent_warmup) if d.tangent_warmup > 0 else 1.0
    metrics: dict[str, float] = {"tangent_warmup_r": r}
    state.opt_student.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64, device=x0.device)
    # Teacher-forcing consistency (tf_scm, tf_dcm): the video is the context (clean for the teacher).
    ctx, teacher_ctx = teacher_forcing_contexts(state, x0, cfg, g) if d.mode in ("tf_scm", "tf_dcm") else (None, None)
    if d.mode in ("tf", "df"):
        out = _causal_diffusion_loss(state, x0, cond, cfg, g, grad_student)
        total = total + out.loss
        metrics.update(out.metrics)
    if consistency == "dcm":
        times = sample_dcm_times(B, total_steps=d.dcm_total_steps, skip=d.dcm_skip, shift=d.dcm_shift,
                                 generator=g, device=x0.device)
        out = dcm_loss(state.student, state.teacher, x0, cond, times=times, eps=_noise_like(x0, g),
                       guidance=cfg.teacher.guidance, scale=d.scm_loss_scale, student_grad=grad_student,
                       tf_context=ctx, teacher_context=teacher_ctx)
        total = total + out.loss
        metrics.update(out.metrics)
    if consistency == "scm":
        t = sample_p_G(B, mean=d.p_G_mean, std=d.p_G_std, frames=frames, frame_shift=d.p_G_frame_shift,
                       generator=g, device=x0.device)
        out = scm_loss(state.student, state.teacher, x0, cond, t=t, eps=_noise_like(x0, g),
                       guidance=cfg.teacher.guidance, r=r, scale=d.scm_loss_scale, tangent=d.tangent,
                       fd_step=d.fd_step, variant=d.warmup_variant, norm_c=d.tangent_norm_c,
                       student_grad=grad_student, tf_context=ctx, teacher_context=teacher_ctx)
        total = total + out.loss
        metrics.update(out.metrics)
    if uses_dmd(d) and not in_warmup:
        steps = rollout_steps(state, d, g)
        x0_hat = _rollout(state, x0, cond, cfg, g, steps, grad_student)
        t_D = sample_p_D(B, shift=d.p_D_shift, generator=g, device=x0.device)
        out = dmd_loss(x0_hat, state.fake, state.teacher, cond, t=t_D, eps=_noise_like(x0, g),
                       guidance=cfg.teacher.guidance, weight_min=d.dmd_weight_min,
                       scale=d.reg_weight * d.scm_loss_scale)
        total = total + out.loss
        metrics.update(out.metrics, rollout_steps=float(steps))
    total.backward()
    sync_gradients(state.student)
    bad = zero_nonfinite_grads(state.student)
    _set_lr(state.opt_student, cfg.optim.lr * lr_factor(state.student_iter, cfg.optim.lr_warmup))
    state.opt_student.step()
    state.ema.update(state.student, master_parameters(state.student, state.opt_student))
    state.student_iter += 1
    state.counters["nonfinite_grads"] += bad
    state.counters["nan_samples"] += sum(metrics.get(f"{k}_nan_samples", 0.0) for k in ("scm", "dcm", "dmd"))
    metrics.update(loss=total.item(), nonfinite_grads=float(bad), phase_student=1.0)
    return metrics


def _critic_step(state: DistillState, batch: LatentBatch, cfg: ExperimentCfg, g: torch.Generator,
                 grad_fake: TrigFlowDenoiser) -> dict[str, float]:
    d, x0, cond = cfg.distill, batch.latent, batch_condition(batch)
    steps = rollout_steps(state, d, g)
    with torch.no_grad():
        x0_hat = _rollout(state, x0, cond, cfg, g, steps, None)
    t_D = sample_p_D(x0.shape[0], shift=d.p_D_shift, generator=g, device=x0.device)
    state.opt_fake.zero_grad(set_to_none=True)
    out = fake_score_loss(grad_fake, x0_hat, cond, t=t_D, eps=_noise_like(x0, g))
    out.loss.backward()
    sync_gradients(state.fake)
    bad = zero_nonfinite_grads(state.fake)
    _set_lr(state.opt_fake, cfg.optim.fake_lr * lr_factor(state.critic_iter, cfg.optim.lr_warmup))
    state.opt_fake.step()
    state.critic_iter += 1
    state.counters["nonfinite_grads"] += bad
    state.counters["nan_samples"] += out.metrics["critic_nan_samples"]
    return {**out.metrics, "loss": out.loss.item(), "nonfinite_grads": float(bad), "phase_student": 0.0}


def distill_step(state: DistillState, batch: LatentBatch, cfg: ExperimentCfg, generator: torch.Generator,
                 *, grad_student: TrigFlowDenoiser | None = None,
                 grad_fake: TrigFlowDenoiser | None = None) -> dict[str, float]:
    """One iteration; `grad_*` are optional wrapped modules used for the with-grad forward passes."""
    check_latents(batch.latent, state.student)
    if is_student_phase(state.iteration, cfg.distill):
        metrics = _student_step(state, batch, cfg, generator, grad_student or state.student)
    else:
        metrics = _critic_step(state, batch, cfg, generator, grad_fake or state.fake)
    state.iteration += 1
    return metrics


def batch_condition(batch: LatentBatch) -> torch.Tensor:
    """The network's cond input: class labels [B] or a text-embedding sequence [B, L, D]."""
    if batch.label is not None:
        return batch.label
    if batch.cond is not None:
        return batch.cond
    raise ValueError("the batch has neither `label` nor `cond`; every latent row needs a condition")

