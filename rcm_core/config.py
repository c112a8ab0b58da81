"""Run configuration: dataclasses + YAML + dotted overrides, strict about every key and type.

Merge order (lingua style): dataclass defaults → `--config FILE` (YAML) → overrides `section.key=value`.
An unknown key, a wrong type or an impossible value raises `ConfigError` naming the key, the source
and the fix, before any work starts. The resolved config is written beside every run (`save_resolved`).

    python -c "from rcm_core.config import load_config; print(load_config('experiments/debug_cpu.yaml'))"
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the key, where it came from and how to fix it."""


# ----------------------------------------------------------------------------------------------------------
# Sections. Comments give the rCM paper / official-code value where one exists (reference/rcm_method.md).

@dataclass(kw_only=True)
class ModelCfg:
    kind: Literal["dit", "mlp"] = "dit"     # dit: Wan2.1-layout video DiT; mlp: small net for vector toys
    in_channels: int = 16                   # latent channels C
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw), Wan2.1 uses 1×2×2
    dim: int = 64                           # model width (Wan2.1-1.3B: 1536, 14B: 5120)
    ffn_dim: int = 256                      # (1.3B: 8960, 14B: 13824)
    num_heads: int = 4                      # (1.3B: 12, 14B: 40)
    num_layers: int = 2                     # (1.3B: 30, 14B: 40)
    freq_dim: int = 256                     # sinusoidal time-embedding width
    time_scale: float = 10.0                # rf_velocity time input k·s to the sinusoid; Wan's released weights
                                            # expect 1000 (its presets set it), teachers trained here use 10:
                                            # at 1000 their F(t) keeps ripples that sCM's JVP amplifies (issue 18,
                                            # experiments/bench/time_scale_study.py)
    text_dim: int = 32                      # width of the conditioning sequence (umT5: 4096)
    num_classes: int = 0                    # >0: integer labels map to a learned conditioning sequence
    label_tokens: int = 4                   # tokens per class label when num_classes > 0
    eps: float = 1e-6                       # norm epsilon
    hidden: int = 256                       # mlp only: width
    depth: int = 4                          # mlp only: residual blocks
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"   # parameter / compute dtype
    # dit, with-grad passes: what the backward recomputes instead of keeping (long video latents; the no-grad JVP
    # pass keeps nothing either way). false = keep every activation; true = keep each block's input, recompute the
    # whole block; mm_only = keep the outputs of the block's matmuls (linear layers) and attention calls, recompute
    # the elementwise work between them (norms, modulation, RoPE, GELU; the official 14B runs' "mm_only");
    # attention_only = keep the attention outputs, recompute the rest. The two selective modes save attention
    # only where it runs as PyTorch SDPA (model.attention sdpa_grad/sdpa): the fused kernel's forward is recomputed.
    activation_checkpointing: Literal[False, True, "mm_only", "attention_only"] = False
    causal: bool = False                    # dit: block-causal student over chunks of latent frames (Causal rCM);
                                            # no extra weights, so the same (Wan) checkpoints load
    first_chunk_t: int = 1                  # latent frames of the first chunk (official presets 1-1, 3-3, 1-4)
    chunk_t: int = 1                        # latent frames of every later chunk
    # dit, issue 28: which kernel runs attention calls that carry no tangent. fused = our Triton kernel for
    # every pass; sdpa_grad = PyTorch SDPA (cuDNN / flash on CUDA) for the with-grad passes; sdpa = SDPA for every
    # tangent-free pass, no-grad forwards too. The JVP pass always runs the fused forward+JVP kernel.
    attention: Literal["fused", "sdpa_grad", "sdpa"] = "fused"
    # dit: "blocks" = regional torch.compile of the transformer block (one graph shared by every block and copy);
    # passes with a forward-mode tangent stay eager (inductor drops dual tensors' tangents, torch 2.13).
    compile: Literal["none", "blocks"] = "none"


