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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from rcm_core.config import CAUSAL_MODES, DistillCfg, ExperimentCfg, OptimCfg
from rcm_core.data.latents import LatentBatch
from rcm_core.method.adamw import AdamW
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
from rcm_core.method.losses import (LossOut, dcm_loss, dmd_loss, fake_score_loss, read_metrics, rollout_draws,
                                    scm_loss, student_rollout)
from rcm_core.method.timesteps import sample_dcm_times, sample_p_D, sample_p_G
from rcm_core.parallel.precision import MasterWeightOptimizer, master_parameters, with_master_weights
from rcm_core.parallel.sharding import grads_may_be_nonfinite, sync_gradients, zero_nonfinite_entries


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
    (rcm_core.parallel.sharding rebuilds the optimiser on them). Fused on GPUs (`adamw_kernel`). With β₁ = 0 it
    holds no first moment between steps (`rcm_core.method.adamw`: the same bits, 4 B per parameter less)."""
    return with_master_weights(params, lambda ps: AdamW(
        ps, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps, **adamw_kernel(ps)))


def adamw_kernel(params) -> dict:
    """AdamW's implementation flags for these parameters: fused where every one is on a GPU, PyTorch's default
    elsewhere (a per-tensor loop on the CPU, so CPU runs keep their numbers). Why (issue 28): PyTorch's default on
    a GPU (foreach) makes ~8 passes over parameters, gradients and moments per step (31 ms for the 1.3B student
    on an H200, 10 % of a flow-matching step at 8,190 tokens); the fused kernel reads and writes each once."""
    params = list(params)
    return {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}


def reapply_adamw_kernel(opt) -> None:
    """After `load_state_dict`, which takes the saved run's implementation flags (and placed AdamW's step counters
    for them): this run's choice again (`adamw_kernel`), the counters moved to where it keeps them (fused: fp32
    beside the parameter; otherwise on the CPU). A checkpoint written on a CPU, or before AdamW ran fused, then
    resumes fused on a GPU, and one written fused resumes on a CPU."""
    for group in opt.param_groups:
        fused = adamw_kernel(group["params"]).get("fused", False)
        group["fused"], group["foreach"] = (True if fused else None), None
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32) if fused else state["step"].cpu()


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
    """Replace NaN/Inf gradient entries by 0 and return how many there were (official grad_clip callback). The
    per-tensor count (`zero_nonfinite_entries`: a host sync each, an all-reduce each on FSDP2 shards) runs only
    when one multi-tensor check says some entry may be non-finite (`grads_may_be_nonfinite`), which in a healthy
    run is never."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or not grads_may_be_nonfinite(grads):
        return 0
    return zero_nonfinite_entries(grads)


def rollout_steps(state: DistillState, cfg: DistillCfg, generator: torch.Generator) -> int:
    """N ∈ 1..N_max: cycled by the student iteration (official code) or uniform (paper). N_max is the first chunk's
    maximum for sf_dmd (distill.sf_steps_per_chunk), distill.max_rollout_steps otherwise."""
    n_max = (cfg.sf_steps_per_chunk or [cfg.max_rollout_steps])[0] if cfg.mode == "sf_dmd" else cfg.max_rollout_steps
    if cfg.rollout_length == "cycle":
        return state.student_iter % n_max + 1
    return int(torch.randint(1, n_max + 1, (1,), generator=generator))


