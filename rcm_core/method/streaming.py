"""Streaming sampling of a block-causal student: chunk by chunk with a KV cache (Causal rCM inference).

    .venv/bin/python -m pytest tests/test_causal.py -q -k stream

The video is generated one chunk of latent frames at a time ([first_chunk_t | chunk_t | …], the network's
`chunks`). Chunk i runs the multistep consistency sampler (rcm_core.method.samplers.consistency_sample) with its
own step count and intermediate times, each forward attending to the cached keys/values of chunks < i. The
context it leaves for the chunks after it is one of (official `context_from_last_step`):
- "clean": the finished chunk x̂0 re-encoded at t = 0 and appended (one extra forward per chunk);
- "last_step": the keys/values of the chunk's last denoising forward, appended as they are (one forward fewer;
  the context is then noisy at that step's time, which a student trained for it expects).

Step counts and intermediate times are lists over chunks, the last entry repeating (e.g. 4 steps for the first
chunk, 2 after: the first chunk sets the scene). The default intermediate times are the official 4-step ones in
rectified-flow time, s = 15/16, 5/6, 5/8, i.e. TrigFlow t = arctan(s / (1 − s)) = arctan 15, arctan 5, arctan 5/3.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch

from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.timesteps import student_time_grid
from rcm_core.method.trigflow import add_noise
from rcm_core.networks.causal import KVCache

RF_MID_S = (15 / 16, 5 / 6, 5 / 8)                                   # official 4-step intermediate RF times
DEFAULT_MID_T = [math.atan2(s, 1 - s) for s in RF_MID_S]              # the same as TrigFlow t
Context = Literal["clean", "last_step"]


def per_chunk(values: list, n_chunks: int, name: str) -> list:
    """A list over chunks, its last entry repeated to `n_chunks` (official: shorter lists repeat their tail)."""
    if not values:
        raise ValueError(f"{name} is empty; give at least one entry (it repeats over the later chunks)")
    return list(values[:n_chunks]) + [values[-1]] * max(0, n_chunks - len(values))


def chunk_time_grids(n_chunks: int, steps_per_chunk: list[int], mid_t_per_chunk: list[list[float]],
                     sigma_max: float, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """One student time grid [arctan σ_max, mid…, 0] per chunk: chunk i takes steps_per_chunk[i] steps and the
    first steps − 1 times of mid_t_per_chunk[i] (both lists repeat their last entry)."""
    steps = per_chunk(steps_per_chunk, n_chunks, "steps per chunk")
    mids = per_chunk(mid_t_per_chunk, n_chunks, "intermediate times per chunk")
    return [student_time_grid(n, sigma_max=sigma_max, mid_t=list(m), device=device) for n, m in zip(steps, mids)]


@torch.no_grad()
def stream_chunks(student: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, *,
                  steps_per_chunk: list[int], mid_t_per_chunk: list[list[float]], sigma_max: float,
                  context: Context = "clean", last_step_from: int = 0,
                  generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield x̂0 of each chunk [B, C, t_i, H, W] in order, as soon as it is done (a generator: the caller can
    show or time each chunk). `noise` [B, C, T, H, W] holds every chunk's starting noise; re-noising draws
    from `generator`. With context="last_step", chunks before `last_step_from` still append their clean context
    (official `context_from_last_step_start_chunk`)."""
    if context not in ("clean", "last_step"):
        raise ValueError(f"context={context!r}: use 'clean' (re-encode x̂0 at t = 0) or 'last_step'")
    net, B = student.net, noise.shape[0]
    spans = net.chunks.chunk_spans(noise.shape[2])
    grids = chunk_time_grids(len(spans), steps_per_chunk, mid_t_per_chunk, sigma_max, noise.device)
    cache = KVCache()
    for i, ((a, b), times) in enumerate(zip(spans, grids)):
        keep_last = context == "last_step" and i >= last_step_from
        x0_hat = _denoise_chunk(student, noise[:, :, a:b], cond, times, cache, keep_last, generator)
        if not keep_last:                                      # re-encode the finished chunk as clean context
            zero = torch.zeros(B, dtype=torch.float64, device=noise.device)
            student.F(x0_hat, zero, cond, cache=cache, append=True)
        yield x0_hat


def _denoise_chunk(student: TrigFlowDenoiser, z: torch.Tensor, cond: torch.Tensor, times: torch.Tensor,
                   cache: KVCache, keep_last: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The consistency sampler on one chunk against the cache; keep_last appends the last forward's keys/values."""
    B, steps = z.shape[0], times.shape[0] - 1
    x = (torch.sin(times[0]) * z.double()).to(z.dtype)
    for n in range(steps):
        last = n == steps - 1
        x0_hat = student.f(x, times[n].expand(B), cond, cache=cache, append=last and keep_last).to(z.dtype)
        if last:
            return x0_hat
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        x = add_noise(x0_hat, eps, times[n + 1].expand(B)).to(z.dtype)
    raise ValueError(f"a chunk needs at least 1 step, got {steps}")


def stream_sample(student: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, **kw) -> torch.Tensor:
    """The whole video [B, C, T, H, W] from `stream_chunks` (same arguments)."""
    return torch.cat(list(stream_chunks(student, noise, cond, **kw)), dim=2)


@torch.no_grad()
def stream_teacher_sample(teacher: TrigFlowDenoiser, noise: torch.Tensor, cond: torch.Tensor, *, steps: int,
                          guidance: float, shift: float = 5.0) -> torch.Tensor:
    """A causal teacher (a `tf`/`df` run's network) solved chunk by chunk: each chunk's guided PF-ODE from π/2 to
    0 on the teacher's shifted grid (first-order trigonometric steps, samplers.teacher_sample's Euler) against the
    cache, then the chunk re-encoded at t = 0. With guidance the cache holds the conditional and unconditional
    rows together (F_guided batches them)."""
    from rcm_core.method.samplers import _trig_step
    from rcm_core.method.timesteps import teacher_time_grid

    B, times = noise.shape[0], teacher_time_grid(steps, shift=shift, device=noise.device)
    cache, chunks = KVCache(), []
    for a, b in teacher.net.chunks.chunk_spans(noise.shape[2]):
        x = noise[:, :, a:b].double()
        for i in range(steps):
            t, t_next = times[i].expand(B), times[i + 1].expand(B)
            F = teacher.F_guided(x.to(noise.dtype), t, cond, guidance, cache=cache)
            x = _trig_step(x, F, t, t_next)
        x0 = x.to(noise.dtype)
        teacher.F_guided(x0, torch.zeros(B, dtype=torch.float64, device=noise.device), cond, guidance,
                         cache=cache, append=True)
        chunks.append(x0)
    return torch.cat(chunks, dim=2)
