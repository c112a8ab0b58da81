"""Will it fit, and how fast? Memory and time per GPU of a distillation run, for every mesh, before launch.

    python workflows/plan.py --config experiments/wan21_t2v_14b_rcm.yaml --gpus 8 --gpu-memory 80GiB

Pure arithmetic (no GPU, no Ray); the command line and the Ray query live in workflows/plan.py.

Parameter counts come from the real network built on the meta device (`count_params`: no memory). Bytes per
GPU assume the mixed precision of the sharded runs (issue 16): the trained nets (student, fake score) keep fp32
master weights, fp32 gradients and two fp32 AdamW moments (16 B/param), one moment where β₁ = 0 (rCM's setting:
AdamW's first moment is then the gradient itself, `rcm_core.method.adamw`, 12 B/param), the gradients only in the
iterations that train that net: each iteration frees the other net's (`rcm_core.method.distill._free_gradients`),
so the one at rest counts 4 B/param less (the student's iteration, which sets the peak, has the fake score at rest;
the critic's the student, the same bytes); the EMA is fp32 (4 B/param); the frozen
teacher is bf16 (2 B/param); compute and FSDP all-gathers are bf16. Without FSDP (one GPU, or replicas alone) a
bf16 net keeps its bf16 working copy beside the fp32 masters (`rcm_core.parallel.precision`): 10 B/param at
rest; trained, 12 with its bf16 gradients, in the backward and, with β₁ = 0, in the optimiser step, which reads
them in one kernel (`kernels.master_adamw`, `uses_one_pass`); with β₁ ≠ 0 the step casts them to fp32 and holds
14, every state but no activation, so the peak is the larger of the two moments (`peak_bytes`). FSDP2 shards
every net over dp_shard·cp ranks (rcm_core.parallel.sharding; a bf16 run with CP alone shards over its CP ranks),
so those bytes divide by that size, and two blocks' bf16 parameters (the one computing and the one prefetched)
plus one block's fp32 gradients live unsharded at a time.

Activations (per rank: one micro-batch of m samples of n = tokens/cp tokens, where the rank's batch
b = data.batch_size / (dp_replicate·dp_shard) is accumulated over b/m micro-batches, `data.micro_batch_size`):
- `block_saved_bytes` counts what one Wan block keeps for its backward, per token (bf16 compute, fp32 norms and
  modulation, flash-style attention that keeps q, k, v, o and the row lse, never the n×n matrix); the test
  counts the same bytes from autograd's saved tensors of the real block. Without activation checkpointing the
  backward peak is layers × that; with it, every block's bf16 input; with a selective policy (`mm_only`,
  `attention_only`), layers × `selective_saved_bytes` (what the policy keeps, the input included; attention
  outputs only where SDPA computes them, `attention_keepable`); each plus `BACKWARD_BLOCKS` blocks' worth for the
  block recomputed and its gradients, as the CPU allocator measured it (sharded meshes: the earlier 2 / 1).
  Every step
  holds one with-grad graph at a time: `rcm_core.method.distill._accumulate` backs each loss term through
  before the next term's forwards run, so rCM's consistency forward and the rollout's last call (the two
  with-grad forwards of a student step) never hold their activations together; `activation_estimate`'s
  `graphs` says how many a step would hold at once (the FSDP2 peaks below were measured when the student
  step still summed its terms before one backward, two graphs: compared at graphs=2).
- `jvp_live_bytes` is the no-grad JVP pass of sCM (forward-mode: primal and tangent of the widest moment of one
  block, nothing kept across blocks); dCM has no JVP pass and its no-grad forwards are smaller.
These are estimates (`activation_estimate` returns them alone). Against the FSDP2 peaks of docs/BENCHMARKS.md
(1.3B, 32,760 tokens, batch 1 per GPU, checkpointing on; measured while the student step held two graphs) the
two-graph totals are 69.1 / 41.3 / 28.7 GiB for 1 / 2 / 4 GPUs where 66.1 / 35.8 / 31.1 were measured;
attention_only on one GPU: 80.5 GiB where 75.1 was measured with model.attention sdpa_grad, and 69.1 where 66.15
was measured with fused (2026-12-04); those runs also held the fake score's gradients through the student's
iteration and both networks' AdamW first moments (4 B/param each). With one graph at a time, those gradients
freed and no first moments (β₁ = 0) the planner says 47.8 / 30.5 / 21.9 and 53.5 / 47.8 GiB; one H100 measured
50.3 GiB for that attention_only training loop (2026-12-05: 0.94), and the bench's one-GPU iterations at 8,190
tokens 42.4 (attention_only, the optimiser step's peak, before the step freed the bf16 gradients) and 49.1 GiB
(mm_only), 0.96 of the estimates for that code; the sharded meshes are not re-measured yet.

Time per iteration scales a measured one-GPU step table (Wan2.1-1.3B shape, batch 1) by the forward FLOPs of
this model and per-rank token count, the per-rank batch, and the run's student : critic mix. The tables are data
files in docs/results/gpu/step_tables/, one per measured variant (model.attention, model.compile,
model.activation_checkpointing), in the format experiments/bench/rcm_step.py writes to $OUT as
step_table_<variant>.json (`read_step_tables`): re-measuring means copying the bench's files there. Each plan row
is timed by the table measured most like it (`choose_step_table`: the same levers if one was measured, else the
fewest differences, a same-compile table first), and the footer names each table and what it
differs in; a row with no checkpointing and no table of its own (uncompiled: none is shipped) is timed by a
checkpointed table (a little slow for it). Communication and
CP all-to-all are not modelled, so times are a lower bound for sharded meshes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcm_core.config import ExperimentCfg, ModelCfg
from rcm_core.parallel.mesh import MeshShape

GiB = 2 ** 30
OVERHEAD = 2 * GiB            # CUDA context, NCCL buffers and allocator slack, a fixed allowance per GPU
MASTER, GRAD, ADAM, EMA, TEACHER, COMPUTE = 4, 4, 8, 4, 2, 2      # bytes per parameter (module docstring)


def block_saved_bytes(dim: int, ffn_dim: int, heads: int) -> int:
    """Bytes one Wan block saves for its backward, per token (bf16 compute, `WanTransformerBlock.forward`):
    nine fp32 D-wide tensors (the fp32 norm inputs/outputs, modulated and gated branches: 36·D), fourteen bf16
    D-wide ones (linear inputs, q/k/v/o of both attentions, RMSNorm inputs: 28·D), the GELU input and output
    (4·F), the fp32 row lse of both attentions (8·heads) and the norms' fp32 mean/rstd (36). Counted from the
    tensors autograd saves (`tests/test_plan.py` re-counts them with saved-tensor hooks)."""
    return 64 * dim + 4 * ffn_dim + 8 * heads + 36


def compiled_block_saved_bytes(dim: int, ffn_dim: int, heads: int) -> int:
    """Bytes one Wan block saves for its backward per token under `model.compile: blocks` without checkpointing:
    inductor's partitioner recomputes cheap elementwise work in the backward instead of saving its outputs, so the
    block keeps 36·D where eager autograd keeps 64·D (`block_saved_bytes`), the rest alike: 4·F + 8·heads + 36. At
    Wan2.1-1.3B 91,268 B against 134,276 (0.68). Counted from the tensors the compiled block saves at nine shapes
    (CPU inductor, 2026-12-05; two in `tests/test_plan.py`), exactly, plus the RoPE tables, 0–2·head_dim, not
    counted, as in the eager count; one
    H200 at 8,190 tokens held 59.0 GiB where eager autograd held 69.2 (2026-12-05)."""
    return 36 * dim + 4 * ffn_dim + 8 * heads + 36


def selective_saved_bytes(dim: int, ffn_dim: int, heads: int, mode: str, keeps_attention: bool = True) -> int:
    """Bytes one Wan block keeps per latent token under a selective recomputation policy (bf16 compute,
    rcm_core.networks.dit.SAVED_OPS), the block's bf16 input (held by the checkpoint) included:

        mm_only:        2·(D  +  7·D + F  +  2·D) + 2·4·heads = 20·D + 2·F + 8·heads
                           input  matmuls    attention o  lse
        attention_only: 2·(D + 2·D) + 8·heads             =  6·D + 8·heads

    The matmul outputs per latent token are self-attention q, k, v, o, cross-attention q, o and the FFN's down
    projection (D wide each: 7·D) and its up projection (F); cross-attention k, v are per text token (2·D·text_len
    per sample, not counted: 6 MB per block at Wan's 512 tokens). Each attention keeps o (D wide) and its fp32 row
    logsumexp (heads wide). `tests/test_plan.py` measures the same per-token bytes from the storages a block
    leaves alive after its forward. Wan2.1-1.3B: mm_only 48,736 B, attention_only 9,312 B, against 134,276 B
    (`block_saved_bytes`) without checkpointing and 3,072 B (the input) with whole-block checkpointing.
    keeps_attention=False (`attention_keepable`): the attention runs our fused kernel, no op the policy can keep,
    so its 4·D + 8·heads are recomputed too: attention_only keeps the input alone, as whole-block checkpointing."""
    if mode == "mm_only":
        kept = 20 * dim + 2 * ffn_dim + 8 * heads
    elif mode == "attention_only":
        kept = 6 * dim + 8 * heads
    else:
        raise ValueError(f"selective recomputation mode {mode!r}: use mm_only or attention_only")
    return kept if keeps_attention else kept - (4 * dim + 8 * heads)


def attention_keepable(model: ModelCfg) -> bool:
    """Whether a selective policy can keep the with-grad passes' attention outputs: only where they run SDPA
    (model.attention sdpa_grad or sdpa, rcm_core.networks.dit.SAVED_OPS); the fused kernel's are recomputed. One
    H200, 1.3B, 32,760 tokens, attention_only (2026-12-04, experiments/bench/scale_step.py): 75.1 GiB with
    sdpa_grad, 66.15 with fused, as with whole-block checkpointing. A causal model's block-causal calls run the
    fused kernel whatever model.attention says, but its bidirectional critic may not, so the plan counts them as
    kept there: an over-estimate, the safe side for a fit check."""
    return model.attention != "fused"


def jvp_live_bytes(dim: int, ffn_dim: int, heads: int) -> int:
    """Bytes live per token at the widest moment of one block's no-grad JVP (primal + tangent, bf16), an
    estimate not yet checked against a measured peak: the residual stream, its tangent and their fp32 norm and
    modulation copies (≈16·D), plus either the attention's q, k, v, o and their tangents (16·D) with two fp32
    lse rows (8·heads), or the FFN hidden, its GELU and both tangents (8·F)."""
    return 16 * dim + max(16 * dim + 8 * heads, 8 * ffn_dim)


@dataclass(frozen=True)
class ParamCounts:
    total: int              # parameters of one network
    block: int              # of one transformer block (the FSDP unit)
    layers: int


def count_params(model: ModelCfg) -> ParamCounts:
    """Parameter counts of the real network, built on the meta device (no memory, no CUDA)."""
    return _count_params(json.dumps(dataclasses.asdict(model), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _count_params(model_json: str) -> ParamCounts:
    from rcm_core.networks import build_network

    with torch.device("meta"):
        net = build_network(ModelCfg(**json.loads(model_json)))
    total = sum(p.numel() for p in net.parameters())
    blocks = getattr(net, "blocks", None)
    block = sum(p.numel() for p in blocks[0].parameters()) if blocks else total
    return ParamCounts(total, block, len(blocks) if blocks else 1)


@dataclass(frozen=True)
class Workload:
    """What one iteration processes: the latent [C, T, H, W], its tokens, the text length, the global batch."""
    latent: tuple[int, int, int, int]
    tokens: int
    text_len: int
    batch: int

    @classmethod
    def from_config(cls, cfg: ExperimentCfg, latent: tuple[int, ...], text_len: int) -> Workload:
        C, T, H, W = latent
        pt, ph, pw = cfg.model.patch_size
        return cls(tuple(latent), (T // pt) * (H // ph) * (W // pw), text_len, cfg.data.batch_size)


@dataclass(frozen=True)
class StepTable:
    """A measured one-GPU iteration: ms per student / critic iteration by token count (docs/results/gpu/), and the
    levers it was measured with."""
    model: ModelCfg
    text_len: int
    tokens: tuple[int, ...]
    student_ms: tuple[float, ...]
    critic_ms: tuple[float, ...]
    card: str
    source: str = ""             # the file it was read from, for the plan's footer
    attention: str = ""          # model.attention the table was measured with ("" in files that predate it)
    compile: str = ""            # model.compile, likewise
    date: str = ""

    @property
    def checkpointing(self) -> bool | str:
        return self.model.activation_checkpointing

    def differences(self, model: ModelCfg, checkpointing: bool | str) -> list[tuple[str, str, str]]:
        """How this table's levers differ from a row's: [(key, the table's value, the row's), …], e.g.
        ("model.compile", "none", "blocks"); a lever the file does not record counts as no difference."""
        theirs = {"model.attention": self.attention, "model.compile": self.compile,
                  "model.activation_checkpointing": _lever(self.checkpointing)}
        ours = {"model.attention": model.attention, "model.compile": model.compile,
                "model.activation_checkpointing": _lever(checkpointing)}
        return [(k, theirs[k], ours[k]) for k in theirs if theirs[k] and theirs[k] != ours[k]]


def _lever(value: bool | str) -> str:
    # as a YAML override writes it: true / false / attention_only
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_step_table(path: str | Path) -> StepTable | None:
    """The step table in `path` (JSON: card, model, text_len, rows of tokens / student_ms / critic_ms, as
    experiments/bench/rcm_step.py writes it); None if there is no such file, ValueError naming the file and the
    field if it is malformed."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        rows = sorted(data["rows"], key=lambda r: r["tokens"])
        table = StepTable(model=ModelCfg(**data["model"]), text_len=int(data["text_len"]),
                          tokens=tuple(int(r["tokens"]) for r in rows),
                          student_ms=tuple(float(r["student_ms"]) for r in rows),
                          critic_ms=tuple(float(r["critic_ms"]) for r in rows),
                          card=str(data["card"]), source=str(path),
                          attention=str(data.get("model.attention", "")), compile=str(data.get("model.compile", "")),
                          date=str(data.get("date", "")))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"step table {path}: {e!r}; expected the JSON experiments/bench/rcm_step.py writes "
                         "(card, model, text_len, rows of tokens / student_ms / critic_ms)") from None
    if not rows or min(table.student_ms + table.critic_ms) <= 0:
        raise ValueError(f"step table {path}: needs at least one row with positive student_ms and critic_ms")
    return table


