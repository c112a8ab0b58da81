"""Cost of one rCM iteration at Wan2.1-1.3B shape on one GPU, per performance lever (issues 9, 28). Prints tables.

    python3 experiments/bench/rcm_step.py                  # on the GPU: 8,190 and 32,760 tokens, issue 28's table
    python3 experiments/bench/rcm_step.py --profile        # + torch.profiler top CUDA kernels per pass (8,190)
    python3 experiments/bench/rcm_step.py --linear-ab      # + the JVP pass under PyTorch's linear rule vs ours
    python3 experiments/bench/rcm_step.py --islands-ab --variants sdpa_grad+compile+attention_only
                                                           # + the JVP pass, elementwise islands fused vs eager
    python3 experiments/bench/rcm_step.py --adamw-ab       # + one AdamW step: foreach, fused, one pass (1.3B student)
    python3 experiments/bench/rcm_step.py --graph-ab       # + a batch-1 no-grad forward, launched vs CUDA graph
    python3 experiments/bench/rcm_step.py --step-ab        # + the iterations, masters step off vs one pass
    python3 experiments/bench/rcm_step.py --host-reads     # + where an iteration makes the host wait, by line
    python experiments/bench/rcm_step.py --tiny            # CPU smoke run of the same code path

One process builds the networks once (random weights, width 1536, 30 blocks, 12 heads, text 512×4096, bf16
compute with an fp32 time path, fp32 master weights and AdamW state, per-block activation checkpointing for the
with-grad passes) and times every variant on the same state, switching the levers in place
(`rcm_core.networks.dit.set_attention` / `set_compile` / `set_recompute`, the same switches as `model.attention` /
`model.compile` / `model.activation_checkpointing`):

    baseline            attention fused (our Triton kernel for every pass), no compile
    sdpa_grad           PyTorch SDPA (cuDNN / flash) for the with-grad passes; the JVP pass keeps the fused kernel
    sdpa_grad+compile   the same + regional torch.compile of every DiT block (passes with a tangent run their
                        elementwise islands compiled, rcm_core.networks.tangent_islands; opt-in: --variants)
    sdpa, sdpa+compile  SDPA for every tangent-free pass, no-grad forwards included (opt-in: --variants)
    …+mm_only           selective recomputation in the with-grad passes instead of whole-block checkpointing:
                        matmul and SDPA outputs kept, the rest recomputed (opt-in: --variants)
    …+attention_only    the same keeping only the SDPA outputs (sdpa_grad+compile+attention_only: the levers
                        adopted in docs/BENCHMARKS.md, a default column; the others opt-in: --variants)
    …+off               no activation checkpointing in the with-grad passes: every activation kept (opt-in:
                        --variants; at 32,760 tokens one H200 runs out of memory, printed as such)

Every variant without a suffix checkpoints whole blocks (`activation_checkpointing: true`). A variant that runs
out of GPU memory is reported as such (with the peak it reached) and the run goes on with the next one.

Per variant and shape: ms of the teacher CFG forward (batch 2), one no-grad forward (batch 1), the JVP pass, a
flow-matching step (the unit of cost), an rCM student and critic iteration and their 1:4 mean, MFU (model FLOPs,
2 per MAC, over 989 TFLOP/s dense bf16), the JVP pass over one forward beside the same ratio in FLOPs
(`plan.jvp_flops`: 2.36 at 8,190 tokens, 2.70 at 32,760, what a JVP pass reaches when it runs as fast per FLOP as
the forward), student iteration over the flow-matching step, peak memory (over every pass — the flow-matching step
steps the student's own optimiser, so nothing is held that a run does not hold — and during the student and the
critic iteration alone, in a run's steady state and split at the optimiser step, set beside the planner's estimate
for the same variant and shape), and the warm-up calls' seconds, which
hold compilation and autotuning. A last column states issue 28's goal for each row that has one, and every cell
that meets it is marked ✓. The plain passes get one
warm-up call, then medians of `--reps` (3) synchronised calls. Iterations are timed at rollout length N = 2 and N = 3
(pinned through the student-iteration counter) and averaged: the N = 2.5 mean of training's 1..4 cycle, which the
FLOP counts assume; they need no warm-up (the passes before them ran every kernel and graph they use), and if a
graph compiles inside them anyway they are timed again. Every output is checked finite.

With $OUT set, writes there as each variant finishes (a cut-off run keeps what it measured):
rcm_step_levers.csv / .md (every number), step_table_<variant>.json (the planner's ms/FLOP table of that
variant: copied into docs/results/gpu/step_tables/, it times the plan rows run like it) and, with --profile,
profile_<shape>_<variant>.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import statistics
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rcm_core.config import ExperimentCfg, ModelCfg, OptimCfg
from rcm_core.data.latents import LatentBatch
from rcm_core.method.adamw import AdamW
from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.distill import adamw_kernel, build_state, distill_step
from rcm_core.method.losses import flow_matching_loss, scm_tangent_jvp
from rcm_core.networks import build_network
from rcm_core.networks.dit import set_attention, set_compile, set_recompute
from rcm_core.parallel.precision import MasterWeightOptimizer, with_master_weights
from rcm_core.parallel.mesh import MeshShape
from rcm_core.run.plan import Workload, count_params, forward_flops, held_state_bytes, jvp_flops, plan_mesh
from rcm_core.method.trigflow import add_noise

PEAK = 989e12
WAN_1P3B = dict(kind="dit", in_channels=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256,
                text_dim=4096, dtype="bfloat16", activation_checkpointing=True)
TINY = dict(kind="dit", in_channels=16, dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32,
            dtype="float32", activation_checkpointing=True)
# 32,760 tokens first: the issue's headline goal, and what a run cut off by a time limit should have measured.
SHAPES = {"32k": ("32,760 tokens (21×60×104 latent, 480p×81)", (16, 21, 60, 104), 512),
          "8k": ("8,190 tokens (21×30×52 latent)", (16, 21, 30, 52), 512)}
TINY_SHAPE = ("tiny", (16, 2, 8, 8), 8)
VARIANTS = {                    # name: (model.attention, model.compile, model.activation_checkpointing)
    "baseline": ("fused", "none", True),
    "sdpa_grad": ("sdpa_grad", "none", True),
    "sdpa_grad+compile": ("sdpa_grad", "blocks", True),
    "sdpa": ("sdpa", "none", True),
    "sdpa+compile": ("sdpa", "blocks", True),
    # SDPA in every tangent-free pass and the attention outputs kept: a compiled block without graph breaks in the
    # no-grad forwards (the fused kernel's call breaks it in three), against the fused kernel's faster attention
    "sdpa+compile+attention_only": ("sdpa", "blocks", "attention_only"),
    # issue 28, lever 3: selective recomputation (SDPA with grad, so the attention outputs can be kept)
    "sdpa_grad+mm_only": ("sdpa_grad", "none", "mm_only"),
    "sdpa_grad+compile+mm_only": ("sdpa_grad", "blocks", "mm_only"),
    "sdpa_grad+attention_only": ("sdpa_grad", "none", "attention_only"),
    "sdpa_grad+compile+attention_only": ("sdpa_grad", "blocks", "attention_only"),
    # no recomputation at all: fits one H200 at 8,190 tokens once a student step holds one graph at a time
    "sdpa_grad+off": ("sdpa_grad", "none", False),
    "sdpa_grad+compile+off": ("sdpa_grad", "blocks", False),
}
# The default columns: issue 28's baseline, what the Wan configs ship (the planner's step table) and the levers
# adopted together; the table marks every number that meets the issue's goal (GOALS).
DEFAULT_VARIANTS = "baseline,sdpa_grad,sdpa_grad+compile+attention_only"
# FLOPs of each pass in forwards (rows of the issue-9 table, kept so MFU columns compare across days): JVP ≈ 3
# forwards (exactly 2 + self-attention's share, plan.jvp_flops: 2.36-2.70 at 1.3B, so its MFU reads high); a
# with-grad forward+backward 3;
# a student iteration = sCM (teacher CFG 2, JVP 3, fwd+bwd 3) + DMD (rollout ≈ 2.5 forwards with the last one
# backed through, fake 1, teacher CFG 2, backward 2) ≈ 15.5; a critic iteration = rollout 2.5 + fake fwd+bwd 3.
FORWARDS = {"teacher_cfg": 2.0, "forward": 1.0, "jvp": 3.0, "fm_step": 3.0, "student": 15.5, "critic": 5.5,
            "mean_1_4": (15.5 + 4 * 5.5) / 5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int, check: str) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `reps` calls after it); the first call's output must be
    finite (it also holds compilation and autotuning, reported apart)."""
    sync(device)
    t0 = time.perf_counter()
    finite(check, fn())
    sync(device)
    first = time.perf_counter() - t0
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return first, statistics.median(out)


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def median_seconds(fn, device: torch.device, reps: int, check: str) -> float:
    """Median seconds of `reps` synchronised calls with no warm-up call; every output must be finite."""
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        out.append(time.perf_counter() - t0)
        finite(check, result)
    return statistics.median(out)


