"""Gradient accumulation: an update over micro-batches equals the update over the whole batch, in float64.

    .venv/bin/python -m pytest tests/test_grad_accum.py -q       # ~1 min on 2 cores (two gloo cases)

`data.micro_batch_size` splits each GPU's batch; every random draw of the iteration is made first for the whole
batch (rcm_core.method.distill), so the comparison is exact up to summation order: the tiny DiT runs in float64
and the bars are 1e-10 absolute / 1e-9 relative on gradients of O(1e-2..1) (observed differences ~1e-16).
Cases: sCM (the JVP through attention), dCM, and rCM's three kinds of iteration (sCM warm-up, sCM + DMD, critic),
on one process, under FSDP2 (2 gloo ranks) and under Ulysses CP (2 ranks); the causal modes tf, df, tf_scm, tf_dcm
(block-causal student, teacher-forcing contexts drawn up front) on one process; sf_dmd refuses micro-batches.
"""
from __future__ import annotations

import pytest
import torch

from rcm_core.config import ConfigError, from_dict
from rcm_core.method.distill import build_state, distill_step, micro_batches
from rcm_core.parallel.mesh import MeshShape, build_mesh
from rcm_core.parallel.sharding import parallelize_state
from rcm_core.run.loop import step_generator
from test_parallel import HEADS, TINY, TOKENS, full, sample_batch, spawn, tiny_denoiser

ATOL, RTOL = 1e-10, 1e-9
BATCH = 4


CAUSAL_MODES = ("tf", "df", "tf_scm", "tf_dcm", "sf_dmd")


def cfg_for(mode: str, micro: int, **distill_kw):
    distill = {"mode": mode, "tangent_warmup": 1 if mode == "rcm" else 0, "student_update_freq": 2,
               "max_rollout_steps": 3, **distill_kw}
    model = {**TINY, "causal": True, "first_chunk_t": 1, "chunk_t": 1} if mode in CAUSAL_MODES else TINY
    return from_dict({"model": model, "distill": distill, "data": {"batch_size": BATCH, "micro_batch_size": micro},
                      "optim": {"lr": 1e-3, "fake_lr": 1e-3, "lr_warmup": 0}, "teacher": {"guidance": 3.0}})


def grads(module) -> list[torch.Tensor]:
    return [full(p.grad).detach().clone() for p in module.parameters()]


def run_and_compare(mode: str, micro: int, mesh=None, rank: int = 0, **distill_kw) -> list[str]:
    """Three iterations of a whole-batch state and a micro-batched one on the same batches and draws; after
    each, the gradients that update used and the parameters must agree. Returns the phases seen."""
    states = []
    for m in (0, micro):
        s = build_state(cfg_for(mode, m, **distill_kw), tiny_denoiser(1))
        states.append(parallelize_state(s, mesh) if mesh is not None else s)
    phases = []
    for it in range(3):
        batch = sample_batch(10 * it + rank, batch=BATCH)
        out = [distill_step(s, batch, cfg_for(mode, m, **distill_kw),
                            step_generator(0, rank, it, torch.device("cpu")))
               for s, m in zip(states, (0, micro))]
        student = out[0]["phase_student"] == 1.0
        phases.append("student" if student else "critic")
        nets = [s.student if student else s.fake for s in states]
        g_big, g_acc = grads(nets[0]), grads(nets[1])
        assert max(g.abs().max().item() for g in g_big) > 1e-3, "no gradient: the comparison would be vacuous"
        for k, (a, b) in enumerate(zip(g_big, g_acc)):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL,
                                       msg=lambda msg, k=k: f"{mode} iteration {it} parameter {k}: {msg}")
        torch.testing.assert_close(out[1]["loss"], out[0]["loss"], atol=ATOL, rtol=RTOL)
        for key in out[0]:
            if key.endswith("_nan_samples"):
                assert out[1][key] == out[0][key], key
    for a, b in zip(states[0].student.parameters(), states[1].student.parameters()):
        torch.testing.assert_close(full(b).detach(), full(a).detach(), atol=1e-9, rtol=1e-7)
    # optimiser updates, not micro-batches, drive the counters, the EMA and the learning-rate schedule
    a, b = states
    assert (a.iteration, a.student_iter, a.critic_iter, a.ema.num_updates) == \
           (b.iteration, b.student_iter, b.critic_iter, b.ema.num_updates)
    return phases


