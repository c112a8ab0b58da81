"""FSDP2, Ulysses context parallelism and distributed checkpoints on CPU processes (gloo).

    .venv/bin/python -m pytest tests/test_parallel.py -q        # 1, 2 and 4 processes; ~2-3 min on 2 cores

Every multi-process test compares against the single-process computation of the same numbers, done inside
each worker on plain modules (no collectives), so there is no second run to keep in sync. The tiny DiT
runs in float64, so "equal" means equal up to summation order: atol 1e-10 on O(1) values (stated per test).
Parameters are perturbed away from the adaLN-zero init so that every block, gate and head carries gradient
(at init the DiT is the identity and most gradients are exactly zero, which would hide errors).
"""
from __future__ import annotations

import copy
import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from rcm_core.config import ConfigError, ExperimentCfg, ModelCfg, from_dict, validate
from rcm_core.data.latents import LatentBatch
from rcm_core.parallel.dcp import load_distributed, save_distributed
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import build_state, distill_step, lr_factor, zero_nonfinite_grads
from rcm_core.run.loop import _resume, step_generator
from rcm_core.method.losses import scm_loss, scm_tangent_jvp
from rcm_core.parallel.mesh import (
    MeshShape,
    build_mesh,
    check_shape,
    legal_cp_sizes,
    shape_from_config,
)
from rcm_core.networks import build_network
from rcm_core.parallel.sharding import parallelize_network, parallelize_state, sync_gradients
from rcm_core.method.timesteps import sample_p_G

TINY = {"kind": "dit", "in_channels": 4, "patch_size": [1, 2, 2], "dim": 64, "ffn_dim": 128, "num_heads": 2,
        "num_layers": 2, "freq_dim": 32, "text_dim": 16, "num_classes": 4, "label_tokens": 2, "dtype": "float64"}
LATENT = (4, 2, 4, 4)        # C, T, H, W → token grid (2, 2, 2): 8 tokens
TOKENS, HEADS = 8, 2
ATOL, RTOL = 1e-10, 1e-9     # float64; observed differences are ~1e-15


# ----------------------------------------------------------------------------------------------------------
# Harness

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)                     # 2 shared cores: no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(*args) on `world` gloo ranks; a worker's exception fails the test with its traceback.

    Forked, not spawned: a spawned worker re-imports torch, which took ~30 s per process on the shared 2-core
    machine; a forked one starts at once and inherits arguments without pickling. Safe here because the
    parent never initialises a process group and each child sets one intra-op thread first (as DataLoader
    workers do)."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method="fork")


def tiny_denoiser(seed: int) -> TrigFlowDenoiser:
    torch.manual_seed(seed)
    net = build_network(ModelCfg(**TINY))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return TrigFlowDenoiser(net, "rf_velocity")


def tiny_cfg(steps: int = 3) -> ExperimentCfg:
    return from_dict({"model": TINY, "distill": {"mode": "scm", "tangent_warmup": 0},
                      "optim": {"lr": 1e-3, "lr_warmup": 0}, "teacher": {"guidance": 3.0},
                      "train": {"steps": steps}})