def peak_gib() -> float:
    """The CUDA allocator's peak since its last reset, GiB (NaN without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")


class StepPeaks:
    """Splits the allocator's peak of an iteration at its optimiser steps (the planner's two candidates): the
    peak outside them (forwards, backward, the EMA, and the moments after a step while its fp32 gradients are still
    held, until the next iteration frees them) and the steps' own (AdamW's state, and fp32 gradient copies where
    the step casts instead of taking one pass). Wraps
    each optimiser's `step` on the instance while open; `close` restores it. NaN off CUDA."""

    def __init__(self, device: torch.device, opts):
        self.cuda = device.type == "cuda"
        self.opts = [o for o in opts if o is not None]
        for opt in self.opts:
            opt.step = self._timed(opt.step)
        self.reset()

    def _timed(self, step):
        def wrapped(*args, **kwargs):
            self.graphs = max(self.graphs, peak_gib())
            self.reset(keep=True)
            out = step(*args, **kwargs)
            self.step = max(self.step, peak_gib())
            self.reset(keep=True)
            return out
        return wrapped

    def reset(self, keep: bool = False) -> None:
        if not keep:
            self.graphs = self.step = 0.0 if self.cuda else float("nan")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> tuple[float, float]:
        """(peak outside the steps, peak inside them) since the last `reset`, GiB."""
        self.graphs = max(self.graphs, peak_gib())
        return self.graphs, self.step

    def close(self) -> None:
        for opt in self.opts:
            del opt.step                # the class's method again


def finite(name: str, out) -> None:
    """Refuse to time NaN arithmetic (the 32,760-token rows of an earlier table did, unnoticed)."""
    vals = out.values() if isinstance(out, dict) else (out if isinstance(out, tuple) else (out,))
    for v in vals:
        if not torch.isfinite(torch.as_tensor(v)).all():
            raise RuntimeError(f"{name}: non-finite output; no time reported")


def build(cfg: ExperimentCfg, device: torch.device) -> TrigFlowDenoiser:
    with torch.device("meta"):
        net = build_network(cfg.model)
    net = net.to_empty(device=device)
    net.reset_parameters()
    for p in net.parameters():                 # off the zero init, so every path does real arithmetic
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite parameters after init: {bad[:5]}")
    return TrigFlowDenoiser(net, "rf_velocity")


def planned_gib(model: dict, variant: str, latent: tuple, L_text: int) -> float:
    """What `rcm_core.run.plan` says one GPU holds at the peak of an rCM iteration of this model, variant
    (attention, compile, recomputation) and shape at batch 1, GiB: the issue-28 memory bar compares the iterations'
    peaks with it."""
    attention, compile_mode, recompute = VARIANTS[variant]
    cfg = ExperimentCfg(model=ModelCfg(**{**model, "attention": attention, "compile": compile_mode,
                                          "activation_checkpointing": recompute}))
    cfg.data.batch_size = 1
    plan = plan_mesh(cfg, MeshShape(), gpus=1, gpu_memory=float("inf"), work=Workload.from_config(cfg, latent, L_text),
                     counts=count_params(cfg.model), checkpointing=recompute, table=None)
    return plan.total / 2 ** 30


