"""The training objectives of Causal rCM that are not rCM's own losses with a context (NVlabs/rcm `Causal_rCM.md`).

    .venv/bin/python -m pytest tests/test_causal.py -q -k mode

Recipe: `tf` or `df` turns the bidirectional teacher into a causal one; `tf_dcm` or `tf_scm` distils it into a
few-step causal student (rcm_core.method.losses.dcm_loss / scm_loss with `tf_context`); `sf_dmd` refines that
student on its own rollouts against the bidirectional teacher and a fake score (losses.dmd_loss on the rollout
below). Every network call of the student is block-causal over chunks of latent frames (rcm_core.networks.causal).

- `teacher_forcing_loss` (`tf`): flow matching on x_t with the clean video as context, packed [x0 | x_t]: chunk i
  is denoised seeing the clean chunks before it, as at inference with the clean context re-encoded.
- `diffusion_forcing_loss` (`df`): one independent time per chunk, the whole noisy video under the block-causal mask.
- `self_forcing_rollout` (`sf_dmd`): the student generates the video chunk by chunk with the KV cache and no
  gradient, then recomputes each chunk's last denoising step with gradient against the cache of the chunks before
  it (official replayed self-forcing: the cache is context, never differentiated through).
- `context_times` (`distill.chunk_context`, official `context_from_last_step`): the time of the context each chunk
  leaves for the chunks after it: 0 (re-encoded clean) or the last time of its step schedule (the last step's keys
  and values, one forward fewer per chunk at inference), which teacher forcing then trains with.
"""
from __future__ import annotations

from itertools import pairwise

import torch

from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.losses import LossOut, flow_matching_loss
from rcm_core.method.streaming import per_chunk
from rcm_core.method.trigflow import HALF_PI, add_noise
from rcm_core.networks.causal import KVCache