def sample_batch(index: int, batch: int = 2) -> LatentBatch:
    g = torch.Generator().manual_seed(100 + index)
    return LatentBatch(latent=torch.randn(batch, *LATENT, generator=g, dtype=torch.float64),
                       label=torch.randint(0, 4, (batch,), generator=g))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(full(a).detach(), full(b).detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------------
# Mesh validation (no processes)

def test_illegal_mesh_names_the_legal_choices():
    with pytest.raises(ValueError) as e:
        check_shape(MeshShape(1, 1, 3), world_size=3, num_heads=2, num_tokens=8)
    msg = str(e.value)
    assert "cp=3 does not divide model.num_heads=2" in msg and "Legal cp sizes: [1, 2]" in msg
    assert "(dp_replicate=1, dp_shard=3, cp=1)" in msg and "(dp_replicate=3, dp_shard=1, cp=1)" in msg
    with pytest.raises(ValueError, match=r"does not divide the 6 latent tokens.*Legal cp sizes: \[1, 2\]"):
        check_shape(MeshShape(1, 1, 4), world_size=4, num_heads=4, num_tokens=6)
    with pytest.raises(ValueError, match="dp_replicate·dp_shard·cp = 2 but there are 4 ranks"):
        check_shape(MeshShape(1, 1, 2), world_size=4, num_heads=2, num_tokens=8)
    check_shape(MeshShape(2, 1, 2), world_size=4, num_heads=2, num_tokens=8)       # legal: no error
    assert legal_cp_sizes(40, 21 * 30 * 52) == [1, 2, 4, 5, 8, 10, 20, 40]           # Wan 14B, 81×480p


def test_config_validates_the_parallel_section():
    with pytest.raises(ConfigError, match=r"parallel.cp=3.*legal cp sizes for model.kind=dit, model.num_heads=2: \[1, 2\]"):
        validate(from_dict({"model": TINY, "parallel": {"cp": 3}}))
    with pytest.raises(ConfigError, match=r"resources.num_workers=4.*dp_replicate·dp_shard·cp = 1·2·1 = 2 ranks; "
                                          r"legal .* for 4 workers: \[\(1, 4, 1\), \(2, 2, 1\)"):
        validate(from_dict({"model": TINY, "parallel": {"dp_replicate": 1, "dp_shard": 2},
                            "resources": {"num_workers": 4}}))
    with pytest.raises(ConfigError, match=r"parallel.cp=2.*model.kind=mlp.*\[1\]"):
        validate(from_dict({"model": {"kind": "mlp"}, "parallel": {"cp": 2}}))
    validate(from_dict({"model": TINY, "parallel": {"dp_shard": 2, "cp": 2}, "resources": {"num_workers": 8}}))
    validate(from_dict({"model": TINY, "resources": {"num_workers": 3}}))     # default: replicate over all
    cfg = from_dict({"parallel": {"dp_shard": 2, "cp": 2}, "resources": {"num_workers": 8}})
    assert shape_from_config(cfg.parallel, 8) == MeshShape(2, 2, 2)
    cfg = from_dict({"parallel": {"dp_replicate": 1, "dp_shard": -1}, "resources": {"num_workers": 4}})
    assert shape_from_config(cfg.parallel, 4) == MeshShape(1, 4, 1)


# ----------------------------------------------------------------------------------------------------------
# Ulysses CP: loss, gradients and JVP tangent equal the single-process values

def _context_parallel_worker(shape: MeshShape) -> None:
    mesh = build_mesh(shape, num_heads=HEADS, num_tokens=TOKENS)
    teacher, student = tiny_denoiser(1), tiny_denoiser(0)
    teacher_cp, student_cp = copy.deepcopy(teacher), copy.deepcopy(student)
    for m in (teacher_cp, student_cp):
        parallelize_network(m.net, mesh)
    student_cp.net.cfg.activation_checkpointing = True   # blocks recomputed in backward: all-to-alls run again
    seen = []
    student_cp.net.blocks[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))

    # One sample set per CP group (the reference covers every group's samples in turn).
    b = sample_batch(mesh.dp_rank)
    g = torch.Generator().manual_seed(7 + mesh.dp_rank)
    t = 0.2 + 1.2 * torch.rand(2, generator=g, dtype=torch.float64)
    eps = torch.randn(b.latent.shape, generator=g, dtype=torch.float64)
    x_t = torch.cos(t)[:, None, None, None, None] * b.latent + torch.sin(t)[:, None, None, None, None] * eps

    # The JVP tangent through the all-to-alls (scm_tangent_jvp = torch.func.jvp under no_grad).
    F_T = teacher.F_guided(x_t, t, b.label, 3.0).detach()
    F_T_cp = teacher_cp.F_guided(x_t, t, b.label, 3.0)
    assert_close(F_T_cp, F_T, "teacher forward")
    F_ref, T_ref = scm_tangent_jvp(student, x_t, t, b.label, F_T)
    F_cp, T_cp = scm_tangent_jvp(student_cp, x_t, t, b.label, F_T)
    assert T_ref.abs().max() > 1e-3
    assert_close(F_cp, F_ref, "F under jvp")
    assert_close(T_cp, T_ref, "JVP tangent")
    assert seen and all(n == TOKENS // shape.cp for n in seen), f"blocks saw {seen} tokens, expected {TOKENS // shape.cp}"

    # Loss and gradients; the reference gradient is the mean over all data-parallel groups' batches.
    out_cp = scm_loss(student_cp, teacher_cp, b.latent, b.label, t=t, eps=eps, guidance=3.0, r=1.0, scale=1.0)
    out_cp.loss.backward()
    sync_gradients(student_cp)
    out_ref = scm_loss(student, teacher, b.latent, b.label, t=t, eps=eps, guidance=3.0, r=1.0, scale=1.0)
    assert_close(out_cp.loss, out_ref.loss, "sCM loss")
    dp = shape.data_parallel_size
    for d in range(dp):                          # the single process sees every group's samples
        bd = sample_batch(d)
        gd = torch.Generator().manual_seed(7 + d)
        td = 0.2 + 1.2 * torch.rand(2, generator=gd, dtype=torch.float64)
        ed = torch.randn(bd.latent.shape, generator=gd, dtype=torch.float64)
        (scm_loss(student, teacher, bd.latent, bd.label, t=td, eps=ed, guidance=3.0, r=1.0, scale=1.0).loss
         / dp).backward()
    for (name, p), p_cp in zip(student.net.named_parameters(), student_cp.net.parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} has no gradient in the reference"
        assert_close(p_cp.grad, p.grad, f"gradient of {name}")


@pytest.mark.parametrize("world,shape", [(2, MeshShape(1, 1, 2)), (4, MeshShape(2, 1, 2))],
                         ids=["cp2", "dp2xcp2"])
def test_context_parallel_matches_single_process(world, shape):
    spawn(_context_parallel_worker, world, shape)


# ----------------------------------------------------------------------------------------------------------
# Selective activation recomputation (model.activation_checkpointing: mm_only) under FSDP2 and under Ulysses CP

def _selective_recompute_worker(shape: MeshShape) -> None:
    """Every rank trains on the same batch, so the reference gradient is the plain network's. FSDP2's per-block
    hooks sit outside the policy's region (it runs inside the block's forward); CP's all-to-alls sit inside it
    and are recomputed with the rest."""
    from rcm_core.networks.dit import set_attention, set_recompute
    mesh = build_mesh(shape, num_heads=HEADS, num_tokens=TOKENS)
    plain = tiny_denoiser(0)
    sharded = copy.deepcopy(plain)
    parallelize_network(sharded.net, mesh)
    for m in (plain, sharded):
        set_attention(m.net, "sdpa_grad")          # attention outputs are kept where SDPA runs them
    set_recompute(sharded.net, "mm_only")
    b = sample_batch(0)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    for m in (plain, sharded):
        m.F(b.latent, t, b.label).square().mean().backward()
    sync_gradients(sharded)
    for (name, p), p_sh in zip(plain.net.named_parameters(), sharded.net.parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} has no gradient in the reference"
        assert_close(p_sh.grad, p.grad, f"gradient of {name} under mm_only")


@pytest.mark.parametrize("shape", [MeshShape(1, 2, 1), MeshShape(1, 1, 2)], ids=["fsdp2", "cp2"])
def test_selective_recomputation_under_fsdp2_and_cp(shape):
    spawn(_selective_recompute_worker, 2, shape)


# ----------------------------------------------------------------------------------------------------------
# FSDP2 (+ CP): three sCM steps equal one process with the same global batch

def _reference_scm_run(cfg: ExperimentCfg, teacher: TrigFlowDenoiser, dp: int, steps: int):
    """One process, global batch = the dp groups' batches, with distill._student_step's draws (mode scm)."""
    state = build_state(cfg, teacher)
    d = cfg.distill
    for it in range(steps):
        state.opt_student.zero_grad(set_to_none=True)
        for r in range(dp):
            b = sample_batch(it * 10 + r)
            g = step_generator(cfg.train.seed, r, it, torch.device("cpu"))
            t = sample_p_G(len(b), mean=d.p_G_mean, std=d.p_G_std, frames=LATENT[1], frame_shift=d.p_G_frame_shift,
                           generator=g)
            eps = torch.randn(b.latent.shape, generator=g, dtype=b.latent.dtype)
            out = scm_loss(state.student, state.teacher, b.latent, b.label, t=t, eps=eps,
                           guidance=cfg.teacher.guidance, r=1.0, scale=d.scm_loss_scale, norm_c=d.tangent_norm_c)
            (out.loss / dp).backward()
        for group in state.opt_student.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(state.student_iter, cfg.optim.lr_warmup)
        state.opt_student.step()
        state.ema.update(state.student)
        state.student_iter += 1
    return state


def reference_params(state) -> dict[str, list[torch.Tensor]]:
    return {"student": [p.detach() for p in state.student.parameters()],
            "ema": [p.detach() for p in state.ema.module.parameters()]}


def _fsdp_worker(shape: MeshShape, steps: int, ref: dict[str, list[torch.Tensor]], fused: bool = False) -> None:
    cfg = tiny_cfg(steps)
    mesh = build_mesh(shape, num_heads=HEADS, num_tokens=TOKENS)
    state = parallelize_state(build_state(cfg, tiny_denoiser(1)), mesh)
    assert all(isinstance(p, DTensor) for p in state.student.parameters())
    if fused:   # what `distill.adamw_kernel` gives a GPU run; PyTorch's fused AdamW runs on the CPU too
        for opt in (o for o in (state.opt_student, state.opt_fake) if o is not None):
            for group in opt.param_groups:
                group["fused"] = True

    # The sCM tangent through the sharded student (torch.func.jvp over FSDP2) equals the plain one.
    plain, b = tiny_denoiser(1), sample_batch(mesh.dp_rank)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    F_T = plain.F(b.latent, t, b.label)
    F_ref, T_ref = scm_tangent_jvp(plain, b.latent, t, b.label, F_T)
    F_sh, T_sh = scm_tangent_jvp(state.student, b.latent, t, b.label, F_T)
    assert_close(F_sh, F_ref, "F under jvp (FSDP)")
    assert_close(T_sh, T_ref, "JVP tangent (FSDP)")
    initial = {n: full(p).clone() for n, p in state.student.named_parameters()}
    for it in range(steps):
        g = step_generator(cfg.train.seed, mesh.dp_rank, it, torch.device("cpu"))
        distill_step(state, sample_batch(it * 10 + mesh.dp_rank), cfg, g)
    moved = max((full(p) - initial[n]).abs().max().item() for n, p in state.student.named_parameters())
    assert moved > 1e-4, "parameters did not move; the comparison would be vacuous"
    # Adam divides by √v, which amplifies round-off in near-zero gradients: 1e-9 absolute on O(0.1) weights.
    for (name, p), p_ref in zip(state.student.named_parameters(), ref["student"]):
        torch.testing.assert_close(full(p).detach(), p_ref, atol=1e-9, rtol=1e-7,
                                   msg=lambda m, name=name: f"{name} after {steps} steps: {m}")
    for p, p_ref in zip(state.ema.module.parameters(), ref["ema"]):
        torch.testing.assert_close(full(p), p_ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("world,shape", [(2, MeshShape(1, 2, 1)), (4, MeshShape(1, 2, 2))],
                         ids=["fsdp2", "fsdp2xcp2"])
def test_fsdp_three_steps_match_single_process(world, shape):
    spawn(_fsdp_worker, world, shape, 3, fsdp_reference(shape.data_parallel_size))


def test_fused_adamw_steps_fsdp2_parameters_as_the_plain_run():
    """A GPU run's AdamW is fused (rcm_core.method.distill.adamw_kernel), and under FSDP2 it steps DTensor shards:
    the same three steps, fused on the shards, match the single-process run (PyTorch's CPU default) within the
    bars above."""
    shape = MeshShape(1, 2, 1)
    spawn(_fsdp_worker, 2, shape, 3, fsdp_reference(shape.data_parallel_size), True)


def _nonfinite_worker() -> None:
    mesh = build_mesh(MeshShape(1, 2, 1), num_heads=HEADS, num_tokens=TOKENS)
    state = parallelize_state(build_state(tiny_cfg(), tiny_denoiser(1)), mesh)
    b = sample_batch(mesh.dp_rank)
    state.student.F(b.latent, torch.tensor([0.3, 1.2], dtype=torch.float64), b.label).square().mean().backward()
    grads = [p.grad for p in state.student.parameters() if isinstance(p.grad, DTensor) and p.grad.to_local().numel()]
    assert grads
    if dist.get_rank() == 1:                     # a NaN in one rank's shard only
        grads[0].to_local().view(-1)[0] = float("nan")
    assert zero_nonfinite_grads(state.student) == 1          # both ranks: the global count, and no rank left waiting
    assert all(torch.isfinite(g.to_local()).all() for g in grads)
    assert zero_nonfinite_grads(state.student) == 0


def test_nonfinite_gradient_in_one_shard_is_zeroed_and_counted_on_every_rank():
    """FSDP2: the cheap check runs on each rank's shards and its answer is agreed, so both ranks enter the exact
    pass (whose count over DTensors is a collective) even though only rank 1 holds the NaN."""
    spawn(_nonfinite_worker, 2)


@functools.cache
def fsdp_reference(dp: int) -> dict[str, list[torch.Tensor]]:
    """Computed once, in the parent process, and handed to the forked workers."""
    return reference_params(_reference_scm_run(tiny_cfg(3), tiny_denoiser(1), dp, 3))


# ----------------------------------------------------------------------------------------------------------
# DCP: saved on 2 ranks (FSDP), loaded on 1 (plain modules) and on 4 (FSDP over 4)

def _rcm_cfg() -> ExperimentCfg:
    return from_dict({"model": TINY, "distill": {"mode": "rcm", "tangent_warmup": 1, "student_update_freq": 2,
                                                 "max_rollout_steps": 2},
                      "optim": {"lr": 1e-3, "fake_lr": 1e-3, "lr_warmup": 0}, "teacher": {"guidance": 3.0}})


def _expected(state) -> dict[str, torch.Tensor]:
    """Full tensors of everything a checkpoint restores, by name (AdamW moments included)."""
    out = {f"student.{n}": full(p).detach().clone() for n, p in state.student.named_parameters()}
    out |= {f"fake.{n}": full(p).detach().clone() for n, p in state.fake.named_parameters()}
    out |= {f"ema.{n}": full(p).detach().clone() for n, p in state.ema.module.named_parameters()}
    for name, p in state.student.named_parameters():
        out[f"opt.{name}.exp_avg_sq"] = full(state.opt_student.state[p]["exp_avg_sq"]).clone()
    return out


def _save_worker(directory: str) -> None:
    cfg = _rcm_cfg()
    mesh = build_mesh(MeshShape(1, 2, 1), num_heads=HEADS, num_tokens=TOKENS)
    state = parallelize_state(build_state(cfg, tiny_denoiser(1)), mesh)
    replicated = build_state(cfg, tiny_denoiser(1))          # the existing all-reduce data parallelism
    for it in range(3):                          # student (sCM), critic, student (sCM + DMD)
        for s in (state, replicated):
            distill_step(s, sample_batch(it * 10 + mesh.dp_rank), cfg,
                         step_generator(0, mesh.dp_rank, it, torch.device("cpu")))
    assert state.critic_iter == 1 and state.student_iter == 2
    # DMD and critic steps under FSDP equal the replicated path (same batches and draws per rank).
    for a, b in [(state.student, replicated.student), (state.fake, replicated.fake)]:
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(full(p).detach(), q.detach(), atol=1e-9, rtol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    save_distributed(state, Path(directory) / "ckpt", extra={"data_position": 3})
    expected = _expected(state)                  # collective (full_tensor), so on every rank
    if dist.get_rank() == 0:
        torch.save(expected, Path(directory) / "expected.pt")


def _check_loaded(directory: str, state, load=load_distributed) -> None:
    extra = load(state, Path(directory) / "ckpt")
    assert extra == {"data_position": 3}
    assert (state.iteration, state.student_iter, state.critic_iter, state.ema.num_updates) == (3, 2, 1, 2)
    expected = torch.load(Path(directory) / "expected.pt", weights_only=True)
    got = _expected(state)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _load_worker(directory: str) -> None:
    mesh = build_mesh(MeshShape(1, 4, 1), num_heads=HEADS, num_tokens=TOKENS)
    state = parallelize_state(build_state(_rcm_cfg(), tiny_denoiser(5)), mesh)   # other weights: must be overwritten
    # through the training loop's resume (which also re-applies this run's AdamW implementation to the shards)
    _check_loaded(directory, state, lambda st, d: _resume(st, d, mesh, torch.device("cpu")))
    distill_step(state, sample_batch(dist.get_rank()), _rcm_cfg(), step_generator(0, dist.get_rank(), 3,
                                                                                   torch.device("cpu")))


def test_checkpoint_saved_on_2_ranks_loads_on_1_and_4(tmp_path):
    spawn(_save_worker, 2, str(tmp_path))
    _check_loaded(str(tmp_path), build_state(_rcm_cfg(), tiny_denoiser(5)))       # this process, no group
    spawn(_load_worker, 4, str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# bf16 with Wan's fp32 islands (norm2, time path, modulation tables): FSDP2 needs one dtype per unit

def _bf16_worker() -> None:
    mesh = build_mesh(MeshShape(1, 2, 1), num_heads=HEADS, num_tokens=TOKENS)
    torch.manual_seed(0)
    plain = TrigFlowDenoiser(build_network(ModelCfg(**{**TINY, "dtype": "bfloat16"})))
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sharded = copy.deepcopy(plain)
    parallelize_network(sharded.net, mesh)
    assert {p.dtype for p in sharded.parameters()} == {torch.bfloat16, torch.float32}
    b = sample_batch(0)                          # the same samples on both ranks: the mean gradient is the plain one
    x, t = b.latent.float(), torch.tensor([0.3, 1.2], dtype=torch.float64)
    _, T_ref = scm_tangent_jvp(plain, x, t, b.label, x.double())
    _, T_sh = scm_tangent_jvp(sharded, x, t, b.label, x.double())
    torch.testing.assert_close(T_sh, T_ref, atol=0, rtol=0)   # same bf16 ops on gathered weights: bitwise
    for m in (plain, sharded):
        m.F(x, t, b.label).square().mean().backward()
    sync_gradients(sharded)                      # the replicated fp32 modulation tables
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        # bf16 gradients (different CPU matmul blocking on the gathered weights), reduced in fp32 by FSDP:
        # compared by norm, ‖Δ‖ ≤ 1e-2·‖g‖, about one bf16 rounding (2^-7).
        diff = (full(q.grad).float() - p.grad.float()).norm()
        assert diff <= 1e-2 * p.grad.float().norm() + 1e-6, f"{name}: ‖Δ‖={diff:.3g}, ‖g‖={p.grad.float().norm():.3g}"
    # Trained networks: fp32 masters in FSDP2, each unit gathered and computed in its built dtype. bf16 of the
    # fp32 copy of a bf16 value is that value, so the JVP pass is bitwise the bf16 module's; gradients arrive
    # in fp32 (reduce-scattered) and agree by norm as above.
    master = copy.deepcopy(plain)
    parallelize_network(master.net, mesh, master_dtype=torch.float32)
    assert {p.dtype for p in master.parameters()} == {torch.float32}
    assert master.net_dtype == torch.bfloat16
    _, T_m = scm_tangent_jvp(master, x, t, b.label, x.double())
    torch.testing.assert_close(T_m, T_ref, atol=0, rtol=0)
    master.F(x, t, b.label).square().mean().backward()
    sync_gradients(master)
    for (name, p), q in zip(plain.named_parameters(), master.parameters()):
        assert q.grad.dtype == torch.float32, name
        diff = (full(q.grad) - p.grad.float()).norm()
        assert diff <= 1e-2 * p.grad.float().norm() + 1e-6, f"{name} (fp32 masters): ‖Δ‖={diff:.3g}"


def test_fsdp_bf16_with_fp32_islands():
    spawn(_bf16_worker, 2)