@pytest.mark.parametrize("mode,micro", [("scm", 1), ("dcm", 2), ("rcm", 1), ("rcm", 2)])
def test_micro_batches_equal_the_whole_batch(mode, micro):
    phases = run_and_compare(mode, micro)
    if mode == "rcm":      # warm-up student (sCM only), student (sCM + λ·DMD), critic
        assert phases == ["student", "student", "critic"]


@pytest.mark.parametrize("mode,micro,context", [("tf", 1, "clean"), ("df", 2, "clean"), ("tf_scm", 1, "last_step"),
                                                ("tf_dcm", 2, "clean")])
def test_causal_micro_batches_equal_the_whole_batch(mode, micro, context):
    """Teacher forcing / diffusion forcing / their consistency modes on a block-causal student (2 one-frame chunks):
    contexts (noised to the cached time with last_step), per-chunk times and noise are drawn for the whole batch."""
    assert run_and_compare(mode, micro, chunk_context=context) == ["student"] * 3


def test_sf_dmd_refuses_micro_batches():
    """sf_dmd's self-forcing rollout draws its re-noisings between the chunks' forwards, so it does not accumulate."""
    cfg_for("sf_dmd", 0)
    with pytest.raises(ConfigError, match=r"data.micro_batch_size=2 is impossible: distill.mode=sf_dmd does not "
                                          r"accumulate"):
        cfg_for("sf_dmd", 2)


def _sharded_worker(shape: MeshShape, mode: str, micro: int) -> None:
    import torch.distributed as dist
    mesh = build_mesh(shape, num_heads=HEADS, num_tokens=TOKENS)
    run_and_compare(mode, micro, mesh=mesh, rank=mesh.dp_rank if dist.is_initialized() else 0)


@pytest.mark.parametrize("shape", [MeshShape(1, 2, 1), MeshShape(1, 1, 2)], ids=["fsdp2", "cp2"])
def test_micro_batches_equal_the_whole_batch_sharded(shape):
    spawn(_sharded_worker, 2, shape, "rcm", 2)


def test_micro_batch_size_must_divide_the_batch():
    assert micro_batches(8, 0) == [slice(0, 8)]
    assert micro_batches(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match=r"data.micro_batch_size=3 does not divide this GPU's batch of 8 rows"):
        micro_batches(8, 3)
    with pytest.raises(ConfigError, match="data.micro_batch_size"):
        cfg_for("scm", 3)


