"""Block-causal attention for the DiT: chunks of latent frames, the teacher-forcing packing, and the KV cache.

    .venv/bin/python -m pytest tests/test_causal.py -q

Causal rCM (NVlabs/rcm `Causal_rCM.md`) splits the T latent frames into chunks [first_chunk_t | chunk_t | chunk_t
| …]; every token of chunk i attends to the tokens of chunks 0..i (block-causal: full attention inside a chunk).
One network serves both patterns: `WanDiT` takes an `attention layout` per forward, and nothing here has weights,
so the same Wan checkpoints load into a causal network. Three layouts, each run on whole sequences of q/k/v
[B, heads, L, head_dim] (under Ulysses context parallelism, after the all-to-all, so they need no cross-rank
logic):

- `BlockCausal(chunk_tokens)`: one sequence, chunk i attends to chunks ≤ i (diffusion forcing, and a full
  forward that the cached chunk-by-chunk inference must equal).
- `TeacherForcing(chunk_tokens)`: the packed sequence [context | noisy] of two copies of the same chunks. Context
  chunk i attends to context chunks ≤ i; noisy chunk i attends to context chunks < i and to itself. This is what
  inference sees when the clean (t = 0) context is re-encoded into the cache after each chunk, trained in one
  forward (teacher forcing, and the teacher-forcing consistency modes).
- `Cached(cache, append)`: one chunk's queries against the cached keys/values of the chunks before it plus its own;
  `append` stores its own keys/values for the chunks after it (streaming inference, self-forcing rollouts).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import kernels


@dataclass(frozen=True)
class ChunkPattern:
    """Latent frames grouped as [first_chunk_t | chunk_t | chunk_t | …] (official `BlockPattern`)."""
    first_chunk_t: int
    chunk_t: int

    def __post_init__(self):
        if self.first_chunk_t < 1 or self.chunk_t < 1:
            raise ValueError(f"chunk pattern first_chunk_t={self.first_chunk_t}, chunk_t={self.chunk_t}: both must be "
                             f"≥ 1 latent frame (official presets: 1-1, 3-3, 1-4)")

    def chunk_frames(self, frames: int) -> list[int]:
        """Latent frames per chunk for a video of `frames` latent frames."""
        rest = frames - self.first_chunk_t
        if rest < 0 or rest % self.chunk_t:
            raise ValueError(f"{frames} latent frames do not split into chunks [{self.first_chunk_t} | "
                             f"{self.chunk_t} | …]: need frames = first_chunk_t + k·chunk_t")
        return [self.first_chunk_t] + [self.chunk_t] * (rest // self.chunk_t)

    def chunk_spans(self, frames: int) -> list[tuple[int, int]]:
        """(first frame, end frame) of each chunk."""
        spans, start = [], 0
        for n in self.chunk_frames(frames):
            spans.append((start, start + n))
            start += n
        return spans


class KVCache:
    """Keys and values of the chunks generated so far, one entry per transformer block, post-RoPE, laid out like
    the attention sees them ([B, heads, L, head_dim]; under Ulysses context parallelism each rank keeps its heads).

    Entries hold no autograd history: a cached chunk is context, never differentiated through (the official
    self-forcing rollout detaches its cache too); `differentiable=True` keeps it (a teacher-forcing loss computed
    chunk by chunk then has the packed forward's gradient, which flows into the context's keys and values).
    `frames` counts the latent-token frames cached, which is where the next chunk's RoPE positions start.
    """

    def __init__(self, differentiable: bool = False) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.frames = 0
        self.differentiable = differentiable

    def __len__(self) -> int:
        return 0 if not self.keys else next(iter(self.keys.values())).shape[2]

    def read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys/values of `layer` followed by the current chunk's `k`, `v`."""
        if layer not in self.keys:
            return k, v
        return torch.cat([self.keys[layer].to(k.dtype), k], dim=2), torch.cat([self.values[layer].to(v.dtype), v], dim=2)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        keep = (lambda t: t) if self.differentiable else torch.Tensor.detach
        self.keys[layer], self.values[layer] = keep(k), keep(v)

    def prefix(self, frames: int) -> KVCache:
        """A read-only view of the first `frames` cached frames (a self-forcing replay of chunk i reads the context
        of chunks < i from the cache of the whole rollout)."""
        if frames > self.frames:
            raise ValueError(f"the cache holds {self.frames} frames; cannot take a prefix of {frames}")
        view = KVCache()
        view.frames = frames
        n = len(self) * frames // max(self.frames, 1)                   # every frame has the same token count
        view.keys = {i: k[:, :, :n] for i, k in self.keys.items()}
        view.values = {i: v[:, :, :n] for i, v in self.values.items()}
        return view


@dataclass(frozen=True)
class BlockCausal:
    """One sequence of chunks of `chunk_tokens` tokens; chunk i attends to chunks 0..i."""
    chunk_tokens: tuple[int, ...]


@dataclass(frozen=True)
class TeacherForcing:
    """The packed sequence [context chunks | noisy chunks], both of `chunk_tokens` tokens per chunk."""
    chunk_tokens: tuple[int, ...]


@dataclass
class Cached:
    """One chunk against the cache; `append` stores the chunk's keys/values for the chunks after it."""
    cache: KVCache
    append: bool = False


Layout = BlockCausal | TeacherForcing | Cached | None


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout = None,
                   layer: int = 0, primal: str = "fused") -> torch.Tensor:
    """Self-attention of whole sequences q, k, v [B, heads, L, head_dim] under `layout` (None = full); `layer`
    picks the block's entry of a cache. Every case is a `kernels.attention` call (Triton on GPU, differentiable
    in both modes), so the JVP of sCM and the backward go through all three layouts. `primal` (model.attention)
    goes to every call; kernels.attention keeps block-causal calls (chunk_sizes) on the fused kernel."""
    attention, kind = functools.partial(kernels.attention, primal=primal), layout
    if kind is None:
        return attention(q, k, v)
    if isinstance(kind, BlockCausal):
        return attention(q, k, v, chunk_sizes=kind.chunk_tokens)
    if isinstance(kind, TeacherForcing):
        return _teacher_forcing_attention(q, k, v, kind.chunk_tokens, attention)
    if isinstance(kind, Cached):
        keys, values = kind.cache.read(layer, k, v)
        if kind.append:
            kind.cache.write(layer, keys, values)
        return attention(q, keys, values)
    raise TypeError(f"unknown attention layout {kind!r}")


def _teacher_forcing_attention(q, k, v, chunk_tokens: tuple[int, ...], attention) -> torch.Tensor:
    """Context half: block-causal over itself. Noisy chunk i: [context chunks < i ; noisy chunk i], one call per
    chunk, exactly the keys a cached chunk sees after the clean context of chunks < i was appended."""
    n = sum(chunk_tokens)
    if q.shape[2] != 2 * n:
        raise ValueError(f"teacher forcing packs [context | noisy] = 2·{n} tokens, got a sequence of {q.shape[2]}")
    qc, qn = q[:, :, :n], q[:, :, n:]
    kc, kn = k[:, :, :n], k[:, :, n:]
    vc, vn = v[:, :, :n], v[:, :, n:]
    out = [attention(qc, kc, vc, chunk_sizes=tuple(chunk_tokens))]
    start = 0
    for size in chunk_tokens:
        end = start + size
        keys = torch.cat([kc[:, :, :start], kn[:, :, start:end]], dim=2)
        values = torch.cat([vc[:, :, :start], vn[:, :, start:end]], dim=2)
        out.append(attention(qn[:, :, start:end], keys, values))
        start = end
    return torch.cat(out, dim=2)