def frame_times(t_chunks: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """[B, n_chunks] → [B, T]: each chunk's time repeated over its latent frames."""
    return torch.cat([t_chunks[:, i:i + 1].expand(-1, b - a) for i, (a, b) in enumerate(spans)], dim=1)


def teacher_forcing_loss(model: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor, *, t: torch.Tensor,
                         eps: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossOut:
    """Σ‖F(x_t, t | context) − (cos t·ε − sin t·x0)‖² (official `tf`); the context is the clean video x0 at t = 0
    unless given (`noisy_context`)."""
    context = context or (x0, torch.zeros_like(t, dtype=torch.float64))
    out = flow_matching_loss(model, x0, cond, t=t, eps=eps, tf_context=context)
    return LossOut(out.loss, {"tf_loss": out.metrics["fm_loss"]})


def diffusion_forcing_loss(model: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor, *,
                           t_chunks: torch.Tensor, spans: list[tuple[int, int]], eps: torch.Tensor) -> LossOut:
    """Flow matching with an independent time per chunk, t_chunks [B, n_chunks] over the chunks `spans` (official
    `df`, strategy random), the whole noisy video in one block-causal forward. (The official tf/df losses also
    offer a per-time weighting, off for df; not here: the TrigFlow F-target already weighs times differently from
    the RF velocity, by (cos t + sin t)².)"""
    t = frame_times(t_chunks, spans)
    out = flow_matching_loss(model, x0, cond, t=t, eps=eps)
    return LossOut(out.loss, {"df_loss": out.metrics["fm_loss"]})


def context_times(n_chunks: int, *, context: str, last_step_from: int, max_steps: list[int],
                  mid_t: list[list[float]]) -> list[float]:
    """TrigFlow time of each chunk's context: 0 for context="clean" and for chunks before `last_step_from`, else
    the last time of the chunk's longest schedule (its last intermediate time; π/2 for a 1-step chunk, whose
    only forward sees pure noise). Official `_context_from_last_step_time`."""
    if context not in ("clean", "last_step"):
        raise ValueError(f"chunk context {context!r}: use 'clean' or 'last_step'")
    steps = per_chunk(max_steps, n_chunks, "steps per chunk")
    mids = per_chunk(mid_t, n_chunks, "intermediate times per chunk")
    return [0.0 if context == "clean" or i < last_step_from else ([HALF_PI, *m[:n - 1]][-1])
            for i, (n, m) in enumerate(zip(steps, mids))]


def noisy_context(x0: torch.Tensor, t_chunks: list[float], spans: list[tuple[int, int]],
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forcing context (x_ctx, t_ctx [B, T]): x0 noised to each chunk's context time (exactly x0 where
    the time is 0), so training sees the context the sampler will cache (official `_noisy_ctx`)."""
    B = x0.shape[0]
    t = frame_times(torch.tensor([t_chunks], dtype=torch.float64, device=x0.device).expand(B, -1), spans)
    if not any(t_chunks):
        return x0, t
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return add_noise(x0, eps, t).to(x0.dtype), t


def self_forcing_steps(global_steps: int, max_per_chunk: list[int], n_chunks: int) -> list[int]:
    """Steps of each chunk in one rollout: min(N, chunk's maximum), N the rollout length of this iteration (cycled
    1..max_per_chunk[0], the first chunk's maximum; official `_self_forcing_simulation_steps`)."""
    maxima = per_chunk(max_per_chunk, n_chunks, "distill.sf_steps_per_chunk")
    if any(b > a for a, b in pairwise(maxima)):
        raise ValueError(f"distill.sf_steps_per_chunk={max_per_chunk} must be non-increasing over chunks")
    return [min(global_steps, m) for m in maxima]


def self_forcing_rollout(student: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, *,
                         steps: list[int], mid_t: list[list[float]], generator: torch.Generator | None,
                         grad_module: TrigFlowDenoiser | None = None,
                         context_t: list[float] | None = None) -> torch.Tensor:
    """x̂0 [B, C, T, H, W] of a chunk-by-chunk rollout: chunk i starts from pure noise at t = π/2, takes steps[i]
    consistency steps through the first steps[i] − 1 of mid_t[i] (fresh noise at each re-noising) and leaves its
    context in the cache: re-encoded at t = 0, or (context_t[i] > 0, `context_times`) its last step's keys and
    values when that step ran at context_t[i], else x̂0 re-noised to context_t[i] and encoded. With grad enabled,
    each chunk's last step is recomputed with gradient (through `grad_module`) against the cache prefix of the
    chunks before it; the values equal the rollout's."""
    B = noise.shape[0]
    spans = student.net.chunks.chunk_spans(noise.shape[2])
    mids = per_chunk(mid_t, len(spans), "rollout intermediate times")
    context_t = context_t or [0.0] * len(spans)
    cache, x0_chunks, replays = KVCache(), [], []
    with torch.no_grad():
        for (a, b), n, mid, t_ctx in zip(spans, steps, mids, context_t):
            times = torch.tensor([HALF_PI, *mid[:n - 1]], dtype=torch.float64, device=noise.device)
            if times.shape[0] != n:
                raise ValueError(f"a {n}-step chunk needs {n - 1} intermediate times, got {mid}")
            keep_last = t_ctx > 0 and float(times[-1]) == t_ctx      # the last step ran at the context's time
            frames = cache.frames
            x0_hat, x_last = _rollout_chunk(student, noise[:, :, a:b], cond, times, cache, generator, keep_last)
            x0_chunks.append(x0_hat)
            replays.append((x_last, times[-1].expand(B), frames))
            if not keep_last:
                x_ctx, t = x0_hat, torch.full((B,), t_ctx, dtype=torch.float64, device=noise.device)
                if t_ctx > 0:
                    eps = torch.randn(x0_hat.shape, generator=generator, device=noise.device, dtype=x0_hat.dtype)
                    x_ctx = add_noise(x0_hat, eps, t).to(x0_hat.dtype)
                student.F(x_ctx, t, cond, cache=cache, append=True)
    if not torch.is_grad_enabled():                   # the critic's samples: nothing to differentiate
        return torch.cat(x0_chunks, dim=2)
    module = grad_module or student
    return torch.cat([module.f(x, t, cond, cache=cache.prefix(frames)) for x, t, frames in replays], dim=2)


def _rollout_chunk(student, z, cond, times, cache, generator, keep_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, the input of the last step) of one chunk's consistency steps against the cache; keep_last appends
    the last step's keys and values."""
    B, x = z.shape[0], z
    for n in range(times.shape[0]):
        last = n == times.shape[0] - 1
        x0_hat = student.f(x, times[n].expand(B), cond, cache=cache, append=last and keep_last).to(z.dtype)
        if last:
            return x0_hat, x
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        x = add_noise(x0_hat, eps, times[n + 1].expand(B)).to(z.dtype)
    raise ValueError("a chunk needs at least 1 step")