class _SavedBytes:
    """Bytes of autograd's saved tensors alive at once (`saved_tensors_hooks`): each saved tensor is held by a
    token that adds its bytes when the graph saves it and takes them off when the graph is freed."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> _Held:
        return _Held(self, t)

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.t


class _Held:
    def __init__(self, tally: _SavedBytes, t: torch.Tensor):
        self.tally, self.t, self.n = tally, t, t.numel() * t.element_size()
        tally.live += self.n
        tally.peak = max(tally.peak, tally.live)

    def __del__(self):
        self.tally.live -= self.n


def test_each_loss_term_backs_through_alone():
    """rCM's student iteration (sCM + λ·DMD) backs each loss term through before the next term's forwards run:
    `distill_step` gives the gradient of one backward of the summed terms (float64, the file's bars), while the
    saved tensors of only one term's graph are alive at once (the peak is the larger graph's bytes, not the sum:
    what lets a student step fit where its two with-grad graphs together would not, `rcm_core.run.plan`)."""
    from rcm_core.method.distill import _student_draws, _student_terms
    cfg = cfg_for("rcm", 0, tangent_warmup=0)
    ref, new = (build_state(cfg, tiny_denoiser(1)) for _ in range(2))
    batch = sample_batch(0, batch=BATCH)

    tally, graph_bytes, terms = _SavedBytes(), [], []
    draws = _student_draws(ref, batch.latent, cfg, step_generator(0, 0, 0, torch.device("cpu")), with_dmd=True)
    with torch.autograd.graph.saved_tensors_hooks(tally.pack, tally.unpack):
        for term in _student_terms(ref, batch, draws, cfg, 1.0, ref.student):     # every graph built, then
            terms.append(term)                                                   # one backward (the old step)
            graph_bytes.append(tally.live - sum(graph_bytes))
        ref_peak = tally.peak
        sum(t.loss for t in terms).backward()
    assert len(terms) == 2 and min(graph_bytes) > 0 and ref_peak == sum(graph_bytes)
    assert {"scm_loss", "dmd_loss"} <= {k for t in terms for k in t.metrics}

    tally = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(tally.pack, tally.unpack):
        out = distill_step(new, batch, cfg, step_generator(0, 0, 0, torch.device("cpu")))
    assert out["phase_student"] == 1.0 and "dmd_loss" in out and "scm_loss" in out
    print("saved bytes per term", graph_bytes, "peak: summed terms", ref_peak, "term by term", tally.peak)
    assert tally.peak == max(graph_bytes) and tally.live == 0
    g_ref, g_new = grads(ref.student), grads(new.student)
    assert max(g.abs().max().item() for g in g_ref) > 1e-3, "no gradient: the comparison would be vacuous"
    for k, (a, b) in enumerate(zip(g_ref, g_new)):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=lambda msg, k=k: f"parameter {k}: {msg}")
    torch.testing.assert_close(out["loss"], sum(t.loss.item() for t in terms), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_an_iteration_holds_no_gradient_of_the_network_it_does_not_train(dtype):
    """rCM alternates the student's and the critic's updates; each iteration frees the other network's gradients
    before its first forward, so they are not on its memory peak (on one process that casts to fp32 masters, as
    here on the CPU, the masters' fp32 gradients: 4 B per parameter, 5.3 GiB at Wan2.1-1.3B). Checked where the
    peak builds: at every tensor the first loss term saves for its backward, the idle network holds no gradient,
    neither on its parameters nor (bf16) on its fp32 masters; the network just stepped keeps its own until its
    next step."""
    cfg = cfg_for("rcm", 0, tangent_warmup=0)
    cfg.model.dtype = dtype
    state = build_state(cfg, tiny_denoiser(1) if dtype == "float64" else _bf16(tiny_denoiser(1)))

    def grad_bytes(opt) -> int:
        tensors = list(getattr(opt, "masters", [])) + [p for g in opt.param_groups for p in g["params"]]
        params = [p for p in state.student.parameters()] if opt is state.opt_student else list(state.fake.parameters())
        held = {id(t.grad): t.grad for t in tensors + params if t.grad is not None}
        return sum(g.numel() * g.element_size() for g in held.values())

    seen = []
    for it in range(4):                                   # student, critic, student, critic (student_update_freq 2)
        idle = state.opt_fake if it % 2 == 0 else state.opt_student
        before = grad_bytes(idle)

        def pack(t, idle=idle):
            seen.append(grad_bytes(idle))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = distill_step(state, sample_batch(it, batch=BATCH), cfg, step_generator(0, 0, it, torch.device("cpu")))
        assert out["phase_student"] == (1.0 if it % 2 == 0 else 0.0)
        trained = state.opt_student if it % 2 == 0 else state.opt_fake
        assert grad_bytes(trained) > 0                    # the stepped network keeps its gradients
        if it > 0:
            assert before > 0, "the idle network had no gradient to free: the check would be vacuous"
        assert seen and max(seen) == 0, f"iteration {it}: the idle network held {max(seen)} B of gradients"
        seen.clear()


def _bf16(denoiser):
    from rcm_core.networks import cast_network
    cast_network(denoiser.net, torch.bfloat16)
    return denoiser
