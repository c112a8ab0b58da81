"""Parallelism for the rCM step, applied from outside the model (torchtitan's parallelize.py pattern).

    .venv/bin/python -m pytest tests/test_parallel.py -q          # gloo, 1/2/4 CPU processes, 2-3.5 min
    .venv/bin/python -m pytest tests/test_parallel_ray.py -q      # the same through Ray Train, 2 workers

In a training loop (every rank; the process group already initialised, e.g. by Ray Train):

    shape = mesh.shape_from_config(cfg.parallel, world_size())
    m = mesh.build_mesh(shape, device_type=device.type, num_heads=cfg.model.num_heads,
                        num_tokens=mesh.latent_tokens(latent_shape, cfg.model.patch_size))
    state = parallelize_state(build_state(cfg, teacher), m)
    g = step_generator(seed, m.dp_rank, iteration, device)   # dp_rank, not rank: a CP group draws alike
    distill_step(state, batch_of_dp_group, cfg, g)           # sync_gradients inside skips FSDP's DTensors
    dcp.save_distributed(state, folder, extra)               # every rank; rank-0 torch.save can't hold shards

Three mechanisms, picked by the mesh (`rcm_core.parallel.mesh`):
- Replicated data parallelism (dp_shard = 1): every rank holds full modules, runs the whole step on its
  samples, and `sync_gradients` averages .grad after backward: one flattened all-reduce per dtype, what
  DDP does at the end of its bucketing. No DDP wrapper, because an iteration runs several forwards
  (sCM F_θ, the JVP pass, the DMD rollout) and a backward per loss term, and the JVP must see a plain module.
- FSDP2 (dp_shard > 1): `fully_shard` on every transformer block, then on the network root, over the
  dp_shard × cp ranks (× dp_replicate for HSDP), with gradient reduction in ≥ fp32. Student, fake score
  and EMA are sharded; the frozen teacher too, for memory.
- Ulysses context parallelism (cp > 1): `rcm_core.parallel.context`.

The JVP pass under FSDP2 (rcm_method.md §5.4). rCM's official code rewrites every layer into a "JVP mode"
that carries (x, ẋ) through each block, because `torch.func.jvp` cannot be applied over FSDP modules. Measured
here: on the CPU wheel (torch 2.13, gloo) whole-model `torch.func.jvp` over FSDP2 runs, but on torch 2.11 +
CUDA (2× H200, NCCL) it fails in FSDP2's pre-forward all-gather ("Cannot access storage of TensorWrapper"),
while `torch.autograd.forward_ad` dual tensors through the same sharded model run with the tangent equal to
the unsharded one (max error 0; shared/reference/gpu_multi.md). So `losses.jvp` uses dual tensors, under
no_grad, with tangents on the inputs (x_t, t) only, on every mesh and on one process alike. FSDP2's
pre-forward hook of each block all-gathers the parameters into ordinary tensors (no tangent: parameters are
constants of the JVP), the post-forward hook frees them, and no post-backward hooks are registered because
grad is off: the JVP runs block by block on unsharded parameters, the layer-wise scheme without a second
network definition. tests/test_parallel.py checks the tangent against one process in float64 (gloo);
tests/test_parallel_gpu.py on 2 GPUs (NCCL).

Mixed precision: trained networks (student, fake score) keep fp32 masters and optimiser state. Under FSDP2
the sharded parameters are fp32 and each unit computes in the dtype it was built with (`shard_network`,
MixedPrecisionPolicy: bf16 all-gathers and compute, fp32 gradient reduce-scatter); without FSDP,
`rcm_core.parallel.precision.MasterWeightOptimizer` does the same arithmetic on one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rcm_core.parallel.context import apply_context_parallel
from rcm_core.parallel.mesh import Mesh
from rcm_core.parallel.precision import MasterWeightOptimizer


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _replicated(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that are plain tensors; FSDP's (DTensors) are reduced by FSDP itself."""
    return [p for p in module.parameters() if not isinstance(p, DTensor)]


