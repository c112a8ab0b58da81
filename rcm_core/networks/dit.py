"""Video DiT with the module names and parameter shapes of diffusers' `WanTransformer3DModel` (Wan2.1 T2V).

    .venv/bin/python -m pytest tests/test_networks.py tests/test_wan_io.py -q

Because names and shapes mirror diffusers exactly, loading Wan2.1 weights is a plain key map
(`rcm_core.networks.wan_io`). Differences from Wan, all additive:
- `forward(x, timestep, cond, cond_mask=None)`: `cond` is a context [B, L, text_dim] or, when
  `num_classes > 0`, int64 labels [B] looked up in `label_embedding` [num_classes+1, label_tokens, text_dim]
  (row `num_classes` is the CFG null label). `cond_mask` (bool [B, L], True = attend) masks padded text
  keys; Wan itself zero-pads umT5 embeddings to 512 tokens and attends to the padding, which is what
  `cond_mask=None` reproduces.
- Class-conditional networks (`num_classes > 0`) also add a class embedding `condition_embedder.class_embedder`
  [num_classes+1, dim] to the time embedding, so the label drives the adaLN modulation of every block and of
  the head, as in the DiT paper (issue 32: through cross-attention alone a small DiT learns its class far too
  slowly; `ConditionEmbedder` gives the measurement). Text-conditioned networks have no such parameter: Wan
  checkpoints load, and compute, exactly as before.
- `negative_context` [L, text_dim] buffer: the unconditional context for text models (zeros until a stored
  negative-prompt embedding is set with `set_negative_context`).
- The time path (sinusoid, `time_embedder`, `time_proj`) and the adaLN modulation always compute in ≥ fp32,
  with autocast off, because sCM differentiates through time (rCM paper §4.2).
- All attention goes through `kernels.attention` ([B, heads, L, head_dim]) so the Triton JVP kernel is used
  on GPU; nothing here is data-dependent, so `torch.func.jvp` works through the whole network.
- Causal rCM (`model.causal`, `net.causal`): block-causal self-attention over chunks of latent frames
  [first_chunk_t | chunk_t | …], teacher-forcing packing (`tf_context=`), a KV cache for chunk-by-chunk inference
  (`cache=`, `append=`) and per-frame timesteps [B, T] (rcm_core.networks.causal). No weights are added, so one
  checkpoint runs either way.
- Two speed switches, both off by default and both leaving this one definition in charge (issue 28):
  `model.attention` (`set_attention`) sends attention calls without a tangent to PyTorch SDPA, and
  `model.compile: blocks` (`set_compile`) runs each block through one shared `torch.compile` graph, except
  when a forward-mode tangent is present: inductor returns dual tensors' primals without their tangents
  (measured on torch 2.13 CPU), so the JVP pass runs the blocks eager, and so does every forward under a
  causal layout (block-causal, teacher forcing, KV cache). `model.attention` applies to causal forwards too,
  except that block-causal calls (`chunk_sizes`) always keep the fused kernel (kernels.attention).
- Activation recomputation for the with-grad passes (`model.activation_checkpointing`, `set_recompute`): true
  checkpoints each whole block (its input kept, everything recomputed); `mm_only` / `attention_only` are selective
  (PyTorch's selective activation checkpoint: the outputs of the ops in `SAVED_OPS` are kept, the rest recomputed),
  applied inside the block's forward so FSDP2's per-block hooks stay outside the recomputed region, and inside
  the compiled graph under `model.compile: blocks` (inductor's partitioner then honours the policy).

Initialisation (for training from scratch; loaded weights overwrite it): Xavier-uniform linears with zero
bias (Wan), N(0, 0.02²) for the time/text embedders (Wan), N(0, 1) for the class embedding (issue 32), and
adaLN-zero (DiT): `time_proj` and every `scale_shift_table` start at zero so all gates are 0, the ungated
cross-attention output projection starts at zero, and `proj_out` starts at zero (Wan zero-inits its head
too). Each block is then exactly the identity and the network outputs 0 at step 0; gradients reach every
parameter from the second step on.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import kernels
from rcm_core.config import ModelCfg
from rcm_core.networks.causal import (
    BlockCausal,
    Cached,
    ChunkPattern,
    KVCache,
    Layout,
    TeacherForcing,
    self_attention,
)
from rcm_core.networks.layers import (
    FP32LayerNorm,
    Linear,
    RMSNorm,
    TimestepEmbedder,
    compute_dtype,
    linear_in,
    no_autocast,
    patch_grid,
    rope_angles,
    sinusoidal_embedding,
    unpatchify,
)
from rcm_core.networks.tangent_islands import (
    TangentFusedLayerNorm,
    gated_residual,
    gelu_tanh,
    modulated_norm,
    qk_heads,
)

# Modules whose parameters stay fp32 when the rest of the network is cast to bf16 (Wan keeps the time path,
# the modulation tables and the affine cross-attention norm in fp32; diffusers' `_keep_in_fp32_modules`).
KEEP_FP32 = ("condition_embedder.time_embedder", "condition_embedder.time_proj", "condition_embedder.class_embedder",
             "scale_shift_table", "norm2")


# The class path into adaLN (issue 32). Class-conditional checkpoints written before it have `label_embedding` but
# not this key: they must fail with one clear error, not load with a class embedding missing or made up.
CLASS_EMBEDDER_KEY = "condition_embedder.class_embedder.weight"


def check_label_path(keys, where: str) -> None:
    """Raise if the state-dict `keys` (any prefix) hold a class-conditional WanDiT saved before issue 32, whose
    labels reached the network only as cross-attention tokens: its weights were trained without the adaLN class
    embedding, so they cannot be completed, only retrained."""
    keys = set(keys)
    for key in keys:
        if key.endswith("label_embedding") and key.removesuffix("label_embedding") + CLASS_EMBEDDER_KEY not in keys:
            raise ValueError(f"{where}: a class-conditional DiT saved before labels drove adaLN (issue 32; no "
                             f"{key.removesuffix('label_embedding') + CLASS_EMBEDDER_KEY}); it cannot be loaded: "
                             "retrain it (delete the cached .cache/teachers/teacher-*.pt, or distill again in a new "
                             "train.run_dir)")


class TextProjection(nn.Module):
    """text_dim → dim → dim with tanh-GELU (diffusers `PixArtAlphaTextProjection`; Wan `text_embedding`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Time embedding temb [B, dim] and its 6-way modulation projection, plus the text projection; with
    `num_classes > 0` also a class embedding added to temb (the DiT paper's adaLN class conditioning)."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, num_classes: int = 0):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedder(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)
        if num_classes > 0:
            # Row num_classes is the CFG null label, as in `label_embedding`: dropping a label drops both paths.
            #
            # Why labels go into adaLN *beside* the cross-attention tokens (issue 32, CPU, tiny DiTs trained as
            # teachers by rcm_core.run.teacher):
            # - tokens alone learn the class far too slowly: on the 4-direction blob task (dim 64, 2,000
            #   steps) direction accuracy 0.23 (chance 0.25), loss gap true-vs-wrong label 2; with the class
            #   embedding added to temb, 0.99 and a gap of 200. On a speed-class task (a square moving at 0.5 or
            #   1.5 px/frame, dim 32, 2 layers, lr 2e-3, seed 0) the wrong-label loss gap after 800 steps is
            #   4.8 for tokens alone, 9.5 for tokens + adaLN, 11.2 for adaLN alone (loss 46-47 each).
            # - tokens + adaLN vs adaLN alone: no difference we can measure. tests/test_class_following.py's task
            #   (1,000 steps, seeds 0 and 1, 64 samples) reads back 0.938 / 0.969 and 0.969 / 0.969 (tokens alone
            #   0.953 / 0.953 there: that task is easy); 1.000 for all with guidance 2.
            # So both are kept: it is the configuration the issue measured at 0.99, the per-class token sequence
            # stays readable by attention, and `model.label_tokens` and every config keep their meaning (adaLN
            # alone would leave cross-attention attending to a constant token).
            self.class_embedder = nn.Embedding(num_classes + 1, dim)

    def time(self, timestep: torch.Tensor,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] (and labels [B] of a class-conditional model) → (temb [B, dim], e0 [B, 6, dim]), both
        in ≥ fp32 (Wan runs this under fp32 autocast). temb = time embedding + class embedding (DiT: c = t + y),
        so the label modulates every block's shift/scale/gate and the output head."""
        dt = compute_dtype(self.time_embedder.linear_1.weight.dtype)
        with no_autocast(timestep.device):
            temb = self.time_embedder(sinusoidal_embedding(timestep.to(dt), self.freq_dim))
            if labels is not None:
                # Through the module's forward, not `.weight[labels]`: FSDP2 gathers a unit's weights in its hooks.
                temb = temb + self.class_embedder(labels).to(dt)
            e0 = linear_in(self.time_proj, F.silu(temb))
        return temb, e0.unflatten(1, (6, -1))


class WanAttention(nn.Module):
    """Multi-head attention with QK RMSNorm across heads; self-attention takes RoPE, cross-attention a mask."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        # Slot 1 is diffusers' Dropout; an Identity keeps the parameter name `to_out.0`.
        self.to_out = nn.ModuleList([Linear(dim, dim), nn.Identity()])
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        # Optional replacement op: in self-attention called as `fn(q, k, v, attend=..., primal=...)`, `attend` being
        # `causal.self_attention` bound to this forward's layout; in cross-attention like `kernels.attention`.
        # rcm_core.parallel.context installs Ulysses attention in the self-attention here. The model never shards.
        self.attention_fn = None
        self.primal = "fused"        # kernels.attention's `primal`: model.attention, set by `set_attention`
        self.compile_mode = "none"   # model.compile, set by `set_compile`: "blocks" fuses the JVP's QK work

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)      # [B, L, D] → [B, heads, L, hd]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_padding_mask: torch.Tensor | None = None, layout: Layout = None, layer: int = 0) -> torch.Tensor:
        """Self-attention (context None) under `layout` (rcm_core.networks.causal; None = full), or
        cross-attention to `context` with an optional key padding mask."""
        kv = x if context is None else context
        cos, sin = rope if rope is not None else (None, None)
        fuse = self.compile_mode == "blocks"
        q = qk_heads(self.to_q(x), self.norm_q.weight, cos, sin, eps=self.norm_q.eps, heads=self.num_heads, fuse=fuse)
        k = qk_heads(self.to_k(kv), self.norm_k.weight, cos, sin, eps=self.norm_k.eps, heads=self.num_heads,
                     fuse=fuse)
        v = self._heads(self.to_v(kv))
        if context is None:
            attend = functools.partial(self_attention, layout=layout, layer=layer, primal=self.primal)
            o = attend(q, k, v) if self.attention_fn is None else self.attention_fn(q, k, v, attend=attend,
                                                                                     primal=self.primal)
        else:
            o = (self.attention_fn or kernels.attention)(q, k, v, key_padding_mask=key_padding_mask,
                                                         primal=self.primal)
        return self.to_out[0](o.transpose(1, 2).flatten(2).to(x.dtype))


class FeedForward(nn.Module):
    """net.0.proj (dim → ffn_dim) → tanh-GELU → net.2 (ffn_dim → dim), diffusers' `FeedForward` names."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        proj_in = nn.Module()
        proj_in.proj = Linear(dim, ffn_dim)
        self.net = nn.ModuleList([proj_in, nn.Identity(), Linear(ffn_dim, dim)])   # slot 1: dropout
        self.compile_mode = "none"   # model.compile, set by `set_compile`: "blocks" fuses the JVP's GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](gelu_tanh(self.net[0].proj(x), fuse=self.compile_mode == "blocks"))


class WanTransformerBlock(nn.Module):
    """Self-attention and FFN modulated by (shift, scale, gate) = scale_shift_table + e0 (adaLN, in fp32);
    cross-attention to the text after an affine LayerNorm, ungated (Wan2.1)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, num_heads, eps)
        self.norm2 = TangentFusedLayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = WanAttention(dim, num_heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim))
        self.compile_mode = "none"   # model.compile, set by `set_compile`

    def forward(self, x: torch.Tensor, context: torch.Tensor, e0: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], context_mask: torch.Tensor | None,
                layout: Layout = None, layer: int = 0, recompute: str | None = None) -> torch.Tensor:
        """e0 [B, 6, dim] (one time per sample) or [B, F, 6, dim] (one per latent frame, x holding F·h·w tokens in
        frame order: the modulation then acts on the view [B, F, h·w, dim], no per-token copy). `recompute`: a
        selective policy of `SAVED_OPS` for this with-grad call (WanDiT.forward passes it), None = none here."""
        if recompute is not None and recompute not in SAVED_OPS:
            raise ValueError(f"recompute={recompute!r}: use one of {list(SAVED_OPS)} or None")
        # A causal layout (block-causal, teacher forcing, KV cache) runs eager, the simplest correct choice: a
        # cache is mutated in place (append) and the layouts are Python objects a graph would guard on or
        # specialise to per chunk. `primal` still reaches their attention calls (rcm_core.networks.causal).
        if self.compile_mode == "blocks" and layout is None and not kernels.has_tangent(x, context, e0):
            # The token count varies between runs (8,190 / 32,760 at 1.3B): one graph symbolic in it, not one
            # compilation per length. A hint (maybe_): a graph that must specialise still compiles.
            for t, dim in ((x, 1), (rope[0], 0), (rope[1], 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
            return _compiled_block(recompute)(self, x, context, e0, rope, context_mask)
        if recompute is not None:
            return _checkpointed_forward(recompute, self, x, context, e0, rope, context_mask, layout, layer)
        return self._forward(x, context, e0, rope, context_mask, layout, layer)

    def _forward(self, x: torch.Tensor, context: torch.Tensor, e0: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor], context_mask: torch.Tensor | None,
                 layout: Layout = None, layer: int = 0) -> torch.Tensor:
        dt = e0.dtype                                                       # ≥ fp32
        view, flat = frame_view(x, e0)
        # In sCM's JVP pass with model.compile=blocks each elementwise island runs its primal and tangent as one
        # compiled function (networks/tangent_islands.py); everywhere else these are the plain functions.
        fuse = self.compile_mode == "blocks"
        with no_autocast(x.device):
            mod = (self.scale_shift_table.to(dt) + e0).unbind(-2)
            shift, scale, gate, c_shift, c_scale, c_gate = (m.unsqueeze(-2) for m in mod)
            h = flat(modulated_norm(view(x), scale, shift, eps=self.norm1.eps, fuse=fuse))
        x = flat(gated_residual(view(x), view(self.attn1(h, rope=rope, layout=layout, layer=layer)), gate, fuse=fuse))
        x = x + self.attn2(self.norm2(x), context=context, key_padding_mask=context_mask)
        with no_autocast(x.device):
            h = flat(modulated_norm(view(x), c_scale, c_shift, eps=self.norm3.eps, fuse=fuse))
        return flat(gated_residual(view(x), view(self.ffn(h)).to(dt), c_gate, fuse=fuse))


def frame_view(x: torch.Tensor, mod: torch.Tensor):
    """(view, flat): tokens [B, L, dim] ↔ [B, F, L/F, dim] when the modulation `mod` is per frame ([B, F, …, dim],
    4 dims), identities when it is per sample ([B, …, dim], 3 dims)."""
    if mod.dim() == 3:
        return (lambda t: t), (lambda t: t)
    frames = mod.shape[1]
    return (lambda t: t.unflatten(1, (frames, -1))), (lambda t: t.flatten(1, 2))


# Selective activation recomputation (`model.activation_checkpointing`: mm_only / attention_only; issue 28, lever 3).
# What the policy sees are the aten ops under autograd: a DiT linear is `addmm` (bias, 2-D or contiguous 3-D input)
# or `mm`; attention through SDPA is one of the fused SDPA ops (flash / efficient / cuDNN on CUDA, flash-for-CPU).
# Why attention outputs are kept too: at 32,760 tokens the attention matmuls are ~70 % of a block's forward FLOPs
# (4·n·D per token against 2·(6D² + 2DF) for its linear layers, plan.forward_flops) while the op's saved output
# is only o (D wide) and the row logsumexp, 4·D + 8·heads bytes per token over both attentions in bf16 against
# 14·D + 2·F for the matmul outputs (rcm_core.run.plan.selective_saved_bytes): recomputing them would throw away
# most of what the policy is for. `bmm` is not kept: in this network it only occurs inside attention
# implementations that are not SDPA (the PyTorch twin of the fused kernel), where its output is the n×n score
# matrix. The fused kernel's forward (a Triton launch inside an autograd.Function) is no aten op the policy could
# keep, so with `model.attention: fused` attention is recomputed under both selective modes.
_MATMUL_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))
SAVED_OPS = {"mm_only": frozenset(_MATMUL_OPS + _ATTENTION_OPS), "attention_only": frozenset(_ATTENTION_OPS)}


def _keep_policy(saved: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of `saved` ops for the backward (MUST_SAVE), recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_context(mode: str):
    """`context_fn` for torch.utils.checkpoint that applies the selective policy `mode` (a key of SAVED_OPS)."""
    return functools.partial(create_selective_checkpoint_contexts, functools.partial(_keep_policy, SAVED_OPS[mode]))


def _checkpointed_forward(mode: str, block: "WanTransformerBlock", *args) -> torch.Tensor:
    """`block._forward(*args)` under the selective policy `mode`, non-reentrant (what the policy needs)."""
    return torch.utils.checkpoint.checkpoint(WanTransformerBlock._forward, block, *args, use_reentrant=False,
                                             context_fn=recompute_context(mode))


@functools.cache
def _compiled_block(recompute: str | None = None):
    """One compiled `WanTransformerBlock._forward` for every block of every network: the block is an argument,
    so its parameters are graph inputs and all blocks, and the deep copies that make student and fake score,
    share one graph per (batch, grad mode, attention switch); a compiled bound method would instead hold on to
    the block it was made from through a deepcopy. The token dimension is marked dynamic at each call.

    With a selective `recompute` policy the checkpoint is compiled with the block (dynamo traces it, inductor's
    partitioner keeps what the policy marks): a checkpoint around the compiled graph would see only the graph's
    `addmm.out` calls and recompute every matmul (measured on torch 2.13 CPU), i.e. block checkpointing."""
    kernels.prepare_compile()      # the fused kernel's compile-opaque wrapper, made now rather than mid-trace
    if recompute is None:
        return torch.compile(WanTransformerBlock._forward)
    return torch.compile(functools.partial(_checkpointed_forward, recompute))


def set_attention(net: nn.Module, primal: str) -> nn.Module:
    """`model.attention` on a built network, in place: every `WanAttention` in it sends its tangent-free calls
    to `primal` (kernels.PRIMAL_BACKENDS); the bench flips it to time both paths on one state."""
    if primal not in kernels.PRIMAL_BACKENDS:
        raise ValueError(f"model.attention={primal!r}: use one of {kernels.PRIMAL_BACKENDS}")
    return _switch(net, WanAttention, "primal", primal, "attention")


def set_compile(net: nn.Module, mode: str) -> nn.Module:
    """`model.compile` on a built network, in place: "blocks" compiles each transformer block on its first
    tangent-free call and, in sCM's JVP pass (which runs eager: inductor drops dual tensors' tangents), the
    elementwise islands of the block, its attentions, feed-forward and norm2 (tangent_islands.py); "none" runs
    everything eager."""
    if mode not in ("none", "blocks"):
        raise ValueError(f"model.compile={mode!r}: use none or blocks")
    return _switch(net, (WanTransformerBlock, WanAttention, FeedForward, TangentFusedLayerNorm), "compile_mode",
                   mode, "compile")


RECOMPUTE_MODES = (False, True, *SAVED_OPS)


def set_recompute(net: nn.Module, mode) -> nn.Module:
    """`model.activation_checkpointing` on a built network, in place (the bench flips it between variants)."""
    if not any(mode == m and type(mode) is type(m) for m in RECOMPUTE_MODES):
        raise ValueError(f"model.activation_checkpointing={mode!r}: use one of false, true, "
                         f"{', '.join(SAVED_OPS)}")
    for m in net.modules():
        if isinstance(m, WanDiT):
            m.cfg = dataclasses.replace(m.cfg, activation_checkpointing=mode)
    return net


def _switch(net: nn.Module, kind: type | tuple[type, ...], attr: str, value: str, cfg_key: str) -> nn.Module:
    """Set `attr` on every `kind` module of `net`, and the network's `cfg.<cfg_key>` to match."""
    for m in net.modules():
        if isinstance(m, kind):
            setattr(m, attr, value)
    if isinstance(getattr(net, "cfg", None), ModelCfg):
        net.cfg = dataclasses.replace(net.cfg, **{cfg_key: value})
    return net


class WanDiT(nn.Module):
    """The Wan2.1 T2V transformer on latents [B, C, T, H, W] (T = 1 for images), plus label conditioning."""

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"model.dim={cfg.dim} must be divisible by model.num_heads={cfg.num_heads}")
        self.cfg = cfg
        self.patch_size = tuple(cfg.patch_size)
        self.out_channels = cfg.in_channels
        self.head_dim = cfg.dim // cfg.num_heads
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg.dim, cfg.freq_dim, cfg.text_dim, cfg.num_classes)
        self.blocks = nn.ModuleList(WanTransformerBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.eps)
                                    for _ in range(cfg.num_layers))
        self.norm_out = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.proj_out = Linear(cfg.dim, cfg.in_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        if cfg.num_classes > 0:
            self.label_embedding = nn.Parameter(torch.zeros(cfg.num_classes + 1, cfg.label_tokens, cfg.text_dim))
        # One zero token: with no mask, Wan attends to zero-padded text, and any number of identical zero
        # tokens gives the same attention output, so one token stands for Wan's 512 zero tokens.
        self.register_buffer("negative_context", torch.zeros(1, cfg.text_dim))
        # Optional context-parallel hook (rcm_core.parallel.context.SequenceShard): `shard(tokens, rope)` keeps
        # this rank's token slice, `gather(out)` rebuilds all tokens. None = the whole sequence here.
        self.sequence_parallel = None
        # Block-causal self-attention over chunks of latent frames (Causal rCM). A switch, not weights: the same
        # checkpoint runs either way, and a run sets it per role (rcm_core.method.distill.build_state).
        self.causal = cfg.causal
        self.chunks = ChunkPattern(cfg.first_chunk_t, cfg.chunk_t)
        set_attention(self, cfg.attention)
        set_compile(self, cfg.compile)
        self.reset_parameters()

    # -- initialisation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Wan's init for the trunk, adaLN-zero for modulation and outputs (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                # Norm gains start at 1 and biases at 0. Needed after `to_empty()` from the meta device,
                # where a module's own constructor-time init never ran and the memory holds garbage.
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        ce = self.condition_embedder
        for lin in (ce.time_embedder.linear_1, ce.time_embedder.linear_2,
                    ce.text_embedder.linear_1, ce.text_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(ce.time_proj.weight)
        for block in self.blocks:
            nn.init.zeros_(block.scale_shift_table)
            nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(self.scale_shift_table)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if hasattr(self, "label_embedding"):
            nn.init.normal_(self.label_embedding, std=1.0)   # umT5-like unit-scale "tokens" per class
        if hasattr(ce, "class_embedder"):
            # Unit scale (nn.Embedding's own default), not DiT's 0.02: with 0.02 the class barely moved the
            # time embedding and Adam's steps on it were noise, so the CLI's class-conditional teacher ignored its
            # class. Issue 32's blob task on experiments/video_cpu.yaml's network, 2,000 teacher steps, 10 Euler
            # steps, 256 samples, direction accuracy at guidance 1 / 2 (chance 0.25), 2026-12-02: raw weights,
            # seeds 76 and 5: 0.30 / 0.29 and 0.24 / 0.26 at 0.02, 0.77 / 0.93 and 0.83 / 0.96 at unit scale;
            # through the CLI (experiments/bench/class_following_cli.py, EMA teacher) 0.250 / 0.250 before, 0.996 /
            # 1.000 after, the 4-step student 0.996. tests/test_class_following.py holds the early loss gap.
            nn.init.normal_(ce.class_embedder.weight, std=1.0)
        # Also after `to_empty()` from the meta device: Wan checkpoints do not hold this buffer.
        self.negative_context.zero_()

    # -- conditioning -----------------------------------------------------------------------------------
    def null_cond(self, batch_size: int, device: torch.device | str | None = None,
                  length: int | None = None) -> torch.Tensor:
        """The unconditional condition for CFG: the null label (index num_classes) or the negative context
        [B, L, text_dim], zero-padded to `length` tokens if given (Wan zero-pads every umT5 context to 512,
        so padding keeps Wan's semantics and lets cond and null be batched together)."""
        if self.cfg.num_classes > 0:
            return torch.full((batch_size,), self.cfg.num_classes, dtype=torch.long, device=device)
        neg = self.negative_context.to(device)
        if length is not None:
            if length < neg.shape[0]:
                raise ValueError(f"null_cond(length={length}) is shorter than the stored negative context "
                                 f"({neg.shape[0]} tokens)")
            neg = torch.cat([neg, neg.new_zeros(length - neg.shape[0], neg.shape[1])])
        return neg.unsqueeze(0).expand(batch_size, *neg.shape)

    @torch.no_grad()
    def set_negative_context(self, context: torch.Tensor) -> None:
        """Store a negative-prompt embedding [L, text_dim] (e.g. Wan's umT5 negative prompt) as the null cond."""
        if context.dim() != 2 or context.shape[1] != self.cfg.text_dim:
            raise ValueError(f"negative context must be [L, text_dim={self.cfg.text_dim}], "
                             f"got {tuple(context.shape)}")
        self.negative_context = context.to(self.negative_context.device, self.negative_context.dtype).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_label_path([k for k in state_dict if k.startswith(prefix)], "checkpoint")
        # A stored negative prompt may have any length L: adopt the checkpoint's shape before loading.
        key = prefix + "negative_context"
        if key in state_dict and state_dict[key].shape != self.negative_context.shape:
            self.negative_context = self.negative_context.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed_cond(self, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        """cond → raw context [B, L, text_dim]: labels via `label_embedding`, contexts as they are."""
        if not torch.is_floating_point(cond):
            if self.cfg.num_classes <= 0:
                raise ValueError("integer labels given but model.num_classes=0; pass a context "
                                 f"[B, L, text_dim={self.cfg.text_dim}] or set model.num_classes")
            if cond.shape != (batch_size,):
                raise ValueError(f"labels must have shape [B]=[{batch_size}], got {tuple(cond.shape)}")
            return self.label_embedding[cond]
        if cond.dim() != 3 or cond.shape[0] != batch_size or cond.shape[2] != self.cfg.text_dim:
            raise ValueError(f"context must have shape [B={batch_size}, L, text_dim={self.cfg.text_dim}], "
                             f"got {tuple(cond.shape)}")
        return cond

    # -- forward ----------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """timestep → [B] (one time per sample) or [B, T] (one per latent frame: causal modes)."""
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x must have shape [B, C={self.cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"x must be a floating tensor, got {x.dtype}")
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        if timestep.shape not in ((x.shape[0],), (x.shape[0], x.shape[2])):
            raise ValueError(f"timestep must have shape [B]=[{x.shape[0]}] or, one per latent frame, [B, T]="
                             f"[{x.shape[0]}, {x.shape[2]}] (raw network time, Wan: 1000·s), got {tuple(timestep.shape)}")
        if timestep.dim() == 2 and self.patch_size[0] != 1:
            raise ValueError(f"per-frame timesteps need model.patch_size[0]=1 (one latent frame per token frame), "
                             f"got patch_size={list(self.patch_size)}")
        return timestep

    def rope(self, grid: tuple[int, int, int], device: torch.device,
             start_frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for a token grid whose frames sit at positions start_frame, start_frame + 1, …: a cached
        chunk keeps the positions it has in the whole video."""
        angles = rope_angles(grid, self.head_dim, device=device, start_frame=start_frame)   # float64
        return torch.cos(angles), torch.sin(angles)

    def _layout(self, grid: tuple[int, int, int], tf_context, cache: KVCache | None, append: bool) -> Layout:
        """The self-attention layout of this forward (rcm_core.networks.causal)."""
        if (tf_context is not None or cache is not None) and not self.causal:
            raise ValueError("tf_context= and cache= need a block-causal network (model.causal=true or "
                             "net.causal = True)")
        if tf_context is not None and cache is not None:
            raise ValueError("pass either tf_context= (teacher forcing, whole video) or cache= (one chunk), not both")
        if cache is not None:
            return Cached(cache, append)
        if append:
            raise ValueError("append=True stores keys/values in a cache; pass cache=KVCache()")
        if not self.causal:
            return None
        tokens = tuple(n * grid[1] * grid[2] for n in self.chunks.chunk_frames(grid[0]))
        return TeacherForcing(tokens) if tf_context is not None else BlockCausal(tokens)

    def _time(self, timestep: torch.Tensor,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(temb, e0) as [B, dim], [B, 6, dim] for one time per sample, [B, F, dim], [B, F, 6, dim] per frame;
        `labels` [B] (class-conditional networks) join every frame's time embedding."""
        if timestep.dim() == 1:
            return self.condition_embedder.time(timestep, labels)
        frame_labels = None if labels is None else labels[:, None].expand(timestep.shape).flatten()
        temb, e0 = self.condition_embedder.time(timestep.flatten(), frame_labels)
        return temb.unflatten(0, timestep.shape), e0.unflatten(0, timestep.shape)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None, *,
                tf_context: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, append: bool = False) -> torch.Tensor:
        """x [B, C, T, H, W], timestep [B] or [B, T] (raw time, Wan: 1000·s), cond labels [B] or context
        [B, L, text_dim], optional cond_mask bool [B, L] (True = attend) → output [B, C, T, H, W] in x's dtype.

        With `self.causal` the self-attention is block-causal over the chunks of x, and two more forms exist:
        tf_context=(x_ctx, timestep_ctx): teacher forcing, the packed sequence [x_ctx | x] in one pass, chunk i of x
            attending to chunks < i of x_ctx and to itself (x_ctx: the clean video at time 0, or a noisy context);
            returns the prediction for x only.
        cache=KVCache(): x is the next chunk; it attends to the cached chunks and itself, at the RoPE positions it
            has in the whole video; append=True stores its keys/values for the chunks after it.
        """
        timestep = self._check_inputs(x, timestep)
        B = x.shape[0]
        grid = patch_grid(tuple(x.shape), self.patch_size)
        layout = self._layout(grid, tf_context, cache, append)
        # Under FSDP2 with fp32 masters the stored weight is fp32 and the gathered one bf16: the compute dtype
        # is recorded by rcm_core.parallel.sharding.shard_network (the stored dtype can be read before the all-gather).
        dtype = getattr(self, "compute_dtype", None) or self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)      # [B, L, dim]
        rope = self.rope(grid, x.device, start_frame=0 if cache is None else cache.frames)
        if tf_context is not None:
            tokens, timestep, rope = self._pack_context(tokens, timestep, rope, tf_context, dtype)
        context = self.embed_cond(cond, B)
        temb, e0 = self._time(timestep, None if torch.is_floating_point(cond) else cond)
        context = self.condition_embedder.text_embedder(context.to(dtype))
        if self.sequence_parallel is not None:
            tokens, rope = self.sequence_parallel.shard(tokens, rope)
            if timestep.dim() == 2:       # per-frame modulation: this rank's frames (whole frames, or an error)
                temb, e0 = self.sequence_parallel.shard_frames(temb), self.sequence_parallel.shard_frames(e0)
        # Recomputation only where a backward will follow (the JVP pass and every sampler run under no_grad).
        recompute = self.cfg.activation_checkpointing if torch.is_grad_enabled() else False
        for i, block in enumerate(self.blocks):
            if recompute is True:
                # Recompute each block in backward: at 32K tokens the saved activations of 30 blocks don't fit.
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, context, e0, rope, cond_mask, layout, i,
                                                           use_reentrant=False)
            else:   # a selective policy is applied inside the block's forward (module docstring)
                tokens = block(tokens, context, e0, rope, cond_mask, layout, i, recompute=recompute or None)
        with no_autocast(x.device):
            view, flat = frame_view(tokens, e0)
            shift, scale = (m.unsqueeze(-2) for m in (self.scale_shift_table.to(temb.dtype)
                                                       + temb.unsqueeze(-2)).unbind(-2))
            h = flat(self.norm_out(view(tokens).to(temb.dtype)) * (1 + scale) + shift).to(dtype)
        out = self.proj_out(h)
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.gather(out)
        if tf_context is not None:
            out = out[:, out.shape[1] // 2:]                                   # the prediction for x
        if cache is not None and append:
            cache.frames += grid[0]
        out = unpatchify(out, grid, self.patch_size, self.out_channels)
        return out.to(x.dtype)

    def _pack_context(self, tokens, timestep, rope, tf_context, dtype):
        """[x_ctx | x] tokens, per-frame times [B, 2T] and the RoPE tables twice: context chunk i and chunk i of x
        share their positions, as a cached chunk and the context re-encoded before it do at inference."""
        x_ctx, t_ctx = tf_context
        t_ctx = self._check_inputs(x_ctx, t_ctx)
        ctx_tokens = self.patch_embedding(x_ctx.to(dtype)).flatten(2).transpose(1, 2)
        if ctx_tokens.shape != tokens.shape:
            raise ValueError(f"tf_context latent has shape {tuple(x_ctx.shape)}; it must have the shape of x")
        T = x_ctx.shape[2]
        per_frame = [t if t.dim() == 2 else t[:, None].expand(-1, T) for t in (t_ctx, timestep)]
        return (torch.cat([ctx_tokens, tokens], 1), torch.cat(per_frame, 1),
                (torch.cat([rope[0], rope[0]]), torch.cat([rope[1], rope[1]])))