@dataclass(kw_only=True)
class TeacherCfg:
    # How the raw network's output is read; every teacher is presented as a TrigFlow F-predictor.
    parametrization: Literal["rf_velocity", "edm_eps", "edm_x0", "trigflow"] = "rf_velocity"
    checkpoint: str = ""                    # teacher weights: our .pt, or a Wan2.1 checkpoint (original or diffusers
                                            # layout: .safetensors / .pth / sharded index / folder); "" = train one
    negative_context: str = ""              # .npy or .pt [L, text_dim]: the negative-prompt embedding CFG uses as ∅
    guidance: float = 5.0                   # CFG scale w baked into teacher targets (Wan: 5.0, Cosmos: 4.5)
    train_steps: int = 2000                 # flow-matching steps when the teacher is trained here
    train_lr: float = 1.0e-3
    train_batch_size: int = 128
    cond_dropout: float = 0.1               # label dropout so CFG has an unconditional branch
    ema_sigma_rel: float = 0.05


@dataclass(kw_only=True)
class DistillCfg:
    # Which terms the student minimises: rcm = sCM + λ·DMD, scm, dmd, dcm (discrete-time CM, no JVP) and
    # dcm_dmd = dCM + λ·DMD (official cm_type=dcm). Each is the same code with a term swapped or off.
    # Causal rCM (model.causal=true; official training_type): tf (teacher-forcing diffusion fine-tune with the
    # clean context), df (diffusion forcing: one time per chunk), tf_dcm / tf_scm (teacher-forcing consistency
    # from a causal teacher), sf_dmd (self-forcing DMD: bidirectional teacher + fake score on student rollouts).
    mode: Literal["rcm", "scm", "dmd", "dcm", "dcm_dmd", "tf", "df", "tf_dcm", "tf_scm", "sf_dmd"] = "rcm"
    scm_loss_scale: float = 100.0           # official code's loss_scale
    reg_weight: float = 0.01                # λ: DMD weight relative to sCM (code: DMD scale 1 = λ·100)
    tangent: Literal["jvp", "finite_difference"] = "jvp"
    fd_step: float = 1.0e-4                 # h for the semi-continuous tangent (paper §4.2)
    tangent_warmup: int = 1000              # H: pure-consistency iterations before DMD, r = min(1, i/H) (1.3B: 1000)
    warmup_variant: Literal["code", "paper"] = "code"   # code: r scales only the x_t term (issue #18)
    tangent_norm_c: float = 0.1             # ĝ = g / (‖g‖ + c)
    p_G_mean: float = -0.8                  # log tan t ~ N(mean, std²) for sCM times
    p_G_std: float = 1.6
    p_G_frame_shift: bool = True            # tan t = √T·z for video latents with T frames (Wan)
    p_D_shift: float = 5.0                  # shift-s RF schedule for DMD / critic / rollout times
    student_update_freq: int = 5            # 1 student step per F iterations, F−1 critic steps
    max_rollout_steps: int = 4              # N_max of the student rollout
    rollout_length: Literal["cycle", "uniform"] = "cycle"   # code cycles 1..N_max; paper draws uniformly
    dmd_weight_min: float = 1.0e-5          # clip of the mean-|x̂0 − x0_real| normaliser
    dcm_total_steps: int = 48               # dCM: N, Δu = 1/N on the shifted RF time grid (official default 48)
    dcm_skip: int = 1                       # dCM: k teacher Euler steps between the two times (official 1)
    dcm_shift: float = 5.0                  # dCM: RF time shift of that grid (official 5)
    student_checkpoint: str = ""            # the student's starting weights (a file of save_teacher, e.g. a tf_dcm
                                            # run's ema_student.pt, or Wan weights); "" = a copy of the teacher.
                                            # Causal recipe: sf_dmd starts from the tf_dcm/tf_scm student
    sf_steps_per_chunk: list[int] = field(default_factory=list)   # sf_dmd: most rollout steps per chunk, last
                                            # repeating, non-increasing (official [4, 2]); [] = max_rollout_steps
    sf_mid_t: list[list[float]] = field(default_factory=list)     # sf_dmd: intermediate TrigFlow times per chunk
                                            # entry (official RF [[15/16, 5/6, 5/8], [5/6]]); [] = sampler.mid_t
    chunk_context: Literal["clean", "last_step"] = "clean"   # causal: the context a chunk leaves (official
                                            # context_from_last_step): re-encoded at t = 0, or its last step's keys/
                                            # values at its longest schedule's last time (teacher forcing then
                                            # trains with the context noised to that time; evaluation streams so)
    last_step_from_chunk: int = 0           # chunk_context=last_step from this chunk on; earlier ones clean (official
                                            # context_from_last_step_start_chunk; its 2-step preset uses 1)