class Bench:
    """The distillation state (teacher, student, fake score, EMA, optimisers) built once, timed per shape and lever."""

    def __init__(self, model: dict, device: torch.device):
        self.model = model
        self.cfg = ExperimentCfg(model=ModelCfg(**model))
        d = self.cfg.distill
        d.tangent_warmup, d.student_update_freq, self.cfg.teacher.guidance = 0, 2, 5.0
        self.device = device
        torch.manual_seed(0)
        self.teacher = build(self.cfg, device)
        self.state = build_state(self.cfg, self.teacher)
        self.nets = [self.teacher.net, self.state.student.net, self.state.fake.net]

    def set_variant(self, name: str) -> None:
        attention, compile_mode, recompute = VARIANTS[name]
        for net in self.nets:
            set_attention(net, attention)
            set_compile(net, compile_mode)
            set_recompute(net, recompute)

    def passes(self, latent: tuple, L_text: int) -> dict:
        """name → zero-argument callable running one pass on fixed inputs of this shape (batch 1)."""
        dev, st, cfg = self.device, self.state, self.cfg
        x0 = torch.randn(1, *latent, device=dev)
        ctx = torch.randn(1, L_text, cfg.model.text_dim, device=dev).to(self.teacher.net_dtype)
        batch = LatentBatch(latent=x0, cond=ctx)
        t = torch.full((1,), 0.9, dtype=torch.float64, device=dev)
        eps = torch.randn_like(x0)
        x_t = add_noise(x0, eps, t).float()
        F_T = torch.randn_like(x0).double()
        g = torch.Generator(device=dev).manual_seed(0)

        def teacher_cfg():
            with torch.no_grad():
                return self.teacher.F_guided(x_t, t, ctx, 5.0)

        def forward():            # one no-grad forward at batch 1 (rollout, fake score): the JVP ratio's unit
            with torch.no_grad():
                return st.student.F(x_t, t, ctx)

        def jvp():
            with torch.no_grad():
                return scm_tangent_jvp(st.student, x_t, t, ctx, F_T)

        def fm_step():
            # the student's own optimiser (a training run holds one per network; a second one here held ~10.6 GiB
            # of fp32 masters and moments at 1.3B that no run holds, and the bench's +off at 8K on 80 GB died of it)
            st.opt_student.zero_grad(set_to_none=True)
            loss = flow_matching_loss(st.student, x0, ctx, t=t, eps=eps).loss
            loss.backward()
            st.opt_student.step()
            return loss.detach()

        def phase(student: bool, rollout: int):
            st.iteration = 0 if student else 1          # student_update_freq 2: even iterations are student steps
            st.student_iter = rollout - 1               # rollout_length "cycle": N = student_iter % N_max + 1
            return distill_step(st, batch, cfg, g)

        # Iterations run at a fixed rollout length N (see `measure`); every other pass is plain.
        return {"teacher_cfg": teacher_cfg, "forward": forward, "jvp": jvp, "fm_step": fm_step,
                "student": lambda n=2: phase(True, n), "critic": lambda n=2: phase(False, n)}

    def measure(self, variant: str, latent: tuple, L_text: int, reps: int) -> dict:
        """One variant at one shape: every number of the table (ms, MFU %, ratios, GiB, warm-up s)."""
        self.set_variant(variant)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        L = math.prod(s // p for s, p in zip(latent[1:], self.cfg.model.patch_size))
        fwd = forward_flops(self.cfg.model, L, L, L_text)
        row: dict = {"variant": variant, "tokens": L, "text_len": L_text}
        first = 0.0
        passes = self.passes(latent, L_text)
        for name in ("teacher_cfg", "forward", "jvp", "fm_step"):
            warm, sec = timed(passes[name], self.device, reps, f"{variant} {name}")
            first += warm
            row[f"{name}_ms"] = sec * 1e3
        peaks = [self.peak_gib()]       # every pass so far; the iterations' own peaks below (what the planner plans)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        row["planned_gib"] = planned_gib(self.model, variant, latent, L_text)
        # A student / critic iteration's cost depends on the rollout length N (1..4, mean 2.5 in training): time
        # N = 2 and N = 3 and report their mean, the N = 2.5 cost the FLOP counts assume. The passes above already
        # ran every kernel, graph and autotune these iterations use; one untimed student and critic iteration
        # still runs first, for memory: each network's first AdamW step creates its moment (4 B/param), so before it
        # the other network is lighter than in any later iteration of a run; after both, the peaks below are
        # those of a run's steady state (the fake score at rest during the student's iteration, and vice versa).
        for name in ("student", "critic"):
            finite(f"{variant} {name} (first step)", passes[name](2))
        split = StepPeaks(self.device, (self.state.opt_student, self.state.opt_fake))
        for name in ("student", "critic"):
            split.reset()

            def run():
                return [median_seconds(lambda n=n: passes[name](n), self.device, reps, f"{variant} {name} N={n}")
                        for n in (2, 3)]
            graphs = compiled_graphs()
            per_n = run()
            if compiled_graphs() != graphs:         # a graph compiled inside a timed call: time them again
                print(f"  {variant} {name}: compiled a graph while timed; timing again", flush=True)
                per_n = run()
            row[f"{name}_ms"] = sum(per_n) / 2 * 1e3
            row[f"{name}_graphs_gib"], row[f"{name}_step_gib"] = split.read()
            row[f"{name}_peak_gib"] = max(row[f"{name}_graphs_gib"], row[f"{name}_step_gib"])
            peaks.append(row[f"{name}_peak_gib"])
        row["mean_1_4_ms"] = (row["student_ms"] + 4 * row["critic_ms"]) / 5
        for name, n_fwd in FORWARDS.items():
            row[f"{name}_mfu"] = n_fwd * fwd / (row[f"{name}_ms"] / 1e3) / PEAK * 100
        row["jvp_over_forward"] = row["jvp_ms"] / row["forward_ms"]
        row["jvp_flop_ratio"] = jvp_flops(self.cfg.model, L, L, L_text) / fwd      # the ratio at equal FLOP rates
        row["student_over_fm"] = row["student_ms"] / row["fm_step_ms"]
        row["peak_gib"] = max(peaks)
        row["iteration_over_planned"] = max(row["student_peak_gib"], row["critic_peak_gib"]) / row["planned_gib"]
        # What the states are, counted (the critic stepped last: the fake score with its gradients, the student at
        # rest, the same bytes as during a student iteration), and the rest of the peak: activations, temporaries
        row["states_gib"] = sum(held_state_bytes(self.state).values()) / 2 ** 30
        row["iteration_rest_gib"] = max(row["student_peak_gib"], row["critic_peak_gib"]) - row["states_gib"]
        row["warmup_s"] = first
        split.close()
        return row

    def peak_gib(self) -> float:
        return peak_gib() if self.device.type == "cuda" else float("nan")

    def profile(self, variant: str, latent: tuple, L_text: int, top: int) -> str:
        """torch.profiler table of the `top` kernels by device time for one call of each pass (already warm)."""
        from torch.profiler import ProfilerActivity, profile
        self.set_variant(variant)
        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        parts = []
        for name, fn in self.passes(latent, L_text).items():
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                fn()
                sync(self.device)
                wall_ms = (time.perf_counter() - t0) * 1e3
            label = f"{variant}: {name}" + (" (rollout N=2)" if name in ("student", "critic") else "")
            table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)
            parts.append(f"### {label}\n{busy_line(prof, wall_ms) if cuda else ''}{table}")
        return "\n\n".join(parts)


