"""Flow-matching training of a teacher, because no teacher weights can be downloaded here.

The teacher is the project's own backbone trained as a rectified-flow velocity model (Wan's convention,
so the same `rf_velocity` wrapper serves it and a real Wan2.1 checkpoint), with label dropout so
classifier-free guidance has an unconditional branch, and an EDM2 power-EMA whose weights are the teacher.
Trained teachers are cached by a hash of everything that shapes them (`teacher_key`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import json
import textwrap
import warnings
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from rcm_core.config import ExperimentCfg, to_dict
from rcm_core.data.latents import LatentBatch
from rcm_core.method.denoiser import RF_TIMESTEP_SCALE, TrigFlowDenoiser
from rcm_core.method.ema import PowerEMA
from rcm_core.method.losses import flow_matching_loss
from rcm_core.networks import build_network, check_label_path
from rcm_core.method.trigflow import rf_to_trig


RUNTIME_MODEL_FIELDS = {"dtype", "activation_checkpointing", "causal", "first_chunk_t", "chunk_t"}
# The attention pattern is a switch, not weights: a teacher trained here is bidirectional whatever the student is
# (the causal teacher of Causal rCM is a `tf`/`df` run's student), so these never enter its cache key.
CAUSAL_MODEL_FIELDS = ("causal", "first_chunk_t", "chunk_t")
# The code that shapes a teacher trained here, fingerprinted into its cache key (`teacher_code_fingerprint`): whole
# modules, and single functions borrowed from modules that change for other reasons (the distillation losses and
# step), so that editing sCM does not retire every cached teacher. tests/test_teacher_cache.py traces a teacher's
# training and fails if it runs rcm_core code outside these lists. (It replaced a hand-bumped schema number.)
TEACHER_MODULES = ("rcm_core.run.teacher", "rcm_core.networks", "rcm_core.networks.mlp", "rcm_core.networks.dit",
                   "rcm_core.networks.causal", "rcm_core.networks.layers", "rcm_core.networks.tangent_islands",
                   "rcm_core.method.denoiser", "rcm_core.method.ema", "rcm_core.method.trigflow")
TEACHER_FUNCTIONS = ("rcm_core.method.losses:flow_matching_loss", "rcm_core.method.losses:_per_sample_sum",
                     "rcm_core.method.losses:_ctx", "rcm_core.method.losses:LossOut",
                     "rcm_core.method.distill:batch_condition")


def drop_condition(cond: torch.Tensor, null: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each sample's condition by the null condition with probability p (CFG training)."""
    drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p
    return torch.where(drop.reshape(-1, *([1] * (cond.dim() - 1))), null.to(cond.dtype), cond)