@dataclass(kw_only=True)
class OptimCfg:
    lr: float = 2.0e-6                      # student (Wan 1.3B)
    fake_lr: float = 4.0e-7                 # fake-score critic
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    eps: float = 1.0e-8
    lr_warmup: int = 100                    # linear warm-up iterations, then constant


@dataclass(kw_only=True)
class EMACfg:
    sigma_rel: float = 0.05                 # EDM2 power-EMA width (paper 0.05, code 0.1)


@dataclass(kw_only=True)
class SamplerCfg:
    sigma_max: float = 80.0                 # student starts at t = arctan σ_max
    mid_t: list[float] = field(default_factory=lambda: [1.3, 1.0, 0.6])   # paper's metric times
    step_counts: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_steps: int = 50
    teacher_solver: Literal["euler", "heun"] = "euler"
    teacher_shift: float = 5.0              # RF time shift of the teacher's ODE grid


@dataclass(kw_only=True)
class VideoCfg:                             # prepare_latents data.source=videos: clips → Wan2.1 VAE + umT5 latents
    clips: str = ""                         # folder or s3://… of clips (mp4/webm/mov/mkv/avi) and their captions
    captions: str = ""                      # manifest beside the clips: captions.jsonl {"file","caption"} or .csv
                                            # (file,caption); "" = that, else one <clip>.txt per clip
    encoders: str = ""                      # Wan2.1-T2V-*-Diffusers folder (vae/, text_encoder/, tokenizer/), or s3://
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # auto: bfloat16 on GPU, float32 on CPU
    frames: int = 81                        # pixel frames kept per clip (1 + 4k); shorter clips are skipped
    height: int = 480
    width: int = 832
    text_len: int = 512                     # umT5 tokens per caption, zero-padded (Wan: 512)
    fps: int = 16                           # frame rate of decoded samples (MP4/GIF); Wan2.1: 16
    channel_stats: Literal["vae", "dataset"] = "vae"   # what readers normalise with: the VAE config's latents_mean/
                                            # latents_std (Wan's own coordinates, what a Wan teacher expects) or
                                            # the statistics measured on these clips (always kept in source.measured)
    batch_size: int = 1                     # clips per VAE call
    vae_compile: bool = False               # torch.compile the VAE encoder: on an H200 (2026-12-03, bf16, 81×480×832)
                                            # 1,122 → 753 ms/clip, latent within 2.1e-2 of eager; costs a compile
                                            # per VAE actor at its first clip, so worth it for many clips
    vae_actors: int = 1                     # VAE actor pool size (one GPU each when the cluster has GPUs)
    text_actors: int = 1                    # umT5 actor pool size
    gpus_per_actor: float = -1              # -1: one GPU per actor if there are enough, else shared; 0 without


@dataclass(kw_only=True)
class DataCfg:
    source: Literal["gmm", "moving_fashion", "dataset", "precomputed", "videos"] = "gmm"   # videos: data.video
    url: str = ""                           # dataset: local folder or s3://bucket/prefix with manifest.json
    s3_endpoint: str = ""                   # "" = take AWS_ENDPOINT_URL / standard AWS variables
    batch_size: int = 64                    # global batch per optimiser update (the paper's batch)
    micro_batch_size: int = 0               # samples per GPU per forward/backward; the per-GPU batch
                                            # (batch_size / data-parallel groups) is accumulated over
                                            # per-GPU batch / micro_batch_size passes. 0 = the whole per-GPU
                                            # batch at once (no accumulation)
    num_rows: int = 4096                    # rows the built-in sources generate
    shuffle_seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    # --- added by the data layer (rcm_core/data/latents.py, workflows/prepare_latents.py) ---
    normalize: bool = True                  # readers hand out (x − channel_mean) / channel_std from the manifest
    rows_per_shard: int = 256               # prepare_latents: rows per Parquet shard (many small shards stream, P5)
    frames: int = 8                         # moving_fashion: T frames per video
    canvas: int = 32                        # moving_fashion: S×S pixels per frame
    item_size: int = 16                     # moving_fashion: the Fashion-MNIST item is resized to this
    patch: int = 4                          # moving_fashion: DCT patch p → latent [p², T, S/p, S/p] (4 → C=16)
    gmm_dim: int = 2                        # gmm: dimension D of the toy mixture → latent [D, 1, 1, 1]
    precomputed: str = ""                   # source=precomputed: .npz of latents (+ labels | cond), see prepare_latents
    seed: int = 0                           # generation seed of the built-in sources
    video: VideoCfg = field(default_factory=VideoCfg)   # source=videos (workflows/encode_videos.py)