def read_step_tables(path: str | Path) -> tuple[StepTable, ...]:
    """Every step table in a folder (its *.json, by name), or the one in a file; () if there is none."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    return tuple(t for t in map(read_step_table, files) if t is not None)


def choose_step_table(tables: tuple[StepTable, ...] | list[StepTable], model: ModelCfg,
                      checkpointing: bool | str) -> StepTable | None:
    """The table measured most like a row (this model's attention and compile, the row's checkpointing): no
    differences if there is one; else the fewest, a same-compile table before a same-attention one (compiling the
    blocks moved the 1:4 mean by −21 / −23 % at 32,760 / 8,190 tokens, attention_only on top by −9 / −24 %, SDPA
    for the with-grad passes by −13 % at 32,760; docs/BENCHMARKS.md), then the first by file name. Where no table
    matches, the footer says how the one used differs."""
    def cost(t: StepTable) -> tuple[int, bool, bool]:
        keys = [k for k, _, _ in t.differences(model, checkpointing)]
        return len(keys), "model.compile" in keys, "model.attention" in keys
    return min(tables, key=cost) if tables else None


def _flop_parts(model: ModelCfg, q_tokens: int, kv_tokens: int, text_len: int) -> tuple[float, float, float, float]:
    """One forward of one sample, per layer and 2 FLOPs per MAC: (linears on the latent tokens: self q,k,v,o +
    cross q,o (6·D²) and the FFN; cross-attention's k,v on the text (2·D²); self-attention; cross-attention)."""
    D, F = model.dim, model.ffn_dim
    return (2 * q_tokens * (6 * D * D + 2 * D * F), 2 * text_len * 2 * D * D,
            4 * q_tokens * kv_tokens * D, 4 * q_tokens * text_len * D)


def forward_flops(model: ModelCfg, q_tokens: int, kv_tokens: int, text_len: int) -> float:
    """FLOPs of one forward of one sample whose rank holds `q_tokens` of `kv_tokens` (2 per MAC): block linear
    layers, self-attention over all keys, cross-attention over the text."""
    return model.num_layers * sum(_flop_parts(model, q_tokens, kv_tokens, text_len))


def jvp_flops(model: ModelCfg, q_tokens: int, kv_tokens: int, text_len: int) -> float:
    """FLOPs of sCM's JVP pass (primal and tangent together, forward-mode AD along x_t and t) of one sample, on the
    same terms as `forward_flops`. A matmul gains one tangent matmul per factor that carries a tangent: every block
    linear but cross-attention's k, v (the text has none) doubles; self-attention's q·kᵀ and p·v have two tangent
    factors each, so it triples (the fused kernel's 12 FLOPs per pair and head-dim element against the forward's 4);
    cross-attention's q·kᵀ and p·v one each, so it doubles. Hence JVP ÷ forward is 2 + the self-attention share of
    a forward's FLOPs (less a little for the text): 2.36 at 8,190 tokens and 2.70 at 32,760 for Wan2.1-1.3B, the
    ratio of times a JVP pass can reach only by running faster per FLOP than the forward it is compared with."""
    latent_linear, text_linear, self_attention, cross_attention = _flop_parts(model, q_tokens, kv_tokens, text_len)
    return model.num_layers * (2 * latent_linear + text_linear + 3 * self_attention + 2 * cross_attention)


@dataclass
class MeshPlan:
    shape: MeshShape
    checkpointing: bool | str           # model.activation_checkpointing: false, true, mm_only, attention_only
    micro: int = 0                      # samples per forward/backward on one GPU (a divisor of the GPU's batch)
    states: dict[str, float] = field(default_factory=dict)     # bytes per GPU: student, fake, ema, teacher, fsdp
    jvp_peak: float = 0.0
    backward_peak: float = 0.0
    step_only: float = 0.0              # bytes the optimiser step holds beyond the backward (`step_only_bytes`)
    total: float = 0.0
    memory: float = 0.0
    seconds: float | None = None
    table: StepTable | None = None      # the step table `seconds` is scaled from
    refused: str | None = None          # why this mesh cannot run at all

    @property
    def fits(self) -> bool:
        return self.refused is None and self.total <= self.memory

    @property
    def shard(self) -> int:
        # FSDP2 over dp_shard·cp ranks; a bf16 run (what these bytes assume) with CP alone shards over its CP
        # ranks too (rcm_core.parallel.sharding.shard_mesh)
        return self.shape.dp_shard * self.shape.cp


def state_bytes(counts: ParamCounts, shard: int, uses_fake: bool, first_moment: bool = True,
                masters: bool = False, one_pass: bool = False) -> dict[str, float]:
    """Parameter + gradient + optimiser bytes per GPU for each net, and the unsharded FSDP working set: the student
    as trained (with gradients, at its optimiser step), the fake score at rest (without: `distill._free_gradients`).
    Without a first moment (β₁ = 0, `rcm_core.method.adamw`) AdamW keeps one moment, 4 B/param, not two. `masters`: a
    bf16 network without FSDP (`uses_masters`) keeps its bf16 working copy beside the fp32 masters
    (`rcm_core.parallel.precision`): 2 B/param more, trained or at rest; its gradients are bf16 in the backward
    and fp32 in the optimiser step, which frees the bf16 ones as it casts them (`step_only_bytes`), unless the
    step takes them in `one_pass` (`uses_one_pass`): then they stay bf16 (2 B/param) and no fp32 copy is made."""
    adam = ADAM if first_moment else ADAM // 2
    copies = COMPUTE if masters else 0
    grad = COMPUTE if masters and one_pass else GRAD
    trained = counts.total * (MASTER + grad + adam + copies) / shard
    at_rest = counts.total * (MASTER + adam + copies) / shard
    out = {"student": trained, "fake": at_rest if uses_fake else 0.0, "ema": counts.total * EMA / shard,
           "teacher": counts.total * TEACHER / shard}
    out["fsdp"] = float(counts.block * (2 * COMPUTE + GRAD)) if shard > 1 else 0.0
    return out


def uses_masters(shard: int) -> bool:
    """Whether a bf16 run on this shard size keeps fp32 masters outside the module (`rcm_core.parallel.precision`):
    without FSDP, i.e. one GPU or replicas alone; under FSDP2 the sharded fp32 parameters are the masters."""
    return shard == 1


def uses_one_pass(masters: bool, first_moment: bool) -> bool:
    """Whether the masters' optimiser step runs as one kernel from the bf16 gradients (`kernels.master_adamw`,
    through `rcm_core.method.adamw.AdamW.step_in_one_pass`): fp32 masters on a GPU (fused AdamW) with β₁ = 0."""
    return masters and not first_moment


def step_only_bytes(counts: ParamCounts, masters: bool, one_pass: bool = False) -> float:
    """Bytes the optimiser step holds beyond what the backward holds, not beside the activations: with masters
    the stepping network's fp32 gradients (4 B/param) less its bf16 gradients (2), which
    `MasterWeightOptimizer.step` frees as it casts them; none when the step takes the bf16 gradients in one pass;
    under FSDP2 the reduce-scatter writes the fp32 gradient shards during the backward, so none."""
    return float(counts.total * (GRAD - COMPUTE)) if masters and not one_pass else 0.0


def held_state_bytes(state) -> dict[str, int]:
    """What this process holds of a `DistillState`'s states, in bytes per network (student, fake, ema, teacher):
    parameters, gradients, fp32 masters and their gradients, optimiser state; each tensor once (FSDP2's gradient
    shards are views of one buffer, so a tensor counts by its start and length), DTensors by their local shard.
    The measured side of `state_bytes`: the benches print it beside their peaks (the peak less it is activations
    and temporaries), and `tests/test_plan.py` holds the sharded count to it."""
    from torch.distributed.tensor import DTensor
    seen = set()

    def size(t) -> int:
        if t is None:
            return 0
        t = t.to_local() if isinstance(t, DTensor) else t
        key = (t.data_ptr(), t.numel())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()
    out = {}
    for name, net, opt in (("student", state.student, state.opt_student), ("fake", state.fake, state.opt_fake)):
        if net is None:
            out[name] = 0
            continue
        held = sum(size(p) + size(p.grad) for p in net.parameters())
        held += sum(size(m) + size(m.grad) for m in getattr(opt, "masters", []))
        held += sum(size(v) for s in getattr(opt, "inner", opt).state.values() for k, v in s.items() if k != "step")
        out[name] = held
    out["ema"] = sum(size(p) for p in state.ema.module.parameters())
    out["teacher"] = sum(size(p) for p in state.teacher.parameters())
    return out


def checkpoint_bytes(cfg: ExperimentCfg, counts: ParamCounts, *, sharded: bool) -> float:
    """Bytes of one checkpoint of the distillation state (rcm_core.run.checkpoint, rcm_core.parallel.dcp): per
    trained network the fp32 parameters or masters and AdamW's second moment, plus the first moment unless β₁ = 0
    (unsharded files leave it and the bf16 working copies out; DCP keeps both moments), and the fp32 EMA."""
    from rcm_core.method.distill import uses_dmd

    moments = 8 if sharded or cfg.optim.betas[0] != 0 else 4
    nets = 2 if uses_dmd(cfg.distill) else 1
    return float(counts.total * ((MASTER + moments) * nets + EMA))


# What the backward holds above what the forward kept, in blocks' worth of `block_saved_bytes`: the block being
# recomputed (where checkpointing recomputes) and the gradients of its activations. Measured with the CPU
# allocator on bf16 Wan-shaped DiTs (experiments/bench/memory_cpu.py; docs/BENCHMARKS.md, twenty-fifth and
# twenty-seventh sessions): whole blocks 1.20-1.35, attention_only 1.15-1.31, mm_only 0.86-1.01, off 0.38-0.64 over
# four shapes (the most at the smallest, `tests/test_plan.py`'s); set a little above the largest of each. One H100's
# one-GPU iteration at 32,760 tokens, attention_only, held 0.6-1.2 of a block there (2026-12-05).
BACKWARD_BLOCKS = {"true": 1.45, "attention_only": 1.45, "mm_only": 1.1, "false": 0.7}
# Sharded meshes keep the earlier allowance (two blocks with checkpointing, one without): under FSDP2 at four GPUs
# the peak held ~4.6 GiB more than the counted states and these activations explain (1.3B, 32,760 tokens,
# 2026-11-28: 31.1 GiB measured, 28.7 planned with it, 26.5 with the allowance above), a term not identified yet
# (issue 28; `experiments/bench/scale_step.py` prints each rank's states and peaks for the run that will find it).
SHARDED_BACKWARD_BLOCKS = {"true": 2.0, "attention_only": 2.0, "mm_only": 2.0, "false": 1.0}


def activation_estimate(model: ModelCfg, *, batch: int, tokens: int, text_len: int, checkpointing: bool | str,
                        graphs: int, jvp: bool, sharded: bool = False) -> tuple[float, float]:
    """(JVP-pass peak, backward peak) in bytes on one rank holding `batch` samples of `tokens` tokens each;
    `checkpointing` is a model.activation_checkpointing value; `sharded`: under FSDP2 (the allowance differs)."""
    D, F, H, L = model.dim, model.ffn_dim, model.num_heads, model.num_layers
    per_block = block_saved_bytes(D, F, H) * batch * tokens
    if checkpointing is True:
        kept = graphs * L * 2 * D * batch * tokens        # every block's input
    elif checkpointing is False:
        saved = compiled_block_saved_bytes(D, F, H) if model.compile == "blocks" else block_saved_bytes(D, F, H)
        kept = graphs * L * saved * batch * tokens
    else:   # selective: what the policy keeps
        kept = graphs * L * selective_saved_bytes(D, F, H, checkpointing, attention_keepable(model)) * batch * tokens
    kept += (SHARDED_BACKWARD_BLOCKS if sharded else BACKWARD_BLOCKS)[_lever(checkpointing)] * per_block
    jvp_peak = jvp_live_bytes(D, F, H) * batch * tokens if jvp else 0.0
    return float(jvp_peak), float(kept)


def refuse_reason(shape: MeshShape, *, gpus: int, heads: int, tokens: int, batch: int) -> str | None:
    """Why `shape` cannot run this model and data on `gpus` GPUs, or None. CP here splits the flattened token
    sequence (rcm_core.parallel.context), so it must divide the token count, not the latent frames as in the
    official code (rCM issue 12)."""
    if min(shape.dp_replicate, shape.dp_shard, shape.cp) < 1:
        return "every size must be ≥ 1"
    if shape.world_size != gpus:
        return f"dp_replicate·dp_shard·cp = {shape.world_size}, not the {gpus} GPUs"
    if heads % shape.cp:
        return f"cp={shape.cp} does not divide the {heads} attention heads (Ulysses splits heads)"
    if tokens % shape.cp:
        return f"cp={shape.cp} does not divide the {tokens} latent tokens"
    if batch % shape.data_parallel_size:
        return (f"data.batch_size={batch} is not divisible by the {shape.data_parallel_size} data-parallel "
                f"groups (dp_replicate·dp_shard)")
    return None


def plan_mesh(cfg: ExperimentCfg, shape: MeshShape, *, gpus: int, gpu_memory: float, work: Workload,
              counts: ParamCounts, checkpointing: bool | str, table: StepTable | None,
              micro: int | None = None) -> MeshPlan:
    """One mesh's bytes and time. `micro`: samples per forward/backward on a GPU; None = data.micro_batch_size
    (0 there = the whole per-GPU batch at once)."""
    from rcm_core.method.distill import consistency_term, uses_dmd

    m, d = cfg.model, cfg.distill
    plan = MeshPlan(shape, checkpointing, memory=gpu_memory)
    plan.refused = refuse_reason(shape, gpus=gpus, heads=m.num_heads, tokens=work.tokens, batch=work.batch)
    if not plan.refused and m.causal:
        from rcm_core.parallel.sharding import causal_cp_sizes
        legal = causal_cp_sizes(cfg, work.latent)
        if shape.cp not in legal:
            plan.refused = f"cp={shape.cp} cannot split block-causal {d.mode} (legal cp: {legal}; README: Causal rCM)"
    if plan.refused:
        return plan
    per_gpu = work.batch // shape.data_parallel_size
    micro = cfg.data.micro_batch_size if micro is None else micro
    plan.micro = micro if 0 < micro < per_gpu else per_gpu
    if per_gpu % plan.micro:
        plan.refused = (f"data.micro_batch_size={plan.micro} does not divide the {per_gpu} samples per GPU "
                        f"(data.batch_size / data-parallel groups)")
        return plan
    dmd, term = uses_dmd(d), consistency_term(d)
    masters, first_moment = uses_masters(plan.shard), cfg.optim.betas[0] != 0
    one_pass = uses_one_pass(masters, first_moment)
    plan.states = state_bytes(counts, plan.shard, dmd, first_moment=first_moment, masters=masters, one_pass=one_pass)
    packed = 2 if d.mode in ("tf", "tf_dcm", "tf_scm") else 1     # teacher forcing forwards [clean | noisy]
    b, n = plan.micro, packed * work.tokens // shape.cp
    plan.jvp_peak, plan.backward_peak = activation_estimate(      # one with-grad graph at a time (distill._accumulate)
        m, batch=b, tokens=n, text_len=work.text_len, checkpointing=checkpointing, graphs=1,
        jvp=term == "scm" and d.tangent == "jvp", sharded=not masters)
    plan.step_only = step_only_bytes(counts, masters, one_pass)
    plan.total = peak_bytes(plan.states, plan.step_only, max(plan.jvp_peak, plan.backward_peak))
    plan.seconds, plan.table = seconds_per_iteration(cfg, work, shape, table), table
    return plan


def peak_bytes(states: dict[str, float], step_only: float, activations: float) -> float:
    """The larger of an iteration's two peaks, plus the fixed allowance: its forwards and backward (the states
    less what only the optimiser step holds, with the activations) and its optimiser step (every state, no
    activations: they are freed by then). Without FSDP, while the step cast its gradients to fp32, the step's set
    the peak at short sequences (1.3B, 8,190 tokens, `attention_only`, 2026-12-05: the iterations peaked at 40.0
    GiB with 39.6 GiB of states, H100 and H200; 53.5 and 42.6 GiB planned at 32,760 and 8,190 tokens, 48.6 and
    40.0 measured); a step in one pass (`uses_one_pass`) holds nothing the backward does not, so `step_only` is 0
    and the first candidate is the peak."""
    held = sum(states.values())
    return max(held - step_only + activations, held) + OVERHEAD


def seconds_per_iteration(cfg: ExperimentCfg, work: Workload, shape: MeshShape,
                          table: StepTable | None) -> float | None:
    """This run's forward FLOPs per rank times the table's measured ms per FLOP, interpolated in log(tokens)
    between its rows (clamped outside them), times the per-rank batch, mixed student : critic as the run is."""
    if table is None:
        return None
    from rcm_core.method.distill import uses_dmd

    n = work.tokens // shape.cp
    f = cfg.distill.student_update_freq if uses_dmd(cfg.distill) else 1
    per_flop = [(s + (f - 1) * c) / f / forward_flops(table.model, k, k, table.text_len)
                for k, s, c in zip(table.tokens, table.student_ms, table.critic_ms)]
    x = [math.log(k) for k in table.tokens]
    ln = min(max(math.log(n), x[0]), x[-1])
    j = next((j for j in range(1, len(x)) if ln <= x[j]), len(x) - 1)
    w = 0.0 if len(x) == 1 or x[j] == x[j - 1] else (ln - x[j - 1]) / (x[j] - x[j - 1])
    ms_per_flop = per_flop[max(j - 1, 0)] * (1 - w) + per_flop[j] * w
    b = work.batch // shape.data_parallel_size
    return ms_per_flop * forward_flops(cfg.model, n, work.tokens, work.text_len) * b / 1000


def largest_fitting_micro(cfg: ExperimentCfg, shape: MeshShape, **kw) -> MeshPlan:
    """The mesh planned with the largest micro-batch that fits (fewest accumulation steps: the whole per-GPU
    batch when it fits), else with a micro-batch of 1 (the smallest there is; it does not fit)."""
    work = kw["work"]
    per_gpu = max(work.batch // shape.data_parallel_size, 1)
    plan = None
    # sf_dmd does not accumulate gradients (rcm_core.config refuses data.micro_batch_size > 0 for it): whole batch.
    micros = [per_gpu] if cfg.distill.mode == "sf_dmd" else sorted(_divisors(per_gpu), reverse=True)
    for micro in micros:
        plan = plan_mesh(cfg, shape, micro=micro, **kw)
        if plan.fits or plan.refused:
            return plan
    return plan


def plan_run(cfg: ExperimentCfg, *, gpus: int, gpu_memory: float, latent: tuple[int, ...], text_len: int,
             tables: tuple[StepTable, ...] | list[StepTable] = ()) -> list[MeshPlan]:
    """Every (dp_replicate, dp_shard, cp) whose product is `gpus`, with activation checkpointing off and on, and
    in the config's own mode where that is a selective one (mm_only, attention_only), each with the largest
    micro-batch that fits (gradient accumulation makes up the global batch) and timed by the step table measured
    most like it (`choose_step_table`); refused meshes carry their reason. Only DiT models are planned (the MLP
    toys fit anywhere)."""
    if cfg.model.kind != "dit":
        raise ValueError(f"plans cover model.kind=dit; model.kind={cfg.model.kind} is a CPU toy")
    work = Workload.from_config(cfg, latent, text_len)
    counts = count_params(cfg.model)
    shapes = [MeshShape(r, gpus // (r * c), c) for c in _divisors(gpus) for r in _divisors(gpus // c)]
    modes = [False, True] + [m for m in (cfg.model.activation_checkpointing,) if isinstance(m, str)]
    return [largest_fitting_micro(cfg, s, gpus=gpus, gpu_memory=gpu_memory, work=work, counts=counts,
                                  checkpointing=ac, table=choose_step_table(tables, cfg.model, ac))
            for s in shapes for ac in modes]


# How much of a block's forward each checkpointing mode re-runs in the backward: the less, the faster.
RECOMPUTES = {False: 0, "mm_only": 1, "attention_only": 2, True: 3}


def recommend(plans: list[MeshPlan]) -> MeshPlan | None:
    """The fastest mesh that fits; on equal times the mode that recomputes least (rows of several modes share one
    step table's time unless each mode was measured: a table with more recomputation than the row is slow for it,
    one with less fast, so the least recomputing row is the faster in truth), then more memory to spare."""
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (round(p.seconds, 3) if p.seconds is not None else 0.0,
                                       RECOMPUTES[p.checkpointing], p.total))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def format_plan(cfg: ExperimentCfg, plans: list[MeshPlan], *, gpus: int, gpu_memory: float,
                latent: tuple[int, ...], text_len: int) -> str:
    counts = count_params(cfg.model)
    work = Workload.from_config(cfg, latent, text_len)
    head = (f"plan: {cfg.name} ({cfg.distill.mode}), {counts.total / 1e9:.3f}B parameters per net, latent "
            f"{list(latent)} = {work.tokens} tokens, text {text_len}, global batch {work.batch}, on {gpus} GPUs × "
            f"{_gib(gpu_memory)} GiB")
    cols = ["repl", "shard", "cp", "AC", "b/GPU", "micro", "student", "fake", "ema", "teacher", "fsdp", "JVP act",
            "bwd act", "total GiB", "fits", "s/iter"]
    rows = []
    for p in plans:
        if p.refused:
            continue
        s = p.states
        ac = _ac(p.checkpointing)
        rows.append([p.shape.dp_replicate, p.shape.dp_shard, p.shape.cp, ac,
                     work.batch // p.shape.data_parallel_size, p.micro, _gib(s["student"]), _gib(s["fake"]), _gib(s["ema"]),
                     _gib(s["teacher"]), _gib(s["fsdp"]), _gib(p.jvp_peak), _gib(p.backward_peak), _gib(p.total),
                     "yes" if p.fits else "NO", f"{p.seconds:.2f}" if p.seconds is not None else "-"])
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))     # noqa: E731
    lines = [head, "", fmt(cols), *(fmt(r) for r in rows)]
    refused = list(dict.fromkeys((p.shape.dp_replicate, p.shape.dp_shard, p.shape.cp, p.refused)
                                 for p in plans if p.refused))
    if refused:
        lines += ["", "refused (repl, shard, cp):"] + [f"  ({r}, {s}, {c}): {why}" for r, s, c, why in refused]
    best = recommend(plans)
    lines.append("")
    if best is None:
        lines.append(f"recommended: none fits {_gib(gpu_memory)} GiB even at data.micro_batch_size=1; turn on "
                     f"model.activation_checkpointing, or add GPUs")
    else:
        lines.append(f"recommended: parallel.dp_replicate={best.shape.dp_replicate} parallel.dp_shard="
                     f"{best.shape.dp_shard} parallel.cp={best.shape.cp} model.activation_checkpointing="
                     f"{str(best.checkpointing).lower()} data.micro_batch_size={best.micro}  "
                     f"({_gib(best.total)} of {_gib(gpu_memory)} GiB"
                     + (f", ~{best.seconds:.2f} s/iteration" if best.seconds is not None else "") + ")")
    sharded = best.shape.dp_shard * best.shape.cp > 1 if best is not None else gpus > 1
    ckpt, keep = checkpoint_bytes(cfg, counts, sharded=sharded), cfg.train.keep_checkpoints
    lines.append(f"checkpoints: {_gib(ckpt)} GiB each ({'DCP, sharded' if sharded else 'state.pt'}); "
                 f"train.keep_checkpoints={keep}: up to {_gib((keep + 1) * ckpt)} GiB of storage while the next "
                 f"is written")
    lines += timing_lines(cfg, plans)
    lines.append(f"memory: max(states + max(JVP, backward) activations, states at the optimiser step) + "
                 f"{_gib(OVERHEAD)} GiB allowance")
    return "\n".join(lines)


def timing_lines(cfg: ExperimentCfg, plans: list[MeshPlan]) -> list[str]:
    """Which step table timed the rows of each checkpointing mode, and how it was measured unlike them: the times
    stay usable across levers (same network, same FLOPs) but are then another variant's."""
    by_mode: dict[str, MeshPlan] = {}
    for p in plans:
        if not p.refused:
            by_mode.setdefault(_lever(p.checkpointing), p)
    if not any(p.table for p in by_mode.values()):
        return ["time: no step table found (docs/results/gpu/step_tables/, or --step-table)"]
    lines, unlike = ["time (compute only), scaled from the step table measured most like each row:"], False
    for p in by_mode.values():
        t = p.table
        diff = t.differences(cfg.model, p.checkpointing)
        # worth a re-measurement: the run's own mode, or a lever every row has; the off row of a table measured
        # with checkpointing is the usual case (no one-GPU table without it fits at 32,760 tokens)
        unlike = unlike or any(k != "model.activation_checkpointing" or p.checkpointing is not False
                               for k, _, _ in diff)
        note = "".join(f"; measured with {k}={theirs}, this row uses {ours}" for k, theirs, ours in diff)
        lines.append(f"  AC {_ac(p.checkpointing)}: {t.source} ({t.card}{', ' + t.date if t.date else ''}){note}")
    if unlike:
        lines.append("  (to time a variant as it runs: experiments/bench/rcm_step.py --variants …, then its "
                     "step_table_<variant>.json into docs/results/gpu/step_tables/)")
    return lines


def _ac(checkpointing: bool | str) -> str:
    # the table's AC column
    return ("on" if checkpointing else "off") if isinstance(checkpointing, bool) else checkpointing


def configured_plan(cfg: ExperimentCfg, *, gpus: int, gpu_memory: float, latent: tuple[int, ...],
                    text_len: int) -> MeshPlan | str:
    """The plan of the run as configured: its own mesh (cfg.parallel) and checkpointing mode, selective ones
    included (which the table of `plan_run` does not list); or why parallel.* cannot run on `gpus` GPUs."""
    from rcm_core.parallel.mesh import shape_from_config

    try:
        shape = shape_from_config(cfg.parallel, gpus)
    except ValueError as e:
        return f"parallel.* cannot run on {gpus} GPUs: {e}"
    work = Workload.from_config(cfg, latent, text_len)
    return plan_mesh(cfg, shape, gpus=gpus, gpu_memory=gpu_memory, work=work, counts=count_params(cfg.model),
                     checkpointing=cfg.model.activation_checkpointing, table=None)


def describe_memory(p: MeshPlan) -> str:
    """"~58.3 GiB per GPU (states 47.6 + 2.6 in the optimiser step, activations 8.8)": the total and the parts it
    is the larger of (`peak_bytes`); "+ …" only where the step holds states the backward does not."""
    held = sum(p.states.values())
    step = f" + {_gib(p.step_only)} in the optimiser step" if p.step_only else ""
    return (f"~{_gib(p.total)} GiB per GPU (states {_gib(held - p.step_only)}{step}, activations "
            f"{_gib(max(p.jvp_peak, p.backward_peak))})")


def check_fits(cfg: ExperimentCfg, *, gpus: int, gpu_memory: float, latent: tuple[int, ...],
               text_len: int) -> str | None:
    """None if the run's own mesh (cfg.parallel) fits; otherwise the reason, with the plan's recommendation."""
    p = configured_plan(cfg, gpus=gpus, gpu_memory=gpu_memory, latent=latent, text_len=text_len)
    if isinstance(p, str):
        return p
    shape = p.shape
    if p.fits:
        return None
    why = p.refused or f"needs {describe_memory(p)} but the GPUs have {_gib(gpu_memory)} GiB"
    best = recommend(plan_run(cfg, gpus=gpus, gpu_memory=gpu_memory, latent=latent, text_len=text_len))
    hint = ("no mesh fits even at data.micro_batch_size=1: add GPUs" if best is None else
            f"try parallel.dp_replicate={best.shape.dp_replicate} parallel.dp_shard={best.shape.dp_shard} "
            f"parallel.cp={best.shape.cp} model.activation_checkpointing={str(best.checkpointing).lower()} "
            f"data.micro_batch_size={best.micro}")
    return (f"mesh (dp_replicate={shape.dp_replicate}, dp_shard={shape.dp_shard}, cp={shape.cp}) will not fit: "
            f"{why}; {hint} (python workflows/plan.py --config … for the whole table)")


__all__ = ["count_params", "state_bytes", "activation_estimate", "plan_run", "plan_mesh", "recommend", "format_plan",
           "check_fits", "configured_plan", "describe_memory", "read_step_table", "read_step_tables", "held_state_bytes",
           "choose_step_table", "timing_lines", "refuse_reason", "block_saved_bytes", "compiled_block_saved_bytes",
           "selective_saved_bytes", "attention_keepable", "jvp_live_bytes", "forward_flops", "jvp_flops", "peak_bytes",
           "step_only_bytes", "uses_masters", "uses_one_pass", "GiB"]
