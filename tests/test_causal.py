"""Causal rCM on CPU: the block-causal DiT, its KV cache and teacher-forcing packing, the streaming sampler.

    .venv/bin/python -m pytest tests/test_causal.py -q

The equalities are the contract of issue 30: chunk-by-chunk inference with the KV cache computes exactly what a
full forward under the block-causal mask computes, and the teacher-forcing packing [context | noisy] exactly what
inference sees with the context re-encoded into the cache. Both run in float64, where the only difference is the
order of floating-point sums (a masked key contributes an exact 0): each bar, 1e-13, sits about a hundred times
above the largest relative error measured over 20 seeds (see each test's docstring).
"""
from __future__ import annotations

import pytest
import torch

from rcm_core.config import ModelCfg
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.streaming import DEFAULT_MID_T, stream_sample
from rcm_core.method.trigflow import add_noise
from rcm_core.networks import build_network
from rcm_core.networks.causal import ChunkPattern, KVCache

TINY = {"kind": "dit", "in_channels": 4, "dim": 48, "ffn_dim": 96, "num_heads": 2, "num_layers": 2, "freq_dim": 32,
        "text_dim": 24, "num_classes": 3, "label_tokens": 2, "dtype": "float64"}
SHAPE = (2, 4, 5, 4, 6)        # T = 5 latent frames = chunks [1 | 2 | 2]; 2·3 = 6 tokens per frame