def _self_forcing_rollout(state: DistillState, noise: torch.Tensor, cond: torch.Tensor, cfg: ExperimentCfg,
                          g: torch.Generator, steps: int, grad_module: TrigFlowDenoiser | None) -> torch.Tensor:
    """sf_dmd's x̂0 for DMD and the critic: a chunk-by-chunk rollout with the KV cache on the per-chunk schedule
    (self forcing). Its re-noisings are drawn from `g` inside the rollout, between the chunks' forwards."""
    d = cfg.distill
    n_chunks = len(state.student.net.chunks.chunk_frames(noise.shape[2]))
    per_chunk = self_forcing_steps(steps, d.sf_steps_per_chunk or [d.max_rollout_steps], n_chunks)
    return self_forcing_rollout(state.student, noise, cond, steps=per_chunk,
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
    keeps the clean one it was trained with)."""
    clean = (x0, torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device))
    spans = state.student.net.chunks.chunk_spans(x0.shape[2])
    t_chunks = chunk_context_times(cfg, len(spans))
    return (noisy_context(x0, t_chunks, spans, g) if any(t_chunks) else clean), clean


def _causal_diffusion_draws(state: DistillState, x0: torch.Tensor, cfg: ExperimentCfg, g: torch.Generator) -> dict:
    """tf: one time per sample for the noisy video; df: one time per chunk ([B, chunks]); then the noise. Times
    from the shift-s RF schedule p_D (the official tf/df configs draw UniformShift(5), i.e. p_D at
    distill.p_D_shift = 5)."""
    d, B = cfg.distill, x0.shape[0]
    draw = lambda n: sample_p_D(n, shift=d.p_D_shift, generator=g, device=x0.device)
    if d.mode == "tf":
        t = draw(B)
    else:
        t = draw(B * len(state.student.net.chunks.chunk_spans(x0.shape[2]))).reshape(B, -1)
    return {"fm_t": t, "fm_eps": _noise_like(x0, g)}


def _causal_diffusion_loss(state: DistillState, x0: torch.Tensor, cond: torch.Tensor, cfg: ExperimentCfg,
                           draws: dict, grad_student: TrigFlowDenoiser):
    """tf: the video as teacher-forcing context (`tf_context`); df: each chunk at its own time, no context."""
    if cfg.distill.mode == "tf":
        return teacher_forcing_loss(grad_student, x0, cond, t=draws["fm_t"], eps=draws["fm_eps"],
                                    context=draws["tf_context"])
    spans = state.student.net.chunks.chunk_spans(x0.shape[2])
    return diffusion_forcing_loss(grad_student, x0, cond, t_chunks=draws["fm_t"], spans=spans, eps=draws["fm_eps"])


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Gradient accumulation: one update over micro-batches equals the update over the whole batch. Every random
# draw of an iteration is made first, for the whole batch and in one fixed order; each micro-batch then takes
# its rows of the batch and of the draws, and its loss is weighted by its share of the rows, so the summed
# gradient is the big batch's mean-loss gradient (tests/test_grad_accum.py checks it in float64).
# The causal modes tf, df, tf_scm and tf_dcm draw their contexts, times and noise the same way (row tensors).
# sf_dmd is the exception: its self-forcing rollout draws its re-noisings from the generator between the
# chunks' forwards (and t_D / ε_D after them), so its draws are not made up front; sf_dmd refuses
# data.micro_batch_size > 0 (rcm_core.config.validate) and runs the whole batch as one micro-batch.

def micro_batches(rows: int, micro_batch_size: int) -> list[slice]:
    """Row slices of one GPU's batch: `micro_batch_size` rows each (0 = all rows at once)."""
    if micro_batch_size <= 0 or micro_batch_size >= rows:
        return [slice(0, rows)]
    if rows % micro_batch_size:
        raise ValueError(f"data.micro_batch_size={micro_batch_size} does not divide this GPU's batch of {rows} "
                         f"rows (data.batch_size / data-parallel groups); choose a divisor of {rows}")
    return [slice(i, i + micro_batch_size) for i in range(0, rows, micro_batch_size)]


def batch_line(batch_size: int, groups: int, micro_batch_size: int) -> str:
    """How the global batch is made, for the run's log: groups × micro-batches × micro-batch size."""
    per_group = batch_size // groups
    micro = micro_batch_size if 0 < micro_batch_size < per_group else per_group
    return (f"batch: {batch_size} per update = {groups} data-parallel group(s) × {per_group // micro} micro-batch(es) "
            f"× {micro} sample(s) (data.batch_size={batch_size}, data.micro_batch_size={micro_batch_size})")


def _draw_rows(draws: dict, index: slice) -> dict:
    """Rows `index` of every draw: the batch is dim 0, except dCM's time grid [k+1, B], the rollout's list and
    the teacher-forcing contexts (x_ctx, t_ctx); the sf_dmd generator passes through (it never micro-batches)."""
    out = {}
    for key, value in draws.items():
        if key == "dcm_times":
            out[key] = value[:, index]
        elif key == "renoise":
            out[key] = [(t[index], eps[index]) for t, eps in value]
        elif key in ("tf_context", "teacher_context"):
            out[key] = tuple(v[index] for v in value)
        elif isinstance(value, torch.Tensor):
            out[key] = value[index]
        else:
            out[key] = value
    return out