@dataclass(kw_only=True)
class TrainCfg:
    steps: int = 200
    seed: int = 0
    device: str = "cpu"                     # cpu | cuda | cuda:N; under Ray the worker takes its assigned device,
                                            # and workflows refuse one that disagrees with resources.use_gpu
    checkpoint_every: int = 100
    keep_checkpoints: int = 2               # Ray Train keeps the newest N (older ones are deleted); while the next is
                                            # written N + 1 exist: plan.py prints their size
    eval_every: int = 0                     # 0 = evaluate only at the end
    log_every: int = 10
    run_dir: str = "runs/default"           # local: resolved config, checkpoint staging, eval table
    storage_path: str = ""                  # Ray Train run storage (folder or s3://…); "" = <run_dir>/../ray_results


@dataclass(kw_only=True)
class EvalCfg:
    num_samples: int = 512
    seed: int = 1234
    bootstrap: int = 200
    classifier_steps: int = 300             # workflows: steps of the frame classifier (rcm_core.eval.features) trained
                                            # once per labelled video/image data set, scoring `*_feat` and class_acc


@dataclass(kw_only=True)
class TrackingCfg:
    tracking_uri: str = ""                  # "" = MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db under the
                                            # current folder (workflows.tracking.tracking_uri)
    experiment: str = "rcm"
    run_name: str = ""


@dataclass(kw_only=True)
class ResourcesCfg:                         # read only by workflows/
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5            # fractional on small machines, or Ray Data starves (P6)
    gpus_per_worker: float = 1.0            # (how a run is sharded across workers: parallel.* below)


@dataclass(kw_only=True)
class ParallelCfg:                          # the device mesh inside a run (rcm_core.parallel.mesh, rcm_core.parallel.sharding)
    dp_replicate: int = -1                  # full replicas, gradients all-reduced (HSDP outer dim); -1 = the rest
    dp_shard: int = 1                       # FSDP2 shard size (>1 shards over dp_shard·cp ranks); -1 = the rest
    cp: int = 1                             # Ulysses context parallelism: must divide model.num_heads and the
                                            # latent token count; ranks of a CP group share batch, noise, times
                                            # (default = plain replicated data parallelism over all workers)


@dataclass(kw_only=True)
class ExperimentCfg:
    name: str = "rcm"
    model: ModelCfg = field(default_factory=ModelCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    ema: EMACfg = field(default_factory=EMACfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    resources: ResourcesCfg = field(default_factory=ResourcesCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)


# ----------------------------------------------------------------------------------------------------------
# Strict construction from plain data.

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; int→float is the only silent conversion."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        # Same value and type: 1 == True in Python, but a `1` given for a true/false/string key is a mistake.
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise ConfigError(f"{key}={value!r} in {source}: allowed values are {_type_name(tp)[7:]}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} in {source}: expected {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} in {source}: expected a list of {_type_name(item_tp)}, "
                              f"e.g. {key}=[1,2]")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} in {source}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} in {source}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} in {source}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} in {source}: expected a string")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} in {source}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key '{full}' in {source}; allowed keys"
                              f"{' under ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full, source)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "<dict>") -> ExperimentCfg:
    cfg = _build(ExperimentCfg, data, "", source)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value); the value is read as YAML so 1e-3, true and [1,2] work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value "
                          f"(e.g. distill.reg_weight=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(e)})") from None
    # YAML reads "1e-3" as a string (no dot); accept it as the number a user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value not in ("", ".") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = {path[-1]: value}
        for part in reversed(path[:-1]):
            node = {part: node}
        out = _merge(out, node)
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: "line 4, column 102: mapping values are not allowed here"."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass --config with a path under experiments/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}   # safe_load: configs can never construct objects
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not even text); pass a file under experiments/") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> ExperimentCfg:
    """Defaults → optional `base` dict → YAML file → dotted overrides, validated."""
    data = dict(base or {})
    source = "defaults"
    if path is not None:
        data = _merge(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} + overrides {overrides}"
    return from_dict(data, source)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys → values, for MLflow params and Tune search spaces."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(cfg: ExperimentCfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