@torch.no_grad()
def causal_dit(seed: int = 0, **kw) -> torch.nn.Module:
    """A float64 causal DiT with generic random weights (the adaLN-zero init would make it the zero function)."""
    torch.manual_seed(seed)
    net = build_network(ModelCfg(**{**TINY, "causal": True, "first_chunk_t": 1, "chunk_t": 2, **kw}))
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return net


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def chunk_times(net, B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random raw times, one per chunk: as [B, T] per frame and as a [B] per chunk."""
    spans = net.chunks.chunk_spans(T)
    per_chunk = [torch.rand(B, generator=g, dtype=torch.float64) * 10 for _ in spans]
    frames = torch.cat([t[:, None].expand(-1, b - a) for t, (a, b) in zip(per_chunk, spans)], 1)
    return frames, per_chunk


# ----------------------------------------------------------------------------------------------------------
# Item 2: one network, two attention patterns

def test_chunk_pattern_and_errors():
    p = ChunkPattern(1, 2)
    assert p.chunk_frames(5) == [1, 2, 2] and p.chunk_spans(5) == [(0, 1), (1, 3), (3, 5)]
    assert p.chunk_frames(9) == [1, 2, 2, 2, 2]                    # extrapolation: more chunks, same pattern
    with pytest.raises(ValueError, match="first_chunk_t \\+ k·chunk_t"):
        p.chunk_frames(4)
    with pytest.raises(ValueError, match="≥ 1 latent frame"):
        ChunkPattern(0, 1)


def test_causal_adds_no_weights_so_wan_checkpoints_load():
    bidirectional = build_network(ModelCfg(**TINY))
    causal = causal_dit()
    assert {k: v.shape for k, v in causal.state_dict().items()} == \
           {k: v.shape for k, v in bidirectional.state_dict().items()}
    causal.load_state_dict(bidirectional.state_dict())             # strict: same keys, same shapes


@torch.no_grad()
def test_bidirectional_forward_unchanged_and_per_frame_times_equal_per_sample():
    """Per-frame times that are equal within a sample give the output of one time per sample (the time MLP sees
    B·T rows instead of B, so BLAS may sum in another order: measured over 20 seeds, max relative error 1.3e-15;
    bar 1e-13), with the causal switch off and on."""
    net = causal_dit()
    net.causal = False
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.tensor([3.0, 7.0], dtype=torch.float64)
    cond = torch.tensor([0, 2])
    out = net(x, t, cond)
    assert rel_err(net(x, t[:, None].expand(-1, SHAPE[2]), cond), out) < 1e-13
    net.causal = True
    causal_out = net(x, t, cond)
    assert rel_err(net(x, t[:, None].expand(-1, SHAPE[2]), cond), causal_out) < 1e-13
    # the last chunk sees every frame, so only earlier chunks change under the mask
    assert not torch.allclose(causal_out[:, :, :3], out[:, :, :3])


@pytest.mark.parametrize("seed", range(3))
@torch.no_grad()
def test_kv_cache_chunk_by_chunk_equals_block_causal_forward(seed):
    """Each chunk forwarded alone against the cache (its own time, its keys appended) = the full forward with
    per-frame times under the block-causal mask. Measured over 20 seeds: max relative error 1.1e-15 (float64
    rounding); bar 1e-13."""
    net = causal_dit(seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    cond = torch.tensor([1, 2])
    t_frames, t_chunks = chunk_times(net, SHAPE[0], SHAPE[2], g)
    full = net(x, t_frames, cond)
    cache = KVCache()
    parts = [net(x[:, :, a:b], t, cond, cache=cache, append=True)
             for t, (a, b) in zip(t_chunks, net.chunks.chunk_spans(SHAPE[2]))]
    assert cache.frames == SHAPE[2]
    assert rel_err(torch.cat(parts, 2), full) < 1e-13


@pytest.mark.parametrize("seed", range(3))
@torch.no_grad()
def test_teacher_forcing_packing_equals_cache_with_clean_context(seed):
    """One packed forward [x0 at t=0 | x_t] = for each chunk: x_t's chunk against the cache, then x0's chunk
    re-encoded at t = 0 and appended. Measured over 20 seeds: max relative error 1.4e-15; bar 1e-13."""
    net = causal_dit(seed)
    g = torch.Generator().manual_seed(200 + seed)
    x0, x_t = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(SHAPE[0], generator=g, dtype=torch.float64) * 10
    zero = torch.zeros(SHAPE[0], dtype=torch.float64)
    cond = torch.tensor([0, 1])
    packed = net(x_t, t, cond, tf_context=(x0, zero))
    cache, parts = KVCache(), []
    for a, b in net.chunks.chunk_spans(SHAPE[2]):
        parts.append(net(x_t[:, :, a:b], t, cond, cache=cache))
        net(x0[:, :, a:b], zero, cond, cache=cache, append=True)
    assert rel_err(torch.cat(parts, 2), packed) < 1e-13


def test_causal_forms_refuse_misuse():
    net = causal_dit()
    x, t, cond = torch.zeros(SHAPE, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pass cache=KVCache"):
        net(x, t, cond, append=True)
    with pytest.raises(ValueError, match="first_chunk_t \\+ k·chunk_t"):
        net(x[:, :, :4], t, cond)
    net.causal = False
    with pytest.raises(ValueError, match="block-causal network"):
        net(x, t, cond, cache=KVCache())


# ----------------------------------------------------------------------------------------------------------
# Item 4: the streaming sampler

def reference_stream(student, noise, cond, *, steps_per_chunk, mid_t_per_chunk, sigma_max, context, generator):
    """The streaming sampler without a cache: every forward is a full block-causal forward over [the context
    chunks so far | the current chunk] with per-frame times, keeping the current chunk's prediction."""
    from rcm_core.method.streaming import chunk_time_grids
    B = noise.shape[0]
    spans = student.net.chunks.chunk_spans(noise.shape[2])
    grids = chunk_time_grids(len(spans), steps_per_chunk, mid_t_per_chunk, sigma_max)
    ctx_x, ctx_t, out = [], [], []
    for (a, b), times in zip(spans, grids):
        x = torch.sin(times[0]) * noise[:, :, a:b]
        for n in range(times.shape[0] - 1):
            t_now = times[n].expand(B, b - a)
            x0 = student.f(torch.cat([*ctx_x, x], 2), torch.cat([*ctx_t, t_now], 1), cond)[:, :, a:]
            if n == times.shape[0] - 2:
                if context == "last_step":
                    ctx_x.append(x), ctx_t.append(t_now)
                break
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = add_noise(x0, eps, times[n + 1].expand(B))
        if context == "clean":
            ctx_x.append(x0), ctx_t.append(torch.zeros(B, b - a, dtype=torch.float64))
        out.append(x0)
    return torch.cat(out, 2)


@pytest.mark.parametrize("context", ["clean", "last_step"])
@torch.no_grad()
def test_streaming_sampler_equals_full_block_causal_forwards(context):
    """Chunk by chunk with the cache (4 steps for the first chunk, 2 after; the official 4-step times) = the
    cache-free reference above, in float64. Measured over 20 seeds, both context modes: max relative error
    9.3e-16; bar 1e-13."""
    student = TrigFlowDenoiser(causal_dit(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cond = torch.tensor([2, 0])
    kw = {"steps_per_chunk": [4, 2], "mid_t_per_chunk": [DEFAULT_MID_T, DEFAULT_MID_T[1:]], "sigma_max": 80.0,
          "context": context}
    got = stream_sample(student, noise, cond, generator=torch.Generator().manual_seed(9), **kw)
    want = reference_stream(student, noise, cond, generator=torch.Generator().manual_seed(9), **kw)
    assert got.shape == SHAPE and rel_err(got, want) < 1e-13


def test_sample_cli_streams_a_causal_student(tmp_path, capsys):
    """`workflows/sample.py --causal`: a saved causal student streams 2× the frames it was built for (extrapolation:
    more chunks of the same pattern) and prints the time to the first chunk and every chunk's latency."""
    from rcm_core.config import load_config
    from rcm_core.run.teacher import save_teacher
    from workflows.sample import main

    cfg = load_config(None, [f"model.{k}={v}" for k, v in {**TINY, "dtype": "float32", "causal": "true",
                                                             "chunk_t": 2}.items()])
    path = save_teacher(TrigFlowDenoiser(causal_dit(0, dtype="float32")), cfg, tmp_path / "student.pt")
    out = tmp_path / "s.npy"
    assert main(["--checkpoint", str(path), "--causal", "--steps", "1", "--steps-per-chunk", "2", "1",
                 "--mid-s", "5/6;", "--context", "last_step", "--num-samples", "3", "--latent-shape", "4", "9", "4",
                 "6", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "time to first chunk" in printed and "(5 chunks, context=last_step)" in printed
    import numpy as np
    x = np.load(out)
    assert x.shape == (3, 4, 9, 4, 6) and np.isfinite(x).all()


# ----------------------------------------------------------------------------------------------------------
# Item 3: the training modes, each against a cache-free or cache-route reference in float64

class ChunkwiseTF(TrigFlowDenoiser):
    """The same network, but a teacher-forcing context is handled the way inference does it: chunk by chunk, the
    noisy chunk against the cache, then the context chunk appended. What every tf_* loss computes in one packed
    forward must equal what it computes through this route (forward-mode AD included)."""

    def F(self, x_t, t, cond, *, tf_context=None, **kw):
        if tf_context is None:
            return super().F(x_t, t, cond, **kw)
        x_ctx, t_ctx = tf_context
        cache, parts = KVCache(differentiable=True), []
        for a, b in self.net.chunks.chunk_spans(x_t.shape[2]):
            parts.append(super().F(x_t[:, :, a:b], t, cond, cache=cache))
            super().F(x_ctx[:, :, a:b], t_ctx[:, a:b] if t_ctx.dim() == 2 else t_ctx, cond, cache=cache, append=True)
        return torch.cat(parts, 2)


def _pair(seed: int):
    """(packed, chunkwise) views of one float64 causal network, a batch, its condition."""
    net = causal_dit(seed)
    g = torch.Generator().manual_seed(300 + seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return TrigFlowDenoiser(net), ChunkwiseTF(net), x0, torch.tensor([0, 2]), g


@pytest.mark.parametrize("mode", ["tf", "tf_scm", "tf_dcm", "tf_scm noisy context"])
def test_teacher_forcing_modes_equal_the_cache_route(mode):
    """tf (flow matching), tf_scm (sCM: the JVP runs through the block-causal attention with zero tangents on the
    clean context) and tf_dcm (dCM: CFG-teacher Euler steps and the student's own target), packed = chunk by chunk
    through a differentiable cache, loss value and gradient; also tf_scm with the student's context noised per
    chunk (chunk_context=last_step) and the teacher's clean. Measured over 10 seeds, all four: max relative error
    1.3e-15 (loss), 2.6e-15 (gradient); bar 1e-12."""
    from rcm_core.method.causal import teacher_forcing_loss
    from rcm_core.method.losses import dcm_loss, scm_loss
    from rcm_core.method.timesteps import sample_dcm_times

    packed, chunkwise, x0, cond, g = _pair(0)
    teacher = TrigFlowDenoiser(causal_dit(7))                          # a causal teacher (other weights)
    t = torch.rand(2, generator=g, dtype=torch.float64) + 0.2
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    ctx = clean = (x0, torch.zeros(2, dtype=torch.float64))
    if mode.endswith("noisy context"):    # chunk_context=last_step: the student's context noised, the teacher's clean
        from rcm_core.method.causal import noisy_context
        ctx = noisy_context(x0, [0.0, 1.0, 0.6], packed.net.chunks.chunk_spans(SHAPE[2]), g)

    def loss(model, teacher_model):
        if mode == "tf":
            return teacher_forcing_loss(model, x0, cond, t=t, eps=eps).loss
        if mode.startswith("tf_scm"):
            return scm_loss(model, teacher_model, x0, cond, t=t, eps=eps, guidance=2.0, r=0.5, scale=100.0,
                            tf_context=ctx, teacher_context=clean).loss
        times = sample_dcm_times(2, total_steps=8, skip=2, shift=3.0, generator=torch.Generator().manual_seed(4))
        return dcm_loss(model, teacher_model, x0, cond, times=times, eps=eps, guidance=2.0, scale=100.0,
                        tf_context=ctx).loss

    results = []
    for model, teacher_model in ((packed, teacher), (chunkwise, ChunkwiseTF(teacher.net))):
        model.zero_grad()
        value = loss(model, teacher_model)
        value.backward()
        results.append((value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (v1, g1), (v2, g2) = results
    assert v1 > 0 and rel_err(v1, v2) < 1e-12 and rel_err(g1, g2) < 1e-12


def test_diffusion_forcing_equals_chunks_at_their_own_times():
    """df: one block-causal forward at per-chunk times = each chunk forwarded against the cache at its time and
    appended as it is (the noisy chunks are each other's context). Measured over 10 seeds: max relative error
    3.9e-16; bar 1e-12."""
    from rcm_core.method.causal import diffusion_forcing_loss, frame_times
    from rcm_core.method.trigflow import velocity_target

    packed, _, x0, cond, g = _pair(1)
    spans = packed.net.chunks.chunk_spans(SHAPE[2])
    t_chunks = torch.rand(2, len(spans), generator=g, dtype=torch.float64) + 0.1
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    got = diffusion_forcing_loss(packed, x0, cond, t_chunks=t_chunks, spans=spans, eps=eps).loss
    t = frame_times(t_chunks, spans)
    x_t = add_noise(x0, eps, t)
    cache = KVCache()
    with torch.no_grad():
        F = torch.cat([packed.F(x_t[:, :, a:b], t_chunks[:, i], cond, cache=cache, append=True)
                       for i, (a, b) in enumerate(spans)], 2)
    want = ((F - velocity_target(x0, eps, t)) ** 2).flatten(1).sum(1).mean()
    assert rel_err(got.detach(), want) < 1e-12


def test_self_forcing_replay_equals_the_rollout_and_a_fresh_cache_per_chunk():
    """sf_dmd's rollout: no gradient while rolling out, each chunk's last step recomputed with gradient against
    the prefix of the rollout's cache. The recomputed x̂0 equals the rollout's, and equals (value and gradient) a
    reference whose last-step inputs come from cache-free full block-causal forwards and whose chunk i is
    recomputed against a fresh cache holding only the clean chunks < i (so the prefix slicing is what is
    checked; the context is detached in both, as in the official replay). Steps [3, 2, 1] per chunk. Measured
    over 10 seeds: replay = rollout exactly (0), reference 3.5e-16 (values), 5.1e-16 (gradient); bar 1e-12."""
    from rcm_core.method.causal import self_forcing_rollout

    student, _, _, cond, g = _pair(2)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    kw = {"steps": [3, 2, 1], "mid_t": [DEFAULT_MID_T, DEFAULT_MID_T[1:]]}
    with torch.no_grad():
        rolled = self_forcing_rollout(student, noise, cond, generator=torch.Generator().manual_seed(1), **kw)
    w = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    replayed = self_forcing_rollout(student, noise, cond, generator=torch.Generator().manual_seed(1), **kw)
    assert rel_err(replayed.detach(), rolled) < 1e-12
    student.zero_grad()
    (replayed * w).sum().backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    ref = _reference_replay(student, noise, cond, rolled, kw, torch.Generator().manual_seed(1))
    assert rel_err(ref.detach(), rolled) < 1e-12
    (ref * w).sum().backward()
    assert rel_err(torch.cat([p.grad.flatten() for p in student.parameters()]), grad) < 1e-12


def _reference_replay(student, noise, cond, rolled, kw, generator):
    """Last-step inputs from cache-free full block-causal forwards over [clean chunks < i at t = 0 | chunk i]; then
    each chunk's last step with gradient against a fresh cache of the clean chunks < i."""
    from rcm_core.method.trigflow import HALF_PI
    B = noise.shape[0]
    spans = student.net.chunks.chunk_spans(noise.shape[2])
    out = []
    for i, ((a, b), n) in enumerate(zip(spans, kw["steps"])):
        mid = kw["mid_t"][min(i, len(kw["mid_t"]) - 1)]
        times = torch.tensor([HALF_PI, *mid[:n - 1]], dtype=torch.float64)
        zeros = torch.zeros(B, a, dtype=torch.float64)
        x = noise[:, :, a:b]
        with torch.no_grad():
            for k in range(n - 1):
                t_frames = torch.cat([zeros, times[k].expand(B, b - a)], 1)
                x0 = student.f(torch.cat([rolled[:, :, :a], x], 2), t_frames, cond)[:, :, a:]
                x = add_noise(x0, torch.randn(x.shape, generator=generator, dtype=x.dtype), times[k + 1].expand(B))
            cache = KVCache()
            for j, (c, d) in enumerate(spans[:i]):
                student.F(rolled[:, :, c:d], torch.zeros(B, dtype=torch.float64), cond, cache=cache, append=True)
        out.append(student.f(x, times[n - 1].expand(B), cond, cache=cache))
    return torch.cat(out, 2)


@torch.no_grad()
def test_causal_teacher_ode_streams_like_full_block_causal_forwards():
    """The evaluator's sampler for a causal teacher (tf_scm/tf_dcm runs): each chunk's guided Euler ODE against the
    cache, then re-encoded at t = 0 = the same ODE with every F_guided a full block-causal forward over [clean
    chunks so far | the chunk]. Measured over 10 seeds: max relative error 7.3e-16; bar 1e-13."""
    from rcm_core.method.samplers import _trig_step
    from rcm_core.method.streaming import stream_teacher_sample
    from rcm_core.method.timesteps import teacher_time_grid

    teacher = TrigFlowDenoiser(causal_dit(4))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cond = torch.tensor([1, 0])
    got = stream_teacher_sample(teacher, noise, cond, steps=3, guidance=2.0, shift=3.0)
    times, B, done = teacher_time_grid(3, shift=3.0), SHAPE[0], []
    for a, b in teacher.net.chunks.chunk_spans(SHAPE[2]):
        x = noise[:, :, a:b]
        for i in range(3):
            t_frames = torch.cat([torch.zeros(B, a, dtype=torch.float64), times[i].expand(B, b - a)], 1)
            F = teacher.F_guided(torch.cat([*done, x], 2), t_frames, cond, 2.0)[:, :, a:]
            x = _trig_step(x, F, times[i].expand(B), times[i + 1].expand(B))
        done.append(x)
    assert rel_err(got, torch.cat(done, 2)) < 1e-13


# ----------------------------------------------------------------------------------------------------------
# The last step's context (distill.chunk_context=last_step, official context_from_last_step)

def test_context_times_and_noisy_context():
    from rcm_core.method.causal import context_times, noisy_context
    from rcm_core.method.trigflow import HALF_PI

    _, b, c = DEFAULT_MID_T
    assert context_times(3, context="clean", last_step_from=0, max_steps=[4], mid_t=[DEFAULT_MID_T]) == [0.0] * 3
    assert context_times(3, context="last_step", last_step_from=1, max_steps=[4], mid_t=[DEFAULT_MID_T]) == [0, c, c]
    assert context_times(3, context="last_step", last_step_from=0, max_steps=[4, 2, 1],
                         mid_t=[DEFAULT_MID_T, [b]]) == [c, b, HALF_PI]
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spans = ChunkPattern(1, 2).chunk_spans(SHAPE[2])
    x_ctx, t = noisy_context(x0, [0.0, b, c], spans, torch.Generator().manual_seed(1))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(x_ctx[:, :, :1], x0[:, :, :1]) and torch.equal(t[0], torch.tensor([0, b, b, c, c], dtype=torch.float64))
    assert torch.allclose(x_ctx, add_noise(x0, eps, t), rtol=0, atol=1e-15)


@torch.no_grad()
def test_self_forcing_rollout_with_last_step_context_equals_a_cache_free_rollout():
    """Steps [2, 2, 1] against maxima [3, 2, 2]: chunk 1 ran its longest schedule, so its last step's keys/values
    are its context; chunks 0 and 2 ran shorter ones and are re-noised to their longest schedule's last time.
    = the same rollout with full block-causal forwards over [contexts at their times | chunk]. Measured over 10
    seeds: max relative error 8.0e-16; bar 1e-13."""
    from rcm_core.method.causal import context_times, self_forcing_rollout
    from rcm_core.method.trigflow import HALF_PI

    student, _, _, cond, g = _pair(3)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    steps, mids = [2, 2, 1], [DEFAULT_MID_T, DEFAULT_MID_T[1:]]
    t_ctx = context_times(3, context="last_step", last_step_from=0, max_steps=[3, 2, 2], mid_t=mids)
    got = self_forcing_rollout(student, noise, cond, steps=steps, mid_t=mids, context_t=t_ctx,
                               generator=torch.Generator().manual_seed(2))
    gen, B, ctx_x, ctx_t, out = torch.Generator().manual_seed(2), SHAPE[0], [], [], []
    for i, ((a, b), n) in enumerate(zip(student.net.chunks.chunk_spans(SHAPE[2]), steps)):
        times = [HALF_PI, *mids[min(i, 1)][:n - 1]]
        x = noise[:, :, a:b]
        for k, t in enumerate(times):
            t_now = torch.full((B, b - a), t, dtype=torch.float64)
            x0 = student.f(torch.cat([*ctx_x, x], 2), torch.cat([*ctx_t, t_now], 1), cond)[:, :, a:]
            if k == len(times) - 1:
                break
            x = add_noise(x0, torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.full((B,), times[k + 1], dtype=torch.float64))
        if times[-1] != t_ctx[i]:
            x = add_noise(x0, torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.full((B,), t_ctx[i], dtype=torch.float64))
        ctx_x.append(x), ctx_t.append(torch.full((B, b - a), t_ctx[i], dtype=torch.float64))
        out.append(x0)
    assert rel_err(got, torch.cat(out, 2)) < 1e-13