def _accumulate(batch: LatentBatch, draws: dict, micro_batch_size: int, terms_of) -> dict[str, torch.Tensor | float]:
    """Backward of every loss term `terms_of(rows, their draws)` yields, on every micro-batch, each weighted by its
    micro-batch's share of the rows, so the gradients add up to the whole batch's; returns the whole batch's
    metrics and its loss ("loss"), still on the device: the step reads them once, after the non-finite check's
    host sync or at the iteration's end (`_check_and_step`).

    Each term is backed through as soon as it is made, which frees its graph before the next term's with-grad
    forward builds one: rCM's consistency forward and DMD's last rollout call never hold their activations at the
    same time (one graph's memory, not two; `rcm_core.run.plan` counts one). The gradient is the same sum."""
    parts, weights, total = [], [], None
    for index in micro_batches(len(batch), micro_batch_size):
        w = (index.stop - index.start) / len(batch)
        metrics: dict[str, torch.Tensor | float] = {}
        for term in terms_of(batch.rows(index), _draw_rows(draws, index)):
            (w * term.loss).backward()
            part = w * term.loss.detach().double()          # summed on the loss's device: no host read here
            total = part if total is None else total + part
            metrics.update(term.metrics)
        parts.append(metrics)
        weights.append(w)
    if total is None:
        raise ValueError("this iteration drew no loss term (distill.mode and its draws disagree)")
    return {**_combine(parts, weights), "loss": total}


def _check_and_step(net: nn.Module, opt, metrics: dict[str, torch.Tensor | float]) -> tuple[dict, int | torch.Tensor]:
    """Reduce the gradients over data-parallel ranks, zero their non-finite entries (counted), and step; returns
    the metrics and that count, read on the host where the path already waited, else still on the device for
    `_read_last` (one host read per iteration either way).

    Where the step reads every gradient in one pass anyway (one GPU, fp32 masters, β₁ = 0:
    `MasterWeightOptimizer.counts_nonfinite`), it zeroes and counts them itself, on the device, so nothing
    drains the GPU's queue between the backward and the step: its host work (~6 ms at Wan2.1-1.3B) is queued
    while the backward still runs. Elsewhere one multi-tensor check looks first (`zero_nonfinite_grads`), the
    step's one host sync; once it has waited for the backward, reading every metric in one transfer costs no
    further wait. (Reading each metric in its loss, as before, stalled the GPU after the consistency forward,
    after DMD's forward and after the backward: 8 host reads per student iteration, 4 per critic.)"""
    sync_gradients(net)
    if isinstance(opt, MasterWeightOptimizer) and opt.counts_nonfinite():
        counter = torch.zeros((), dtype=torch.int64, device=next(net.parameters()).device)
        opt.step(nonfinite=counter)
        return metrics, counter
    bad = zero_nonfinite_grads(net)
    read = read_metrics(metrics)
    opt.step()
    return read, bad


def _read_last(metrics: dict[str, torch.Tensor | float], bad: int | torch.Tensor) -> tuple[dict[str, float], int]:
    """The metrics and the non-finite count as numbers: one transfer for whatever is still on the device (after the
    step and the EMA are queued, so the queue drains once, at the iteration's end), none if nothing is."""
    read = read_metrics({**metrics, "nonfinite_grads": bad})
    return read, int(read.pop("nonfinite_grads"))


def _combine(parts: list[dict[str, torch.Tensor | float]], weights: list[float]) -> dict[str, torch.Tensor | float]:
    """Micro-batch metrics as the whole batch's: counts (`*_nan_samples`) add up, the rest are row-weighted means,
    summed on the device in float64 (a bf16 loss weighted in bf16 would round)."""
    keys = dict.fromkeys(k for m in parts for k in m)
    wide = [{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in m.items()} for m in parts]
    return {k: sum(m[k] for m in wide if k in m) if k.endswith("_nan_samples")
            else sum(w * m[k] for m, w in zip(wide, weights) if k in m) for k in keys}


def _rollout_draws(state: DistillState, x0: torch.Tensor, d: DistillCfg, g: torch.Generator) -> dict:
    """The DMD rollout's draws (N, its start noise and re-noisings), then the time and noise of the DMD / critic
    target, in the order the big-batch iteration always drew them. sf_dmd: N and the start noise only, plus the
    generator its rollout and then t_D / ε_D are drawn from (`_dmd_sample`)."""
    steps = rollout_steps(state, d, g)
    out = {"steps": steps, "noise": _noise_like(x0, g)}
    if d.mode == "sf_dmd":
        out["generator"] = g
        return out
    out["renoise"] = rollout_draws(x0.shape, steps, times_fn=lambda n: sample_p_D(n, shift=d.p_D_shift, generator=g,
                                                                                  device=x0.device),
                                   generator=g, device=x0.device, dtype=x0.dtype)
    out["t_D"] = sample_p_D(x0.shape[0], shift=d.p_D_shift, generator=g, device=x0.device)
    out["eps_D"] = _noise_like(x0, g)
    return out