def sample_train_t(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """RF time s ~ logit-normal(0, 1) (SD3's default), as TrigFlow t."""
    s = torch.sigmoid(torch.randn(n, generator=generator, device=device, dtype=torch.float64))
    return rf_to_trig(s).clamp(1e-4, torch.pi / 2 - 1e-4)


def train_teacher(cfg: ExperimentCfg, batches: Iterable[LatentBatch], *, device: torch.device,
                  log_every: int = 100) -> TrigFlowDenoiser:
    from rcm_core.method.distill import batch_condition

    t_cfg = cfg.teacher
    with torch.random.fork_rng(devices=[]):      # the initial weights depend on the seed only, not on what ran before
        torch.manual_seed(cfg.train.seed + 76)
        net = build_network(cfg.model)
    net.causal = False                           # the teacher is bidirectional (see CAUSAL_MODEL_FIELDS)
    model = TrigFlowDenoiser(net, t_cfg.parametrization).to(device)
    ema = PowerEMA(model, t_cfg.ema_sigma_rel)
    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.train_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(cfg.train.seed + 77)
    stream = iter(batches)
    bar = tqdm(range(t_cfg.train_steps), desc="teacher (flow matching)", dynamic_ncols=True)
    for step in bar:
        batch = next(stream).to(device)
        x0, cond = batch.latent, batch_condition(batch)
        cond = drop_condition(cond, model.null_cond(x0.shape[0], device, like=cond), t_cfg.cond_dropout, g)
        t = sample_train_t(x0.shape[0], g, device)
        eps = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
        out = flow_matching_loss(model, x0, cond, t=t, eps=eps)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        ema.update(model)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{out.loss.item():.4f}")
    return ema.module.requires_grad_(False).eval()


def teacher_code_sources() -> dict[str, str]:
    """'module' or 'module:function' -> its source text, for every entry of TEACHER_MODULES / TEACHER_FUNCTIONS."""
    sources = {name: inspect.getsource(importlib.import_module(name)) for name in TEACHER_MODULES}
    for entry in TEACHER_FUNCTIONS:
        module, attr = entry.split(":")
        sources[entry] = inspect.getsource(getattr(importlib.import_module(module), attr))
    return sources


def code_fingerprint(sources: dict[str, str]) -> str:
    """sha256 over the syntax trees of `sources`, docstrings dropped: an edit to the code changes it, an edit to
    a comment or a docstring does not (no cached teacher retires for prose)."""
    h = hashlib.sha256()
    for name in sorted(sources):
        tree = ast.parse(textwrap.dedent(sources[name]))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def teacher_code_fingerprint() -> str:
    """The fingerprint of the code that shapes a teacher trained here, as this process has it."""
    return code_fingerprint(teacher_code_sources())


def teacher_key(cfg: ExperimentCfg, data_key: str, code: str | None = None) -> str:
    """Cache key of a teacher trained here: everything that shapes it. `data_key` names the data's content (a
    data set's manifest, `workflows.driver.teacher_data_key`; the toy's mixture), never its URL alone.

    model.* (with time_scale; not the attention pattern, CAUSAL_MODEL_FIELDS), teacher.* (its whole training
    config), data.normalize (raw or normalised coordinates), the seed, and `code`: the fingerprint of the training
    code (default `teacher_code_fingerprint`, not a hand-bumped number). Changing any one gives a new key
    (tests/test_teacher_cache.py)."""
    model = {k: v for k, v in to_dict(cfg.model).items() if k not in CAUSAL_MODEL_FIELDS}
    shaped_by = {"model": model, "teacher": {**to_dict(cfg.teacher), "checkpoint": ""},
                 "data": data_key, "normalize": cfg.data.normalize, "seed": cfg.train.seed,
                 "code": code or teacher_code_fingerprint()}
    return hashlib.sha256(json.dumps(shaped_by, sort_keys=True).encode()).hexdigest()[:16]


def save_teacher(model: TrigFlowDenoiser, cfg: ExperimentCfg, path: str | Path, *,
                 net_state: dict | None = None, data: dict | None = None) -> Path:
    """`net_state`: the network's full weights when `model` is FSDP-sharded (rcm_core.parallel.sharding.full_state_dict).
    `data`: the data set's card (rcm_core.eval.video_samples.data_card), so samples can be mapped back to its
    coordinates and decoded without the run's config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"net": net_state if net_state is not None else model.net.state_dict(), "model": to_dict(cfg.model),
                "parametrization": model.parametrization, **({"data": data} if data is not None else {})}, tmp)
    tmp.replace(path)
    return path


def is_wan_checkpoint(path: str | Path) -> bool:
    """Released Wan2.1 weights (original or diffusers layout) rather than a file written by save_teacher."""
    p = Path(path)
    return p.is_dir() or p.suffix in (".safetensors", ".json", ".pth")


def load_negative_context(path: str | Path) -> torch.Tensor:
    """A stored negative-prompt embedding [L, text_dim] (Wan: the umT5 embedding of its negative prompt)."""
    p = Path(path)
    if p.suffix == ".npy":
        import numpy as np
        return torch.from_numpy(np.load(p)).float()
    value = torch.load(p, map_location="cpu", weights_only=True)
    return value if isinstance(value, torch.Tensor) else next(iter(value.values()))


def checkpoint_model(data: dict) -> dict:
    """The model config stored in a file of `save_teacher`; files written before `model.time_scale` existed were
    trained with the time input 1000·s."""
    return {"time_scale": RF_TIMESTEP_SCALE, **data["model"]}


def load_teacher(path: str | Path, cfg: ExperimentCfg, device: torch.device) -> TrigFlowDenoiser:
    if is_wan_checkpoint(path):
        from rcm_core.networks.wan_io import load_weights
        net = build_network(cfg.model)
        load_weights(net, path)          # exact key map; lists missing / unexpected / mis-shaped keys on mismatch
        if cfg.teacher.parametrization == "rf_velocity" and cfg.model.time_scale != RF_TIMESTEP_SCALE:
            warnings.warn(f"teacher {path} is in Wan's layout but model.time_scale={cfg.model.time_scale:g}; "
                          f"Wan's released weights read the time input as {RF_TIMESTEP_SCALE:g}·s (set "
                          f"model.time_scale={RF_TIMESTEP_SCALE:g}, as experiments/wan21_*.yaml do)", stacklevel=2)
        if cfg.teacher.negative_context:
            net.set_negative_context(load_negative_context(cfg.teacher.negative_context))
        return TrigFlowDenoiser(net, cfg.teacher.parametrization).to(device).requires_grad_(False).eval()
    data = torch.load(path, map_location=device, weights_only=True)
    check_label_path(data["net"], f"teacher checkpoint {path}")
    want = to_dict(cfg.model)
    data["model"] = checkpoint_model(data)
    # Only fields that shape the parameters must agree; dtype and checkpointing are run-time choices.
    diff = {k: (v, want.get(k)) for k, v in data["model"].items()
            if k not in RUNTIME_MODEL_FIELDS and k in want and want[k] != v}
    if diff:
        raise ValueError(f"teacher checkpoint {path} was trained with another model config: {diff} "
                         f"(checkpoint value, config value); set model.* to match or retrain")
    # The file knows what its network predicts; a config that says otherwise would be ignored or, used, wrong.
    if data["parametrization"] != cfg.teacher.parametrization:
        raise ValueError(f"teacher checkpoint {path} predicts {data['parametrization']!r} but "
                         f"teacher.parametrization={cfg.teacher.parametrization!r}; set "
                         f"teacher.parametrization={data['parametrization']} (or give another teacher.checkpoint)")
    net = build_network(cfg.model)
    net.load_state_dict(data["net"])
    return TrigFlowDenoiser(net, data["parametrization"]).to(device).requires_grad_(False).eval()


def load_or_train_teacher(cfg: ExperimentCfg, batches: Iterable[LatentBatch], *, device: torch.device,
                          data_key: str, cache_dir: str | Path = ".cache/teachers",
                          data: dict | None = None) -> TrigFlowDenoiser:
    """cfg.teacher.checkpoint if set; else a cached teacher for this config; else train and cache one (with the
    data set's card `data`, see save_teacher)."""
    if cfg.teacher.checkpoint:
        return load_teacher(cfg.teacher.checkpoint, cfg, device)
    path = Path(cache_dir) / f"teacher-{teacher_key(cfg, data_key)}.pt"
    if path.is_file():
        tqdm.write(f"teacher: using cached {path}")
        return load_teacher(path, cfg, device)
    teacher = train_teacher(cfg, batches, device=device)
    save_teacher(teacher, cfg, path, data=data)
    tqdm.write(f"teacher: trained and cached at {path}")
    return teacher
