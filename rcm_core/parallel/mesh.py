"""The device mesh of a run: data-parallel replicate × FSDP shard × context-parallel (cp innermost).

    .venv/bin/python -m pytest tests/test_parallel.py -q -k mesh

Rank layout (row-major, like torchtitan): rank = (r·dp_shard + s)·cp + c, so a CP group is a run of
consecutive ranks (one node, fast links) and FSDP shards over dp_shard × cp ("dp_shard_cp"): CP ranks hold
different token slices of the same samples, so their gradients are reduced together with the shards'.

Choosing sizes: cp must divide gcd(num_heads, latent tokens). For Wan2.1 480p × 81 frames (32,760 tokens):
1.3B (12 heads) allows cp ∈ {1, 2, 3, 4, 6, 12}, 14B (40 heads) cp ∈ {1, 2, 4, 5, 8, 10, 20, 40}. The official
rCM runs used FSDP shard 4 and cp 1 for 1.3B, FSDP shard 32 and cp 8 (code) / 10 (paper) for 14B
(rcm_method.md §6); dp_replicate then covers the remaining nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIM_NAMES = ("dp_replicate", "dp_shard", "cp")


@dataclass(frozen=True)
class MeshShape:
    dp_replicate: int = 1   # full replicas (HSDP outer dimension); gradients all-reduced across them
    dp_shard: int = 1       # FSDP: parameters, gradients and optimiser state sharded over dp_shard × cp
    cp: int = 1             # Ulysses context parallelism: tokens split, one sample set per group

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def data_parallel_size(self) -> int:
        """How many different sample sets one iteration sees (CP ranks share theirs)."""
        return self.dp_replicate * self.dp_shard


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def legal_cp_sizes(num_heads: int, num_tokens: int | None = None) -> list[int]:
    """CP sizes that split both the heads (Ulysses all-to-all) and the latent token sequence evenly."""
    return _divisors(num_heads if num_tokens is None else math.gcd(num_heads, num_tokens))


def latent_tokens(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens of one latent [B, C, T, H, W] (or [C, T, H, W]) after patchify: the sequence CP splits."""
    T, H, W = latent_shape[-3:]
    pt, ph, pw = patch_size
    return (T // pt) * (H // ph) * (W // pw)


def resolve_shape(dp_replicate: int, dp_shard: int, cp: int, world_size: int) -> MeshShape:
    """One of dp_replicate / dp_shard may be -1: it takes whatever the world leaves (torchtitan's convention).
    The config default (dp_replicate=-1, dp_shard=1, cp=1) is plain replicated data parallelism."""
    if dp_replicate == -1 and dp_shard == -1:
        raise ValueError("only one of dp_replicate and dp_shard may be -1")
    if -1 in (dp_replicate, dp_shard):
        rest = cp * (dp_shard if dp_replicate == -1 else dp_replicate)
        if rest <= 0 or world_size % rest:
            raise ValueError(f"a -1 size needs the world size {world_size} divisible by the other sizes' product {rest}")
        dp_replicate, dp_shard = ((world_size // rest, dp_shard) if dp_replicate == -1
                                  else (dp_replicate, world_size // rest))
    return MeshShape(dp_replicate, dp_shard, cp)


def shape_from_config(parallel, world_size: int) -> MeshShape:
    """`ExperimentCfg.parallel` (ParallelCfg) → the MeshShape for `world_size` ranks."""
    return resolve_shape(parallel.dp_replicate, parallel.dp_shard, parallel.cp, world_size)


def legal_shapes(world_size: int, num_heads: int, num_tokens: int | None = None) -> list[MeshShape]:
    """Every (dp_replicate, dp_shard, cp) that fits `world_size` ranks and this model/latent."""
    cps = legal_cp_sizes(num_heads, num_tokens)
    return [MeshShape(r, world_size // (r * c), c) for c in cps if world_size % c == 0
            for r in _divisors(world_size // c)]


def check_shape(shape: MeshShape, *, world_size: int, num_heads: int, num_tokens: int | None = None) -> None:
    """Raise ValueError naming the legal choices if `shape` cannot run this model on `world_size` ranks."""
    problems = []
    if min(shape.dp_replicate, shape.dp_shard, shape.cp) < 1:
        problems.append("every size must be ≥ 1 (dp_shard may be -1 = the rest)")
    elif shape.world_size != world_size:
        problems.append(f"dp_replicate·dp_shard·cp = {shape.world_size} but there are {world_size} ranks")
    if shape.cp >= 1 and num_heads % shape.cp:
        problems.append(f"cp={shape.cp} does not divide model.num_heads={num_heads} (Ulysses splits heads)")
    if shape.cp >= 1 and num_tokens is not None and num_tokens % shape.cp:
        problems.append(f"cp={shape.cp} does not divide the {num_tokens} latent tokens (the sequence is split)")
    if problems:
        legal = ", ".join(f"(dp_replicate={s.dp_replicate}, dp_shard={s.dp_shard}, cp={s.cp})"
                          for s in legal_shapes(world_size, num_heads, num_tokens))
        raise ValueError(f"illegal parallel mesh {shape}: " + "; ".join(problems)
                         + f". Legal cp sizes: {legal_cp_sizes(num_heads, num_tokens)}; legal meshes for "
                           f"{world_size} ranks: {legal}")


@dataclass
class Mesh:
    """The process groups a run needs, built once from its shape."""
    shape: MeshShape
    device_mesh: DeviceMesh | None        # 3-D (dp_replicate, dp_shard, cp); None on one process
    fsdp_mesh: DeviceMesh | None          # (dp_replicate, dp_shard·cp) or 1-D (dp_shard·cp); None without FSDP
    cp_group: dist.ProcessGroup | None    # None when cp == 1

    @property
    def cp_rank(self) -> int:
        return 0 if self.cp_group is None else dist.get_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        """Index of this rank's sample set: seed data order, noise and times with it, not the global rank,
        so the ranks of one CP group draw the same numbers."""
        return (dist.get_rank() // self.shape.cp) if dist.is_initialized() else 0


def build_mesh(shape: MeshShape, *, device_type: str = "cpu", num_heads: int,
               num_tokens: int | None = None) -> Mesh:
    """Validate `shape` against the process group and the model, then create its meshes and groups."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_shape(shape, world_size=world, num_heads=num_heads, num_tokens=num_tokens)
    if world == 1:
        return Mesh(shape, None, None, None)
    mesh = init_device_mesh(device_type, (shape.dp_replicate, shape.dp_shard, shape.cp), mesh_dim_names=DIM_NAMES)
    fsdp_mesh = None
    if shape.dp_shard > 1:
        # cp is innermost, so flattening (dp_shard, cp) keeps each rank's coordinates; a second mesh over the
        # same ranks is simpler than DeviceMesh._flatten, a private API that has moved between releases.
        if shape.dp_replicate > 1:
            fsdp_mesh = init_device_mesh(device_type, (shape.dp_replicate, shape.dp_shard * shape.cp),
                                         mesh_dim_names=("dp_replicate", "dp_shard_cp"))
        else:
            fsdp_mesh = init_device_mesh(device_type, (shape.dp_shard * shape.cp,), mesh_dim_names=("dp_shard_cp",))
    cp_group = mesh["cp"].get_group() if shape.cp > 1 else None
    return Mesh(shape, mesh, fsdp_mesh, cp_group)