# Keys a resumed run may change: how long it runs, how often it logs, evaluates and checkpoints, how it is
# evaluated (eval.*, sampler.*: neither touches training) and where its local files go. Every other key shapes the
# trajectory, so a run continues only with the values it started with (workflows/storage.py check_resume).
RESUME_FREE_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.run_dir",
                    "train.keep_checkpoints", "eval.", "sampler.")


def run_config_dict(cfg: ExperimentCfg) -> dict:
    """The config as a checkpoint records it: plain data, URL credentials redacted."""
    return _redacted(to_dict(cfg))


def resume_changes(saved: dict, cfg: ExperimentCfg) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Compare a checkpoint's config (`to_dict` form) with `cfg`: (keys that shape the run, free keys), each as
    dotted key -> (saved value, new value). A key only one side has counts as changed. Credentials in URLs are
    compared redacted, as checkpoints store them (`run_config_dict`)."""
    old, new = flatten(saved), flatten(run_config_dict(cfg))
    changed = {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
               if old.get(k, "<absent>") != new.get(k, "<absent>")}
    free = {k: v for k, v in changed.items() if k.startswith(RESUME_FREE_KEYS)}
    return {k: v for k, v in changed.items() if k not in free}, free


def show_changes(changes: dict[str, tuple]) -> str:
    """`key: old -> new; …`, the form resume messages and MLflow tags use."""
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_resume_config(saved: dict | None, cfg: ExperimentCfg, *, allow_changed: bool,
                        fixes: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """The resume check both paths share (through Ray: workflows/storage.py check_resume; without: python -m
    rcm_core.run --resume): `saved` is the checkpoint's recorded config (None: no checkpoint, {}: one written before
    configs were recorded). Returns (shaping, free) changes; raises ConfigError naming the shaping keys unless
    `allow_changed`. `fixes` says how to start afresh or force it on this path."""
    if saved is None:
        return {}, {}
    unknown = {"config": ("not recorded (a checkpoint from before configs were saved)", "this one")}
    shaping, free = resume_changes(saved, cfg) if saved else (unknown, {})
    if shaping and not allow_changed:
        raise ConfigError(f"run '{cfg.name}' has a checkpoint trained with another config ({show_changes(shaping)}), "
                          f"and running it again continues that run. {fixes}")
    return shaping, free


# `scheme://user:password@host` or `scheme://token@host`: the user-info part of a URL is a credential.
URL_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")


def redact_url(text: str) -> str:
    """`text` with the user-info of every URL in it replaced by `***` (for logs, printed lines, written configs)."""
    return URL_USERINFO.sub("***@", text)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def dump_yaml(cfg: ExperimentCfg) -> str:
    """The config as YAML for people and artifacts: credentials in URLs (a tracking URI with a token, an S3
    endpoint with keys) are redacted, so this text is not a way to rebuild a run's access."""
    return yaml.safe_dump(_redacted(to_dict(cfg)), sort_keys=False)


def save_resolved(cfg: ExperimentCfg, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config" / "resolved.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg))
    return path


# ----------------------------------------------------------------------------------------------------------
# Impossible values: caught here so no run starts with them.

def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is impossible: {fix}")