def grads_may_be_nonfinite(grads: list[torch.Tensor]) -> bool:
    """False when every entry of every gradient is finite, decided by one multi-tensor norm and one host sync per
    call (the caller's exact per-tensor pass costs a sync per tensor, ~825 at Wan2.1-1.3B: issue 28). A NaN or Inf
    entry makes the norm non-finite, so a finite norm proves them all finite; a norm that overflows on finite
    entries answers True, and the exact pass then finds nothing. FSDP2 shards are checked locally and the answer
    agreed over all ranks, so every rank takes the same path (the exact pass holds collectives on DTensors)."""
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    suspect = (~torch.isfinite(torch.nn.utils.get_total_norm(local))).to(torch.int32)
    if world_size() > 1:
        dist.all_reduce(suspect, op=dist.ReduceOp.MAX)
    return bool(suspect)


def zero_nonfinite_entries(grads: list[torch.Tensor]) -> int:
    """Zero every NaN/Inf entry in place and return how many there were, over all ranks for FSDP2 shards (each
    DTensor's count is a collective, so every rank must call this together). The zeroing is done on each rank's
    local shard: DTensor refuses an in-place masked write that keeps its sharding (index_put_)."""
    bad = 0
    for g in grads:
        n = (~torch.isfinite(g)).sum()
        n = int(n.full_tensor() if isinstance(n, DTensor) else n)     # int() of a DTensor reads the local part
        if n:
            bad += n
            torch.nan_to_num_(g.to_local() if isinstance(g, DTensor) else g, nan=0.0, posinf=0.0, neginf=0.0)
    return bad


def sync_gradients(module: nn.Module) -> None:
    """Average .grad of the replicated parameters over all ranks (no-op on one process). Missing grads count
    as zeros. One flattened all-reduce per gradient dtype, summed in at least fp32 (a bf16 Wan keeps fp32
    islands, and bf16 sums of many ranks lose bits). FSDP-sharded parameters are skipped: their gradients
    are already reduce-scattered.

    With context parallelism this mean over all ranks is still right: each CP rank holds cp × its share of
    the gradient (rcm_core.parallel.context), so the mean over a CP group is the sum of the shares."""
    n = world_size()
    params = [p for p in _replicated(module) if p.requires_grad]
    if n == 1 or not params:
        return
    for dtype in sorted({p.dtype for p in params}, key=str):
        group = [p for p in params if p.dtype == dtype]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(torch.promote_types(dtype, torch.float32))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for p, g in zip(group, grads):
            k = g.numel()
            p.grad = flat[offset:offset + k].view_as(g).to(dtype).clone()
            offset += k


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s weights (replicated tensors only; call it before sharding)."""
    if world_size() == 1:
        return
    for t in _replicated(module) + [b for b in module.buffers() if not isinstance(b, DTensor)]:
        dist.broadcast(t.data, src=src)


# ----------------------------------------------------------------------------------------------------------
# FSDP2

def mixed_precision(param_dtype: torch.dtype | None, stored_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (None = the stored dtype), reduce gradients in at least fp32 (float64 stays
    float64, so the float64 equality tests stay exact). Forward inputs are never cast: a block receives the
    fp32 modulation `e0` and RoPE tables beside its bf16 tokens, and the network casts what it computes on."""
    compute = param_dtype or stored_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.promote_types(compute, torch.float32),
                                cast_forward_inputs=False)


def _majority_dtype(params: list[nn.Parameter], dtype_of) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for p in params:
        counts[dtype_of(p)] = counts.get(dtype_of(p), 0) + p.numel()
    return max(counts, key=counts.get)


def _policy(compute: torch.dtype, stored: torch.dtype) -> MixedPrecisionPolicy:
    return mixed_precision(None if compute == stored else compute, stored)