def busy_line(prof, wall_ms: float) -> str:
    """How much of a profiled call the GPU spent in kernels and copies: near 100 % the pass is bound by the GPU's
    work; far below, the GPU waited for the host to launch (a pass bound by Python, dynamo guards and launches,
    which CUDA graphs would remove). The wall time is under the profiler, which adds host time of its own."""
    from torch.autograd import DeviceType
    gpu_ms = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3
    return f"wall {wall_ms:.1f} ms under the profiler, GPU work {gpu_ms:.1f} ms: busy {gpu_ms / wall_ms * 100:.0f} %\n"


# ------------------------------------------------------------------------------------------------ output

ROWS = [("flow-matching step ms (unit of cost)", "fm_step_ms", ".0f"), ("  MFU %", "fm_step_mfu", ".1f"),
        ("rCM student iteration ms", "student_ms", ".0f"), ("  MFU %", "student_mfu", ".1f"),
        ("rCM critic iteration ms", "critic_ms", ".0f"), ("  MFU %", "critic_mfu", ".1f"),
        ("rCM iteration, 1 student : 4 critic (mean) ms", "mean_1_4_ms", ".0f"), ("  MFU %", "mean_1_4_mfu", ".1f"),
        ("teacher forward ×2 (CFG, batch 2) ms", "teacher_cfg_ms", ".0f"), ("  MFU %", "teacher_cfg_mfu", ".1f"),
        ("one forward (no grad, batch 1) ms", "forward_ms", ".0f"),
        ("JVP pass ms", "jvp_ms", ".0f"), ("  MFU %", "jvp_mfu", ".1f"),
        ("JVP pass / one forward", "jvp_over_forward", ".2f"),
        ("  the same in FLOPs (reached at equal FLOP rates)", "jvp_flop_ratio", ".2f"),
        ("student iteration / flow-matching step", "student_over_fm", ".2f"),
        ("peak memory GiB", "peak_gib", ".1f"), ("  during the student iteration", "student_peak_gib", ".1f"),
        ("    outside its optimiser steps (forwards, backward, EMA)", "student_graphs_gib", ".1f"),
        ("    in its optimiser steps (AdamW; fp32 gradient copies if it casts)", "student_step_gib", ".1f"),
        ("  during the critic iteration", "critic_peak_gib", ".1f"),
        ("    outside its optimiser steps (forwards, backward, EMA)", "critic_graphs_gib", ".1f"),
        ("    in its optimiser steps (AdamW; fp32 gradient copies if it casts)", "critic_step_gib", ".1f"),
        ("  the planner's estimate of an iteration (rcm_core.run.plan, one GPU, batch 1)", "planned_gib", ".1f"),
        ("  the larger iteration peak ÷ the planner's (bar: within 10 %)", "iteration_over_planned", ".2f"),
        ("  states held after the iterations (counted, rcm_core.run.plan.held_state_bytes)", "states_gib", ".1f"),
        ("  the larger iteration peak less those states (activations, temporaries)", "iteration_rest_gib", ".1f"),
        ("first calls s (compile, autotune)", "warmup_s", ".0f")]


# Issue 28's bars per shape: row key → (the goal as the issue words it, whether a value meets it). The tiny CPU
# shape has none. The planner's bar is "within 10 %" of the measured peak, either side.
_WITHIN_10 = ("within 10 %", lambda v: abs(v - 1) <= 0.10)
GOALS = {
    "32k": {"fm_step_mfu": ("≥ 45", lambda v: v >= 45), "mean_1_4_mfu": ("≥ 40 (moonshot 45)", lambda v: v >= 40),
            "jvp_over_forward": ("≤ 2.3", lambda v: v <= 2.3), "student_over_fm": ("≤ 3.5", lambda v: v <= 3.5),
            "iteration_over_planned": _WITHIN_10},
    "8k": {"fm_step_mfu": ("≥ 40", lambda v: v >= 40), "mean_1_4_mfu": ("≥ 30", lambda v: v >= 30),
           "jvp_over_forward": ("≤ 2.3", lambda v: v <= 2.3), "student_over_fm": ("≤ 3.5", lambda v: v <= 3.5),
           "iteration_over_planned": _WITHIN_10},
}


def markdown(title: str, rows: list[dict], goals: dict | None = None) -> str:
    """Metrics down, variants across; each cell after the first column also shows its change from the first. With
    `goals` (GOALS[shape]) a last column states issue 28's bar for that row and every cell that meets it is
    marked ✓ (a NaN, e.g. a peak on the CPU, meets nothing)."""
    goals = goals or {}
    head = "| " + title + " | " + " | ".join(r["variant"] for r in rows) + (" | goal (issue 28) |" if goals else " |")
    lines = [head, "|" + "---|" * (len(rows) + 1 + bool(goals))]
    for label, key, spec in ROWS:
        cells = []
        text, met = goals.get(key, ("", None))
        for r in rows:
            cell = format(r.get(key, math.nan), spec)      # rows of older runs lack the newer keys
            base = rows[0].get(key, math.nan)
            if r is not rows[0] and key.endswith("_ms") and base == base and base > 0:
                cell += f" ({(r[key] / base - 1) * 100:+.0f} %)"
            if met is not None and met(r.get(key, math.nan)):
                cell += " ✓"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {text} |" if goals else " |"))
    return "\n".join(lines)