def validate(cfg: ExperimentCfg) -> None:
    m, d, s, o = cfg.model, cfg.distill, cfg.sampler, cfg.optim
    _require(cfg.teacher.guidance >= 0, "teacher.guidance", cfg.teacher.guidance,
             "use 0 for no guidance or a positive CFG scale such as 5.0")
    _require(d.max_rollout_steps >= 1, "distill.max_rollout_steps", d.max_rollout_steps,
             "N_max must be at least 1 (the paper uses 4)")
    _require(d.student_update_freq >= 1, "distill.student_update_freq", d.student_update_freq,
             "must be at least 1 (1 = no critic-only iterations; the paper uses 5)")
    _require(s.sigma_max > 0, "sampler.sigma_max", s.sigma_max, "must be positive (80 is typical)")
    _require(d.tangent_warmup >= 0, "distill.tangent_warmup", d.tangent_warmup, "must be ≥ 0")
    _require(d.tangent_norm_c > 0, "distill.tangent_norm_c", d.tangent_norm_c, "must be positive (0.1)")
    _require(d.fd_step > 0, "distill.fd_step", d.fd_step, "must be positive (1e-4)")
    _require(d.reg_weight >= 0, "distill.reg_weight", d.reg_weight, "λ must be ≥ 0 (paper: 0.01)")
    _require(d.p_G_std > 0, "distill.p_G_std", d.p_G_std, "must be positive (1.6)")
    _require(d.p_D_shift > 0, "distill.p_D_shift", d.p_D_shift, "must be positive (5.0)")
    _require(1 <= d.dcm_skip < d.dcm_total_steps, "distill.dcm_skip", d.dcm_skip,
             f"k must lie in [1, distill.dcm_total_steps={d.dcm_total_steps}) (official: 1 of 48)")
    _require(d.dcm_shift > 0, "distill.dcm_shift", d.dcm_shift, "must be positive (5.0)")
    _require(all(0 < t < 1.5707963 for t in s.mid_t), "sampler.mid_t", s.mid_t,
             "intermediate times must lie in (0, π/2), e.g. [1.3, 1.0, 0.6]")
    _require(all(n >= 1 for n in s.step_counts), "sampler.step_counts", s.step_counts,
             "each step count must be ≥ 1, e.g. [1, 2, 4]")
    _require(all(n - 1 <= len(s.mid_t) for n in s.step_counts), "sampler.step_counts", s.step_counts,
             f"a k-step sampler needs k−1 intermediate times; sampler.mid_t has {len(s.mid_t)}")
    _require(s.teacher_steps >= 1, "sampler.teacher_steps", s.teacher_steps, "must be ≥ 1")
    _require(len(m.patch_size) == 3 and all(p >= 1 for p in m.patch_size), "model.patch_size",
             m.patch_size, "give three positive integers (pt, ph, pw), e.g. [1, 2, 2]")
    _require(m.time_scale > 0, "model.time_scale", m.time_scale, "must be positive (Wan: 1000, trained here: 10)")
    _require(m.dim % m.num_heads == 0, "model.dim", m.dim,
             f"must be divisible by model.num_heads={m.num_heads}")
    _require(m.first_chunk_t >= 1 and m.chunk_t >= 1, "model.chunk_t", [m.first_chunk_t, m.chunk_t],
             "model.first_chunk_t and model.chunk_t count latent frames and must be ≥ 1 (official: 1 and 1)")
    _require(not m.causal or (m.kind == "dit" and m.patch_size[0] == 1), "model.causal", m.causal,
             "a block-causal network is the DiT with one latent frame per token frame: model.kind=dit, "
             "model.patch_size=[1, ph, pw]")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
             "give two values in [0, 1), e.g. [0.0, 0.999]")
    _require(o.lr > 0 and o.fake_lr > 0, "optim.lr", o.lr, "learning rates must be positive")
    _require(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "must be ≥ 1")
    _require(cfg.data.micro_batch_size >= 0, "data.micro_batch_size", cfg.data.micro_batch_size,
             "must be ≥ 0 (0 = no gradient accumulation)")
    _require(cfg.data.micro_batch_size == 0 or cfg.data.batch_size % cfg.data.micro_batch_size == 0,
             "data.micro_batch_size", cfg.data.micro_batch_size,
             f"must divide data.batch_size={cfg.data.batch_size} (and the per-GPU batch it gives)")
    _require(cfg.train.steps >= 0, "train.steps", cfg.train.steps, "must be ≥ 0")
    _require(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", cfg.train.keep_checkpoints,
             "must be ≥ 1 (a run resumes from its newest checkpoint; 2 keeps one more in case the newest is lost)")
    _require(cfg.eval.classifier_steps >= 1, "eval.classifier_steps", cfg.eval.classifier_steps,
             "the evaluation classifier needs at least 1 training step (default 300)")
    _require(cfg.resources.num_workers >= 0, "resources.num_workers", cfg.resources.num_workers,
             "must be ≥ 0 (0 = Ray Train local mode)")
    _require(0 <= cfg.teacher.cond_dropout < 1, "teacher.cond_dropout", cfg.teacher.cond_dropout,
             "must lie in [0, 1)")
    _require(cfg.ema.sigma_rel > 0 and cfg.ema.sigma_rel < 0.28, "ema.sigma_rel", cfg.ema.sigma_rel,
             "must lie in (0, 0.28) (EDM2 power-EMA; paper 0.05)")
    _validate_causal(cfg)
    _validate_parallel(cfg)
    if cfg.data.source == "dataset":
        _require(cfg.data.url != "", "data.url", cfg.data.url,
                 "data.source=dataset needs data.url (a folder or s3://bucket/prefix with manifest.json)")