def _dmd_sample(state: DistillState, cond: torch.Tensor, draws: dict, cfg: ExperimentCfg,
                grad_module: TrigFlowDenoiser | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̂0, t_D, ε_D) for the DMD and critic losses: the student's rollout from the draws (rCM), or sf_dmd's
    self-forcing rollout, whose re-noisings and then t_D, ε_D come from the generator now (whole batch only)."""
    if "generator" not in draws:
        x0_hat = student_rollout(state.student, draws["noise"], cond, renoise=draws["renoise"],
                                 grad_module=grad_module)
        return x0_hat, draws["t_D"], draws["eps_D"]
    g, noise = draws["generator"], draws["noise"]
    x0_hat = _self_forcing_rollout(state, noise, cond, cfg, g, draws["steps"], grad_module)
    t_D = sample_p_D(noise.shape[0], shift=cfg.distill.p_D_shift, generator=g, device=noise.device)
    return x0_hat, t_D, _noise_like(noise, g)


def _student_draws(state: DistillState, x0: torch.Tensor, cfg: ExperimentCfg, g: torch.Generator,
                   with_dmd: bool) -> dict:
    d, B, frames = cfg.distill, x0.shape[0], x0.shape[2]
    draws: dict = {}
    # Teacher forcing (tf, tf_scm, tf_dcm): the video is the context (clean for the teacher; the student's noised
    # to the cached time under distill.chunk_context=last_step). Drawn first, as the whole-batch step always did.
    if d.mode in ("tf", "tf_scm", "tf_dcm"):
        draws["tf_context"], draws["teacher_context"] = teacher_forcing_contexts(state, x0, cfg, g)
    if d.mode in ("tf", "df"):
        draws.update(_causal_diffusion_draws(state, x0, cfg, g))
    if consistency_term(d) == "dcm":
        draws["dcm_times"] = sample_dcm_times(B, total_steps=d.dcm_total_steps, skip=d.dcm_skip, shift=d.dcm_shift,
                                              generator=g, device=x0.device)
        draws["eps"] = _noise_like(x0, g)
    if consistency_term(d) == "scm":
        draws["t"] = sample_p_G(B, mean=d.p_G_mean, std=d.p_G_std, frames=frames, frame_shift=d.p_G_frame_shift,
                                generator=g, device=x0.device)
        draws["eps"] = _noise_like(x0, g)
    if with_dmd:
        draws.update(_rollout_draws(state, x0, d, g))
    return draws


def _student_terms(state: DistillState, batch: LatentBatch, draws: dict, cfg: ExperimentCfg, r: float,
                   grad_student: TrigFlowDenoiser) -> Iterator[LossOut]:
    """The student's loss terms on one (micro-)batch with its draws, one at a time: causal diffusion (tf/df) or
    the consistency term, then λ·DMD when drawn. A generator, so that `_accumulate` backs each term through
    before the next one's forward passes run."""
    d, x0, cond = cfg.distill, batch.latent, batch_condition(batch)
    ctx = {"tf_context": draws.get("tf_context"), "teacher_context": draws.get("teacher_context")}
    if "fm_t" in draws:
        yield _causal_diffusion_loss(state, x0, cond, cfg, draws, grad_student)
    if "dcm_times" in draws:
        yield dcm_loss(state.student, state.teacher, x0, cond, times=draws["dcm_times"], eps=draws["eps"],
                       guidance=cfg.teacher.guidance, scale=d.scm_loss_scale, student_grad=grad_student, **ctx)
    if "t" in draws:
        yield scm_loss(state.student, state.teacher, x0, cond, t=draws["t"], eps=draws["eps"],
                       guidance=cfg.teacher.guidance, r=r, scale=d.scm_loss_scale, tangent=d.tangent,
                       fd_step=d.fd_step, variant=d.warmup_variant, norm_c=d.tangent_norm_c,
                       student_grad=grad_student, **ctx)
    if "steps" in draws:
        x0_hat, t_D, eps_D = _dmd_sample(state, cond, draws, cfg, grad_student)
        out = dmd_loss(x0_hat, state.fake, state.teacher, cond, t=t_D, eps=eps_D,
                       guidance=cfg.teacher.guidance, weight_min=d.dmd_weight_min,
                       scale=d.reg_weight * d.scm_loss_scale)
        yield LossOut(out.loss, {**out.metrics, "rollout_steps": float(draws["steps"])})