def write_outputs(out: Path, results: dict, card: str, command: str, model: dict) -> None:
    """CSV and markdown of every row so far, and one planner step table per variant with both shapes."""
    flat = [r for rows in results.values() for r in rows]
    with open(out / "rcm_step_levers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["shape"] + list(flat[0].keys()))
        w.writeheader()
        for shape, rows in results.items():
            for r in rows:
                w.writerow({"shape": shape, **r})
    md = [f"Card: {card}; torch {torch.__version__}; {date.today().isoformat()}; `{command}`"]
    md += [markdown(SHAPES.get(s, TINY_SHAPE)[0], rows, GOALS.get(s)) for s, rows in results.items() if rows]
    (out / "rcm_step_levers.md").write_text("\n\n".join(md) + "\n")
    for variant in {r["variant"] for r in flat}:
        table = step_table(variant, [r for r in flat if r["variant"] == variant], model, card=card,
                           day=date.today().isoformat(), command=command, torch_version=torch.__version__)
        (out / step_table_name(variant)).write_text(json.dumps(table, indent=1) + "\n")


def step_table_name(variant: str) -> str:
    return f"step_table_{variant.replace('+', '_')}.json"


def step_table(variant: str, rows: list[dict], model: dict, *, card: str, day: str, command: str,
               torch_version: str) -> dict:
    """The planner's step table of one variant (`rcm_core.run.plan.read_step_table` reads it): its levers and, per
    token count, the student and critic iteration ms."""
    attention, compile_mode, recompute = VARIANTS[variant]
    return {"card": card, "date": day, "command": command, "torch": torch_version, "variant": variant,
            "model.attention": attention, "model.compile": compile_mode, "model.activation_checkpointing": recompute,
            "model": {**model, "activation_checkpointing": recompute}, "text_len": int(rows[0]["text_len"]),
            "rows": [{"tokens": int(r["tokens"]), "student_ms": round(float(r["student_ms"]), 1),
                      "critic_ms": round(float(r["critic_ms"]), 1)}
                     for r in sorted(rows, key=lambda r: int(r["tokens"]))]}


def interleaved_ab(arms: dict, device: torch.device, reps: int, what: str) -> dict:
    """Two arms (name → (a function returning a context manager, a call returning a tuple of tensors); the first
    arm is the product's path), in one process, interleaved call by call, the context entered outside the timing;
    their medians and the largest relative difference between their outputs."""
    outs, times = {}, {name: [] for name in arms}
    for rep in range(reps + 1):                     # call 0 of each arm is its warm-up
        for name, (context, call) in arms.items():
            with context():
                sync(device)
                t0 = time.perf_counter()
                outs[name] = call()
                sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
    (ours, a), (theirs, b) = ((n, outs[n]) for n in arms)
    finite(f"{what} ({ours} / {theirs})", a)
    diff = max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a, b))
    t_ours, t_theirs = (statistics.median(times[n]) * 1e3 for n in arms)
    return {"ours_ms": t_ours, "theirs_ms": t_theirs, "change_pct": (t_ours / t_theirs - 1) * 100,
            "bit_equal": all(torch.equal(x, y) for x, y in zip(a, b)), "max_rel_diff": diff}


def jvp_ab(bench: "Bench", variant: str, latent: tuple, L_text: int, reps: int, arms: dict) -> dict:
    """The JVP pass under two arms (name → a function returning a context manager; the first arm is the product's
    path), interleaved call by call; the largest relative difference between the two tangents."""
    bench.set_variant(variant)
    jvp = bench.passes(latent, L_text)["jvp"]
    return interleaved_ab({name: (arm, jvp) for name, arm in arms.items()}, bench.device, reps, "jvp")


@contextlib.contextmanager
def _linear_rule(rule):
    from rcm_core.networks import layers
    ours = layers.Linear.forward
    layers.Linear.forward = rule
    try:
        yield
    finally:
        layers.Linear.forward = ours


def linear_rule_ab(bench: "Bench", variant: str, latent: tuple, L_text: int, reps: int) -> dict:
    """`rcm_core.networks.layers.Linear`'s forward-mode rule (two matmuls per linear) against PyTorch's own (three:
    the weight's zero tangent materialised and multiplied); the tangents must agree to the bit (they differ by a
    matmul by zeros)."""
    from rcm_core.networks import layers
    ours = layers.Linear.forward
    return jvp_ab(bench, variant, latent, L_text, reps,
                  {"layers.Linear": lambda: _linear_rule(ours),
                   "PyTorch's rule": lambda: _linear_rule(torch.nn.Linear.forward)})


def islands_ab(bench: "Bench", variant: str, latent: tuple, L_text: int, reps: int) -> dict:
    """Under a compiled variant: the JVP pass with its elementwise islands fused (primal + tangent compiled,
    rcm_core/networks/tangent_islands.py) against the eager dual path (`tangent_islands.unfused()`); the two
    tangents differ by rounding only (different op orders in bf16/fp32)."""
    from rcm_core.networks import tangent_islands
    if "compile" not in variant:
        raise SystemExit(f"--islands-ab needs a compiled first variant (islands fuse under model.compile=blocks); "
                         f"got {variant!r}: put e.g. sdpa_grad+compile+attention_only first in --variants")
    return jvp_ab(bench, variant, latent, L_text, reps,
                  {"fused islands": contextlib.nullcontext, "eager dual": tangent_islands.unfused})


def graph_ab(bench: "Bench", variant: str, latent: tuple, L_text: int, reps: int) -> dict:
    """One batch-1 no-grad forward (the rollout's and the fake score's call) launched as the product launches it,
    against the same call captured once as a CUDA graph and replayed: what the host's launching costs the forward
    (lever 2's last clause, before building it into the product). CUDA only. The graph holds its inputs and output
    fixed (this pass's inputs are fixed tensors already); both arms must give the same output to the bit."""
    if bench.device.type != "cuda":
        raise SystemExit("--graph-ab needs a GPU (CUDA graphs)")
    bench.set_variant(variant)
    forward = bench.passes(latent, L_text)["forward"]
    for _ in range(2):                  # compile and autotune now: nothing may compile or tune inside the capture
        forward()
    side = torch.cuda.Stream()          # the warm-up call of the capture runs on a side stream, as PyTorch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward()

    def replay():                       # the replay rewrites `captured`: keep this call's output apart
        graph.replay()
        return (captured.clone(),)
    return interleaved_ab({"CUDA graph": (contextlib.nullcontext, replay),
                           "launched": (contextlib.nullcontext, lambda: (forward(),))}, bench.device, reps, "forward")