CAUSAL_MODES = ("tf", "df", "tf_dcm", "tf_scm", "sf_dmd")


def _validate_causal(cfg: ExperimentCfg) -> None:
    """Causal modes train a block-causal network (the bidirectional modes refuse one in build_state: a config
    holding only a causal student's model section, as sample.py builds, stays valid)."""
    m, d = cfg.model, cfg.distill
    _require(m.causal or d.mode not in CAUSAL_MODES, "model.causal", m.causal,
             f"distill.mode={d.mode} trains a block-causal network: set model.causal=true")
    # sf_dmd's self-forcing rollout draws its re-noisings between the chunks' forwards, not up front for the whole
    # batch, so gradient accumulation could not split it into micro-batches with the whole batch's draws
    # (rcm_core.method.distill); tf, df, tf_scm and tf_dcm accumulate like the bidirectional modes.
    _require(d.mode != "sf_dmd" or cfg.data.micro_batch_size == 0, "data.micro_batch_size", cfg.data.micro_batch_size,
             "distill.mode=sf_dmd does not accumulate gradients (its rollout draws per chunk): use 0")
    _require(d.last_step_from_chunk >= 0, "distill.last_step_from_chunk", d.last_step_from_chunk,
             "a chunk index, ≥ 0 (0: every chunk leaves its last step's context)")
    s = d.sf_steps_per_chunk
    _require(all(n >= 1 for n in s) and all(a >= b for a, b in itertools.pairwise(s)), "distill.sf_steps_per_chunk", s,
             "give positive, non-increasing step counts, e.g. [4, 2] (4 for the first chunk, 2 after)")
    mids = d.sf_mid_t or [cfg.sampler.mid_t]
    for i, n in enumerate(s or [d.max_rollout_steps]):
        mid = mids[min(i, len(mids) - 1)]
        _require(len(mid) >= n - 1, "distill.sf_mid_t", d.sf_mid_t,
                 f"a {n}-step chunk needs {n - 1} intermediate times, entry {min(i, len(mids) - 1)} has {len(mid)}")


def _validate_parallel(cfg: ExperimentCfg) -> None:
    """Static mesh checks; rcm_core.parallel.mesh.check_shape repeats them at run time with the latent token count."""
    p, heads = cfg.parallel, cfg.model.num_heads
    legal_cp = [c for c in range(1, heads + 1) if heads % c == 0] if cfg.model.kind == "dit" else [1]
    for key in ("dp_replicate", "dp_shard"):
        value = getattr(p, key)
        _require(value >= 1 or value == -1, f"parallel.{key}", value, "must be ≥ 1, or -1 for the rest")
    _require(not (p.dp_replicate == -1 and p.dp_shard == -1), "parallel.dp_shard", p.dp_shard,
             "only one of parallel.dp_replicate and parallel.dp_shard may be -1")
    _require(p.cp in legal_cp, "parallel.cp", p.cp,
             f"Ulysses splits attention heads; legal cp sizes for model.kind={cfg.model.kind}, "
             f"model.num_heads={heads}: {legal_cp}")
    n = cfg.resources.num_workers
    if n < 1:
        return
    fixed = p.cp * max(p.dp_replicate, 1) * max(p.dp_shard, 1)      # the product of the sizes that are not -1
    if -1 in (p.dp_replicate, p.dp_shard):
        ok, have = n % fixed == 0, f"the fixed sizes' product {fixed} must divide it"
    else:
        ok, have = fixed == n, f"dp_replicate·dp_shard·cp = {p.dp_replicate}·{p.dp_shard}·{p.cp} = {fixed} ranks"
    legal = [(r, n // (r * c), c) for c in legal_cp if n % c == 0 for r in range(1, n // c + 1) if (n // c) % r == 0]
    _require(ok, "resources.num_workers", n, f"{have}; legal (dp_replicate, dp_shard, cp) for {n} workers: {legal}")