def _student_step(state: DistillState, batch: LatentBatch, cfg: ExperimentCfg, g: torch.Generator,
                  grad_student: TrigFlowDenoiser) -> dict[str, float]:
    d = cfg.distill
    in_warmup = uses_dmd(d) and consistency_term(d) is not None and state.iteration < d.tangent_warmup
    r = min(1.0, state.iteration / d.tangent_warmup) if d.tangent_warmup > 0 else 1.0
    draws = _student_draws(state, batch.latent, cfg, g, with_dmd=uses_dmd(d) and not in_warmup)
    state.opt_student.zero_grad(set_to_none=True)
    # Under FSDP2 each micro-batch's backward reduce-scatters into the sharded gradients (they accumulate there);
    # skipping it would hold a whole unsharded gradient per GPU (56 GB at 14B). Replicated data parallelism
    # all-reduces once, after the last micro-batch (sync_gradients).
    combined = _accumulate(
        batch, draws, cfg.data.micro_batch_size, lambda rows, d: _student_terms(state, rows, d, cfg, r, grad_student))
    _set_lr(state.opt_student, cfg.optim.lr * lr_factor(state.student_iter, cfg.optim.lr_warmup))
    combined, bad = _check_and_step(state.student, state.opt_student, combined)
    state.ema.update(state.student, master_parameters(state.student, state.opt_student))
    combined, bad = _read_last(combined, bad)
    state.student_iter += 1
    metrics = {"tangent_warmup_r": r, **combined}
    state.counters["nonfinite_grads"] += bad
    state.counters["nan_samples"] += sum(metrics.get(f"{k}_nan_samples", 0.0) for k in ("scm", "dcm", "dmd"))
    metrics.update(nonfinite_grads=float(bad), phase_student=1.0)
    return metrics


def _critic_terms(state: DistillState, batch: LatentBatch, draws: dict, cfg: ExperimentCfg,
                  grad_fake: TrigFlowDenoiser) -> Iterator[LossOut]:
    """The critic's one loss term: flow matching of the fake score on the student's rollout samples."""
    cond = batch_condition(batch)
    with torch.no_grad():
        x0_hat, t_D, eps_D = _dmd_sample(state, cond, draws, cfg, None)
    yield fake_score_loss(grad_fake, x0_hat, cond, t=t_D, eps=eps_D)


def _critic_step(state: DistillState, batch: LatentBatch, cfg: ExperimentCfg, g: torch.Generator,
                 grad_fake: TrigFlowDenoiser) -> dict[str, float]:
    draws = _rollout_draws(state, batch.latent, cfg.distill, g)
    state.opt_fake.zero_grad(set_to_none=True)
    metrics = _accumulate(
        batch, draws, cfg.data.micro_batch_size, lambda rows, d: _critic_terms(state, rows, d, cfg, grad_fake))
    _set_lr(state.opt_fake, cfg.optim.fake_lr * lr_factor(state.critic_iter, cfg.optim.lr_warmup))
    metrics, bad = _read_last(*_check_and_step(state.fake, state.opt_fake, metrics))
    state.critic_iter += 1
    state.counters["nonfinite_grads"] += bad
    state.counters["nan_samples"] += metrics["critic_nan_samples"]
    return {**metrics, "nonfinite_grads": float(bad), "phase_student": 0.0}


def distill_step(state: DistillState, batch: LatentBatch, cfg: ExperimentCfg, generator: torch.Generator,
                 *, grad_student: TrigFlowDenoiser | None = None,
                 grad_fake: TrigFlowDenoiser | None = None) -> dict[str, float]:
    """One iteration; `grad_*` are optional wrapped modules used for the with-grad forward passes."""
    check_latents(batch.latent, state.student)
    if is_student_phase(state.iteration, cfg.distill):
        _free_gradients(state.opt_fake)
        metrics = _student_step(state, batch, cfg, generator, grad_student or state.student)
    else:
        _free_gradients(state.opt_student)
        metrics = _critic_step(state, batch, cfg, generator, grad_fake or state.fake)
    state.iteration += 1
    return metrics


def _free_gradients(opt) -> None:
    """Drop the gradients of the network this iteration does not train. Its last step has read them and its next
    step zeroes them first, so nothing reads them again; kept, they would sit on this iteration's memory peak
    (issue 28): where one process steps fp32 masters by casting (CPU runs, β₁ ≠ 0) its masters' fp32 gradients,
    4 B per parameter (5.3 GiB at Wan2.1-1.3B; the bf16 ones are freed by the step, and a step in one pass,
    `kernels.master_adamw`, leaves none at all); under FSDP2 its fp32 gradient shards, 4 B per parameter over the
    shard. The network just stepped keeps its own until then (what the tests compare)."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)


def batch_condition(batch: LatentBatch) -> torch.Tensor:
    """The network's cond input: class labels [B] or a text-embedding sequence [B, L, D]."""
    if batch.label is not None:
        return batch.label
    if batch.cond is not None:
        return batch.cond
    raise ValueError("the batch has neither `label` nor `cond`; every latent row needs a condition")