@contextlib.contextmanager
def _master_adamw_switch(mode: str):
    """RCM_KERNELS_MASTER_ADAMW=`mode` inside the block (read at each step), as it was after."""
    before = os.environ.get("RCM_KERNELS_MASTER_ADAMW")
    os.environ["RCM_KERNELS_MASTER_ADAMW"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RCM_KERNELS_MASTER_ADAMW")
        else:
            os.environ["RCM_KERNELS_MASTER_ADAMW"] = before


def step_switch_ab(bench: "Bench", variant: str, latent: tuple, L_text: int, reps: int) -> dict:
    """The student and the critic iteration (N = 2) with the one-GPU masters step as the product runs it
    (RCM_KERNELS_MASTER_ADAMW=on: one kernel from the bf16 gradients, which zeroes and counts non-finite entries
    itself, so no host sync before the step) against the check and the casting step (off), interleaved call by
    call in one process: the machine's drift falls on both arms alike (on the twenty-eighth session's H100 the
    same forward read 84–163 ms across processes, more than the change). Both arms step one training state.
    Per pass, the median ms of each arm; `one_pass`: whether this network steps in one pass at all (a float32
    network, the CPU's unfused AdamW, or β₁ ≠ 0 does not: then both arms run the same path)."""
    bench.set_variant(variant)
    passes = bench.passes(latent, L_text)
    opt = bench.state.opt_student
    out = {"one_pass": isinstance(opt, MasterWeightOptimizer) and opt.counts_nonfinite()}
    for name in ("student", "critic"):
        times = {"on": [], "off": []}
        for rep in range(reps + 1):                     # call 0 of each arm is its warm-up
            # on, off, off, on, …: each arm runs as often first as second after a switch (the first H100 run,
            # fixed order, read the student +5.5 % and the critic −1.8 %)
            for arm in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                seconds = times[arm]
                with _master_adamw_switch(arm):
                    sync(bench.device)
                    t0 = time.perf_counter()
                    result = passes[name](2)
                    sync(bench.device)
                finite(f"{variant} {name} (RCM_KERNELS_MASTER_ADAMW={arm})", result)
                if rep:
                    seconds.append(time.perf_counter() - t0)
        out[name] = {arm: statistics.median(seconds) * 1e3 for arm, seconds in times.items()}
        out[name + "_calls"] = {arm: [round(t * 1e3) for t in seconds] for arm, seconds in times.items()}
    out["mean_1_4"] = {arm: (out["student"][arm] + 4 * out["critic"][arm]) / 5 for arm in ("on", "off")}
    return out


class _HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value, by the project source line that asked: scalar
    reads (`.item()`, `int()`, `float()`, `bool()` of a tensor: aten `_local_scalar_dense`), `nonzero` (boolean
    indexing, masked_select) and copies to the CPU. On a GPU each one on a CUDA tensor is a host sync; on the CPU
    the same lines are counted (so `--tiny` shows where a GPU run would sync), with the device they read."""

    def __init__(self):
        super().__init__()
        self.counts: dict[tuple[str, str, str], int] = {}

    @staticmethod
    def _line() -> str:
        root = str(Path(__file__).resolve().parents[2]) + os.sep
        ours = [f for f in traceback.extract_stack()
                if f.filename.startswith(root) and os.sep + ".venv" + os.sep not in f.filename
                and not f.filename.endswith("rcm_step.py")]
        return f"{ours[-1].filename[len(root):]}:{ours[-1].lineno}" if ours else "(outside the project)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        to_cpu = name in ("_to_copy", "copy_") and src is not None and (
            (name == "_to_copy" and str((kwargs or {}).get("device", src.device)) == "cpu" and src.device.type != "cpu")
            or (name == "copy_" and src.device.type == "cpu" and isinstance(args[1], torch.Tensor)
                and args[1].device.type != "cpu"))
        if name in ("_local_scalar_dense", "nonzero") or to_cpu:
            device = (args[1] if name == "copy_" else src).device.type if src is not None else "?"
            key = (self._line(), name, device)
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def host_reads(bench: Bench, variant: str, latent: tuple, L_text: int) -> list[tuple[str, str, str, str, int]]:
    """(pass, source line, op, device, count) for one student and one critic iteration (N = 2) after a warm-up
    call of each: where an iteration makes the host wait (issue 28's lever 6)."""
    bench.set_variant(variant)
    passes = bench.passes(latent, L_text)
    rows = []
    for name in ("student", "critic"):
        passes[name](2)
        with _HostReads() as reads:
            passes[name](2)
        rows += [(name, *key, n) for key, n in sorted(reads.counts.items(), key=lambda kv: -kv[1])]
    return rows


def adamw_ab(params: list[torch.nn.Parameter], device: torch.device, reps: int, seed: int = 0) -> dict:
    """One AdamW step (rCM's settings; fp32 masters where the parameters are bf16, as in training) three ways,
    interleaved step by step on the same gradients: PyTorch's foreach path (its default on a GPU before
    `distill.adamw_kernel`), its fused kernel (casts, fused AdamW, refresh: the product's step before
    `kernels.master_adamw`), and the product's step now (`rcm_core.method.adamw.AdamW`, fused: one pass from the
    bf16 gradients, counting non-finite entries as `distill` asks it to). Each arm steps its own copy of the
    parameters (so its own masters and moments), compared after the last step; each step is handed the gradients
    again (the masters' step frees them). Memory: three copies with their optimisers (~12-14 B per parameter each
    at bf16), freed on return."""
    cfg = OptimCfg()
    g = torch.Generator(device=device).manual_seed(seed)
    grads = [(torch.randn(p.shape, generator=g, device=device) * 1e-3).to(p.dtype) for p in params]

    def arm(cls, flags: dict):
        own = [p.detach().clone().requires_grad_(True) for p in params]
        opt = with_master_weights(own, lambda ps: cls(
            ps, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps, **flags))
        return own, opt, (opt.master_parameters() if isinstance(opt, MasterWeightOptimizer) else own)

    arms = {"foreach": arm(torch.optim.AdamW, {"foreach": True}), "fused": arm(torch.optim.AdamW, {"fused": True}),
            "one_pass": arm(AdamW, {"fused": True})}
    times = {name: [] for name in arms}
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    for rep in range(reps + 1):                     # step 0 of each arm allocates its moments: not timed
        for name, (own, opt, _) in arms.items():
            for p, grad in zip(own, grads):
                p.grad = grad
            counts = name == "one_pass" and isinstance(opt, MasterWeightOptimizer) and opt.counts_nonfinite()
            sync(device)
            t0 = time.perf_counter()
            if counts:                              # as `distill` steps it: non-finite entries counted on the device
                opt.step(nonfinite=nonfinite)
            else:
                opt.step()
            sync(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
    fused, bf16 = adamw_kernel(params).get("fused"), any(p.dtype == torch.bfloat16 for p in params)
    out = {"params": sum(p.numel() for p in params),
           "product": ("one pass" if bf16 else "fused") if fused else "PyTorch's default"}
    for name, (_, _, masters) in arms.items():
        out[f"{name}_ms"] = statistics.median(times[name]) * 1e3
        finite(f"AdamW masters ({name})", tuple(m.detach() for m in masters))
    if int(nonfinite):
        raise RuntimeError(f"AdamW A/B: {int(nonfinite)} non-finite gradient entries counted in finite gradients")
    for name in ("fused", "one_pass"):
        out[f"{name}_max_rel_diff"] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                                          for a, b in zip(arms[name][2], arms["foreach"][2]))
    out["change_pct"] = (out["fused_ms"] / out["foreach_ms"] - 1) * 100
    out["one_pass_change_pct"] = (out["one_pass_ms"] / out["fused_ms"] - 1) * 100
    for own, _, _ in arms.values():
        for p in own:
            p.grad = None
    del arms
    grads.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny shape")
    # 3 by default: one timed call at 8,190 tokens moved by ±10-20 % (the no-grad forward read 73-115 ms), medians
    # of three by ±5 % between runs (docs/BENCHMARKS.md); a quick look passes --reps 1
    ap.add_argument("--reps", type=int, default=3, help="timed calls per pass after the warm-up call")
    ap.add_argument("--only", choices=list(SHAPES), help="run one of the two shapes")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, first is the reference column (of {', '.join(VARIANTS)})")
    ap.add_argument("--profile", action="store_true", help="profile every pass per variant at --profile-shape")
    ap.add_argument("--profile-shape", choices=list(SHAPES), default="8k")
    ap.add_argument("--profile-top", type=int, default=12, help="kernels per pass in the profile tables")
    ap.add_argument("--linear-ab", action="store_true",
                    help="first, per shape: the JVP pass with layers.Linear's rule against PyTorch's (first variant)")
    ap.add_argument("--islands-ab", action="store_true",
                    help="first, per shape: the JVP pass with its elementwise islands fused against the eager dual "
                         "path (the first variant, which must be compiled)")
    ap.add_argument("--graph-ab", action="store_true",
                    help="first, per shape: a batch-1 no-grad forward launched against the same call replayed from a "
                         "CUDA graph (the first variant; GPU only)")
    ap.add_argument("--adamw-ab", action="store_true",
                    help="first: one AdamW step on the student's parameters: foreach, fused, and the product's one "
                         "pass (shape-free)")
    ap.add_argument("--step-ab", action="store_true",
                    help="first, per shape: the student and critic iterations with RCM_KERNELS_MASTER_ADAMW off "
                         "against on (the product), interleaved call by call (the first variant)")
    ap.add_argument("--host-reads", action="store_true",
                    help="first, per shape: count the host syncs (scalar reads, nonzero, copies to the CPU) of one "
                         "student and one critic iteration by source line (variant sdpa_grad: eager, since a "
                         "dispatch mode would run compiled blocks op by op and may recompile them)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new variant after this many seconds (0: no limit); the tables still print")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    return args


class Clock:
    """Seconds since the run began, for the progress lines and --budget-s."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        print(f"[{self():.0f} s] {text}", flush=True)


def run_adamw_ab(bench: Bench, reps: int, clock: Clock) -> str:
    """--adamw-ab: the A/B table's row."""
    ab = adamw_ab(list(bench.state.student.parameters()), bench.device, max(reps, 3))
    kept = "fp32 masters" if bench.model["dtype"] == "bfloat16" else "fp32 parameters"
    clock.say(f"AdamW step: foreach {ab['foreach_ms']:.1f} ms → fused {ab['fused_ms']:.1f} ms → one pass "
              f"{ab['one_pass_ms']:.1f} ms; masters max rel diff from foreach {ab['fused_max_rel_diff']:.1e}, "
              f"{ab['one_pass_max_rel_diff']:.1e}")
    return (f"| AdamW step, student ({ab['params'] / 1e6:,.1f} M parameters, {kept}), median of "
            f"{max(reps, 3)} interleaved | {ab['foreach_ms']:.1f} | {ab['fused_ms']:.1f} | {ab['one_pass_ms']:.1f} "
            f"| {ab['change_pct']:+.1f} % | {ab['one_pass_change_pct']:+.1f} % | {ab['fused_max_rel_diff']:.1e} / "
            f"{ab['one_pass_max_rel_diff']:.1e} | {ab['product']} |")


def run_pass_abs(args, bench: Bench, shapes: dict, clock: Clock) -> list[str]:
    """--step-ab / --linear-ab / --islands-ab / --graph-ab on the first variant, per shape: the A/B table's rows (a
    failed arm, e.g. a capture that meets a host sync, is a row that says so; the rest is still timed)."""
    abs_ = [("linear rule: PyTorch's → layers.Linear", linear_rule_ab)] if args.linear_ab else []
    abs_ += [("islands: eager dual → fused", islands_ab)] if args.islands_ab else []
    abs_ += [("no-grad forward, batch 1: launched → CUDA graph", graph_ab)] if args.graph_ab else []
    lines = run_step_ab(bench, args.variants[0], shapes, max(args.reps, 3), clock) if args.step_ab else []
    for what, ab_fn in abs_:
        for key, (title, latent, L_text) in shapes.items():
            try:
                ab = ab_fn(bench, args.variants[0], latent, L_text, max(args.reps, 3))
            except RuntimeError as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                lines.append(f"| {what} | {title} | failed: {first[:160]} | | | | |")
                clock.say(f"{key} {what}: failed: {first}")
                continue
            lines.append(f"| {what} | {title} | {ab['theirs_ms']:.0f} | {ab['ours_ms']:.0f} | "
                         f"{ab['change_pct']:+.1f} % | {ab['bit_equal']} | {ab['max_rel_diff']:.1e} |")
            clock.say(f"{key} {what}: {ab['theirs_ms']:.0f} → {ab['ours_ms']:.0f} ms, outputs bit-equal "
                      f"{ab['bit_equal']}, max rel diff {ab['max_rel_diff']:.1e}")
    return lines


def run_step_ab(bench: Bench, variant: str, shapes: dict, reps: int, clock: Clock) -> list[str]:
    """--step-ab, per shape: three rows of the A/B table (student, critic, their 1:4 mean)."""
    lines = []
    for key, (title, latent, L_text) in shapes.items():
        ab = step_switch_ab(bench, variant, latent, L_text, reps)
        what = ("one-GPU step: check + casts → one pass, no sync" if ab["one_pass"] else
                "one-GPU step switch (this network has no one-pass step: both arms run one path)")
        for name, label in (("student", "student iteration"), ("critic", "critic iteration"),
                            ("mean_1_4", "1 student : 4 critic mean")):
            off, on = ab[name]["off"], ab[name]["on"]
            lines.append(f"| {what}, {label} | {title} | {off:.0f} | {on:.0f} | {(on / off - 1) * 100:+.1f} % "
                         f"| – (both arms step one state) | – |")
        clock.say(f"{key} step A/B: 1:4 mean {ab['mean_1_4']['off']:.0f} → {ab['mean_1_4']['on']:.0f} ms "
                  f"(one pass here: {ab['one_pass']}); calls in ms, student {ab['student_calls']}, "
                  f"critic {ab['critic_calls']}")
    return lines


def run_host_reads(bench: Bench, shapes: dict, clock: Clock) -> list[str]:
    """--host-reads, per shape: the host-read table's rows."""
    lines = []
    for key, (title, latent, L_text) in shapes.items():
        rows = host_reads(bench, "sdpa_grad", latent, L_text)     # eager: compile is not what syncs
        lines += [f"| {title} | {p} | `{line}` | {op} | {dev} | {n} |" for p, line, op, dev, n in rows]
        clock.say(f"{key} host reads: " + ", ".join(f"{p} {sum(r[-1] for r in rows if r[0] == p)}"
                                                    for p in ("student", "critic")))
    return lines


def measure_or_oom(bench: Bench, variant: str, latent: tuple, L_text: int, reps: int) -> dict | str:
    """One variant's row, or the line saying it ran out of GPU memory (a measurement too: a selective mode may not
    fit at 32,760 tokens, docs/BENCHMARKS.md), after freeing what the failed iteration held."""
    try:
        return bench.measure(variant, latent, L_text, reps)
    except torch.OutOfMemoryError:
        pass                # handled here, once the exception (and the frames holding tensors) is gone
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    for net in bench.nets:
        net.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return f"out of memory, peak {peak:.1f} GiB"


def run_variants(args, bench: Bench, shapes: dict, clock: Clock, out: Path | None, card: str,
                 command: str) -> tuple[dict, list[str], list[str]]:
    """Every variant at every shape: (rows by shape, profile texts, out-of-memory lines). With $OUT the files are
    written as each variant finishes."""
    results: dict[str, list[dict]] = {}
    profiles, oom = [], []
    for key, (title, latent, L_text) in shapes.items():
        results[key] = []
        for variant in args.variants:
            if args.budget_s and clock() > args.budget_s:
                clock.say(f"{key} {variant}: skipped (--budget-s {args.budget_s:.0f})")
                continue
            row = measure_or_oom(bench, variant, latent, L_text, args.reps)
            if isinstance(row, str):
                clock.say(f"{key} {variant}: OUT OF MEMORY ({row.split(', ')[1]} before the failed allocation)")
                oom.append(f"{key} {variant}: {row}")
                continue
            results[key].append(row)
            clock.say(f"{key} {variant}: fm {row['fm_step_ms']:.0f} ms, mean 1:4 {row['mean_1_4_ms']:.0f} ms "
                      f"({row['mean_1_4_mfu']:.1f} % MFU), first calls {row['warmup_s']:.0f} s")
            if args.profile and key in (args.profile_shape, "tiny"):
                text = bench.profile(variant, latent, L_text, args.profile_top)
                profiles.append(text)
                if out:
                    (out / f"profile_{key}_{variant.replace('+', '_')}.txt").write_text(text + "\n")
            if out:
                write_outputs(out, results, card, command, bench.model)
    return results, profiles, oom


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shapes = {"tiny": TINY_SHAPE} if args.tiny else {k: v for k, v in SHAPES.items() if args.only in (None, k)}
    # Every variant × shape × grad mode × batch (CFG doubles it) is its own static graph: lift dynamo's
    # recompile limit so none of them silently falls back to eager.
    dyn = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, limit, max(getattr(dyn, limit), 64))
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    command = "python3 experiments/bench/rcm_step.py " + " ".join(sys.argv[1:])
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    print(f"device {card}, torch {torch.__version__}, variants {args.variants}, reps {args.reps}", flush=True)
    clock = Clock()
    bench = Bench(TINY if args.tiny else WAN_1P3B, device)
    clock.say("networks built")
    adamw_line = run_adamw_ab(bench, args.reps, clock) if args.adamw_ab else None
    ab_lines = run_pass_abs(args, bench, shapes, clock)
    read_lines = run_host_reads(bench, shapes, clock) if args.host_reads else []
    results, profiles, oom = run_variants(args, bench, shapes, clock, out, card, command)

    for text in profiles:          # the profiles first, the tables last (a log tail shows the tables)
        print("\n" + text)
    print(f"\n# rCM iteration by lever: {card}, torch {torch.__version__}, batch 1, {bench.model['dtype']}, "
          f"median of {args.reps} timed call(s) per pass (iterations: mean of rollout N = 2 and 3), "
          f"total {clock():.0f} s")
    for key, rows in results.items():
        if rows:
            print("\n" + markdown(shapes[key][0], rows, GOALS.get(key)))
    if ab_lines:
        print(f"\n| A/B ({args.variants[0]}), median of {max(args.reps, 3)} interleaved calls | shape | before ms "
              f"| after ms | change | outputs bit-equal | max rel diff |\n|---|---|---|---|---|---|---|\n"
              + "\n".join(ab_lines))
    if read_lines:
        print(f"\n| host reads (sdpa_grad, one iteration each) | pass | source line | op | tensor on | count |\n"
              "|---|---|---|---|---|---|\n" + "\n".join(read_lines))
    if adamw_line:
        print("\n| A/B | foreach ms | fused ms | one pass ms | fused vs foreach | one pass vs fused | masters max rel "
              "diff from foreach (fused / one pass) | make_optimizer here |\n|---|---|---|---|---|---|---|---|\n"
              + adamw_line)
    for line in oom:
        print(line)
    if out and oom:
        (out / "rcm_step_oom.txt").write_text("\n".join(oom) + "\n")


if __name__ == "__main__":
    main()