def _shard_unit(unit: nn.Module, mesh: DeviceMesh, reshard: bool, compute_of) -> None:
    """fully_shard `unit`, first splitting off parameters of a minority compute dtype.

    FSDP2 all-gathers one flat buffer per unit in one dtype, but a bf16 Wan block computes `norm2` and
    `scale_shift_table` in fp32 (networks/dit.py KEEP_FP32). Submodules wholly of the other compute dtype
    become their own units; bare parameters of the other dtype (the modulation tables, 6·dim values) stay
    replicated as ignored parameters, whose gradients `sync_gradients` averages.
    """
    own = [p for p in unit.parameters() if not isinstance(p, DTensor)]
    if not own:
        return
    main = _majority_dtype(own, compute_of)
    for _, sub in unit.named_modules():
        params = [p for p in sub.parameters() if not isinstance(p, DTensor)]
        kinds = {compute_of(p) for p in params}
        if sub is not unit and params and main not in kinds and len(kinds) == 1:
            policy = _policy(kinds.pop(), _majority_dtype(params, lambda p: p.dtype))
            fully_shard(sub, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    ignored = {p for p in unit.parameters() if not isinstance(p, DTensor) and compute_of(p) != main}
    sharded = [p for p in own if p not in ignored and not isinstance(p, DTensor)]
    stored = _majority_dtype(sharded or own, lambda p: p.dtype)
    fully_shard(unit, mesh=mesh, mp_policy=_policy(main, stored), reshard_after_forward=reshard,
                ignored_params=ignored or None)


def shard_network(net: nn.Module, mesh: DeviceMesh, *, master_dtype: torch.dtype | None = None,
                  compute_dtypes: dict[str, torch.dtype] | None = None,
                  reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` each transformer block, then the root (embeddings, time path, head), in place.

    Per-block units keep the JVP pass block-wise: only one block's parameters are gathered at a time.
    Every parameter computes in the dtype it has when this is called (a bf16 Wan: bf16 trunk, fp32 islands).
    `master_dtype=torch.float32` (trained networks) stores the narrow ones in fp32 instead: FSDP2 then casts
    each gathered unit to its compute dtype, and gradients and AdamW state are fp32 (what FSDP users expect).
    `None` (the frozen teacher) stores them as they are. `compute_dtypes` (by parameter name) overrides the
    compute dtypes: the fp32 EMA is laid out like its bf16 student, so the two shard alike and the EMA update
    pairs shard with shard.
    """
    compute = {p: (compute_dtypes or {}).get(n, p.dtype) for n, p in net.named_parameters()}
    if compute_dtypes is not None:
        net.compute_dtype = _majority_dtype(list(net.parameters()), compute.__getitem__)
    if master_dtype is not None:
        with torch.no_grad():
            for p in net.parameters():
                if p.is_floating_point() and torch.finfo(p.dtype).bits < torch.finfo(master_dtype).bits:
                    p.data = p.data.to(master_dtype)
        # The denoiser casts its inputs to this, not to the fp32 storage (rcm_core.method.denoiser.net_dtype).
        net.compute_dtype = _majority_dtype(list(net.parameters()), compute.__getitem__)

    def compute_of(p):  # parameters are looked up before fully_shard replaces them (DTensors are skipped)
        return compute[p]

    for block in net.blocks:
        _shard_unit(block, mesh, reshard_after_forward, compute_of)
    _shard_unit(net, mesh, reshard_after_forward, compute_of)
    return net


def _has_narrow(module: nn.Module) -> bool:
    return any(p.is_floating_point() and torch.finfo(p.dtype).bits < 32 for p in module.parameters())


def shard_mesh(mesh: Mesh, narrow: bool) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: dp_shard·cp ranks when dp_shard > 1; for a bf16 model with context
    parallelism alone, the CP ranks (× replicas as HSDP), because fp32 masters then live in FSDP2 (the
    official rCM runs shard over their CP ranks too); else None (no FSDP: rcm_core.parallel.precision's masters)."""
    if mesh.fsdp_mesh is not None or not narrow or mesh.cp_group is None:
        return mesh.fsdp_mesh
    return mesh.device_mesh["dp_replicate", "cp"] if mesh.shape.dp_replicate > 1 else mesh.device_mesh["cp"]


def parallelize_network(net: nn.Module, mesh: Mesh, *, context_parallel: bool = True,
                        master_dtype: torch.dtype | None = None) -> nn.Module:
    """CP hooks first (they only touch attention), then FSDP; torchtitan's order (TP → AC → compile → FSDP).
    `master_dtype`: see `shard_network` (fp32 for trained networks, None for the frozen teacher)."""
    if context_parallel and mesh.cp_group is not None:
        apply_context_parallel(net, mesh.cp_group)
    fsdp = shard_mesh(mesh, _has_narrow(net))
    if fsdp is not None:
        shard_network(net, fsdp, master_dtype=master_dtype)
    return net


def _rebuild_optimizer(opt, module: nn.Module) -> torch.optim.Optimizer:
    """fully_shard replaces parameters by DTensor ones, so an optimiser built earlier points at dead tensors:
    swap them in place, group by group, in `module.parameters()` order (which fully_shard preserves). A
    `MasterWeightOptimizer` is unwrapped: under FSDP2 the sharded parameters are the fp32 masters."""
    if isinstance(opt, MasterWeightOptimizer):
        opt = opt.inner
    if opt.state:
        raise RuntimeError("parallelize the state before the first optimiser step (its moments would be lost)")
    new = list(module.parameters())
    if sum(len(g["params"]) for g in opt.param_groups) != len(new):
        raise RuntimeError("the optimiser does not hold exactly the module's parameters; build it after sharding")
    offset, groups = 0, []
    for group in opt.param_groups:
        n = len(group["params"])
        params, offset = new[offset:offset + n], offset + n
        # AdamW's multi-tensor kernels run per group and refuse DTensors and plain tensors together: the
        # replicated fp32 islands (ignored by FSDP2) get a group of their own, same hyper-parameters.
        for kind in (True, False):
            part = [p for p in params if isinstance(p, DTensor) == kind]
            if part:
                groups.append({**group, "params": part})
    opt.param_groups = groups
    return opt


def parallelize_state(state, mesh: Mesh, *, broadcast: bool = True):
    """Apply the mesh to a fresh `DistillState` (from `distill.build_state`) in place and return it.

    Teacher, student and fake score get CP and FSDP; the EMA gets FSDP only (memory), no CP: it is only
    evaluated, and CP would make evaluation a collective. Student and fake score keep fp32 masters under
    FSDP2 (`shard_network(master_dtype=fp32)`); the frozen teacher stays as loaded. NOTE: with FSDP every
    rank must take part in any forward of a sharded module, evaluation included (rank-0-only evaluation
    would hang in the all-gather).
    """
    trained = [state.student] + ([state.fake] if state.fake is not None else [])
    narrow = _has_narrow(state.student)
    layout = {n: p.dtype for n, p in state.student.net.named_parameters()}      # before masters replace it
    if broadcast:
        for m in [state.teacher] + trained + [state.ema.module]:
            broadcast_parameters(m)
    parallelize_network(state.teacher.net, mesh)
    for m in trained:
        parallelize_network(m.net, mesh, master_dtype=torch.float32)
    fsdp = shard_mesh(mesh, narrow)
    if fsdp is not None:
        shard_network(state.ema.module.net, fsdp, compute_dtypes=layout if narrow else None)
        state.opt_student = _rebuild_optimizer(state.opt_student, state.student)
        if state.fake is not None:
            state.opt_fake = _rebuild_optimizer(state.opt_fake, state.fake)
    return state


# ----------------------------------------------------------------------------------------------------------
# What the training loop needs from the mesh

def run_shape(parallel, world: int | None = None):
    """The mesh shape `cfg.parallel` asks for on this many ranks (default: the process group's size)."""
    from rcm_core.parallel.mesh import shape_from_config
    return shape_from_config(parallel, world_size() if world is None else world)


def is_collective(parallel, world: int | None = None) -> bool:
    """True when modules are sharded (FSDP) or split (CP): then every forward is a collective, so every rank
    must run evaluation and checkpointing, not only rank 0."""
    world = world_size() if world is None else world
    if world == 1:
        return False
    shape = run_shape(parallel, world)
    return shape.dp_shard > 1 or shape.cp > 1


def mesh_for_run(cfg, latent_shape: tuple[int, ...] | None, device: torch.device) -> Mesh | None:
    """Build the run's mesh from `cfg.parallel`, checked against the model and the latent token count.

    None for plain replicated data parallelism (and on one process): the loop then keeps the global rank as
    the data-parallel rank and `sync_gradients` does all the communication."""
    from rcm_core.parallel.mesh import build_mesh, latent_tokens

    if not is_collective(cfg.parallel):
        return None
    dit = cfg.model.kind == "dit"
    tokens = latent_tokens(tuple(latent_shape), tuple(cfg.model.patch_size)) if dit and latent_shape else None
    if cfg.model.causal and latent_shape:
        check_causal_cp(cfg, tuple(latent_shape), run_shape(cfg.parallel).cp)
    return build_mesh(run_shape(cfg.parallel), device_type=device.type,
                      num_heads=cfg.model.num_heads if dit else 1, num_tokens=tokens)


def causal_cp_sizes(cfg, latent_shape: tuple[int, ...]) -> list[int]:
    """Ulysses CP sizes a block-causal run (Causal rCM) can use on latents [C, T, H, W].

    After the all-to-all every rank holds the whole sequence for its heads, so the block-causal and teacher-forcing
    masks and the KV cache need nothing across ranks: any cp that divides the heads works for attention. Two
    other splits must be even: (1) streamed rollouts (sf_dmd) and evaluation forward one chunk at a time, so cp
    must divide the tokens of a chunk (first_chunk_t and chunk_t latent frames); (2) per-frame times (tf, tf_dcm,
    tf_scm pack [context | noisy] = 2T frames; df has T) modulate whole frames, so cp must divide those frames.
    """
    m, mode = cfg.model, cfg.distill.mode
    T, H, W = latent_shape[-3:]
    frame_tokens = (H // m.patch_size[1]) * (W // m.patch_size[2])
    splits = [m.num_heads, m.first_chunk_t * frame_tokens, m.chunk_t * frame_tokens]
    splits += {"df": [T], "tf": [2 * T], "tf_dcm": [2 * T], "tf_scm": [2 * T]}.get(mode, [])
    return [c for c in range(1, m.num_heads + 1) if all(n % c == 0 for n in splits)]


def check_causal_cp(cfg, latent_shape: tuple[int, ...], cp: int) -> None:
    """One-line refusal of a cp that cannot split a block-causal run (see `causal_cp_sizes`)."""
    legal = causal_cp_sizes(cfg, latent_shape)
    if cp not in legal:
        raise ValueError(f"parallel.cp={cp} cannot split block-causal {cfg.distill.mode} on latents "
                         f"{list(latent_shape)}: cp must divide the heads, the tokens of one chunk and (tf, tf_dcm, "
                         f"tf_scm, df) the frames of a per-frame-time forward; legal cp: {legal}")


def share_batch(batch, mesh: Mesh | None, device: torch.device):
    """Ranks of one CP group train on the same samples: only the group's first rank reads (one reader per
    group, rcm_core.parallel.mesh's rank layout puts it at dp_rank·cp) and sends its batch to the others."""
    if mesh is None or mesh.cp_group is None:
        return batch
    box = [batch.to(torch.device("cpu")) if batch is not None else None]
    leader = mesh.dp_rank * mesh.shape.cp
    dist.broadcast_object_list(box, src=leader, group=mesh.cp_group,
                               device=device if device.type == "cuda" else None)
    if box[0] is None:
        raise RuntimeError(f"the reader of context-parallel group {mesh.dp_rank} (rank {leader}) had no batch")
    return box[0]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Plain CPU tensors of a (possibly FSDP-sharded) module. Collective when sharded: call on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
