"""Checkpoints of the whole distillation state: student, EMA, fake score, both optimisers, counters, RNG,
data position. Written atomically (temporary folder, then rename), so a crash mid-write leaves the previous
checkpoint intact and a resumed run never sees a partial one. Loaded with `weights_only=True`.

Nothing a resumed run can rebuild exactly is written (a 1.3B run's state.pt: 32 → 20 bytes per parameter, 42 →
26 GiB, so that a 64 GiB disk holds the last checkpoint while the next is written):
- the bf16 working copies of networks whose optimiser keeps fp32 masters (rcm_core.parallel.precision): they
  are bf16(master) after every step, and loading the masters refreshes them;
- AdamW's first moment when β₁ = 0 (rCM's optimiser): each step overwrites it with the gradient before reading it
  (lerp with weight 1 − β₁ = 1, or β₁·m + g), so a zero moment resumes to the same bits.
Sharded (DCP) checkpoints keep both (rcm_core.parallel.dcp): there the parameters are the fp32 masters.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from rcm_core.networks import check_label_path
from rcm_core.parallel.precision import MasterWeightOptimizer

CKPT_FILE = "state.pt"
RUN_CONFIG_FILE = "config.json"   # the run's config beside the state, readable without loading the weights
DCP_METADATA = ".metadata"     # what torch.distributed.checkpoint writes last, on rank 0
# What state_to_dict writes for the distillation state itself; every other entry is caller "extra" state.
STATE_KEYS = {"student", "ema", "fake", "opt_student", "opt_fake", "iteration", "student_iter", "critic_iter",
              "counters", "torch_rng"}


def state_to_dict(state, *, extra: dict | None = None) -> dict:
    out = {
        "student": _module_state(state.student, state.opt_student),
        "ema": state.ema.state_dict(),
        "fake": _module_state(state.fake, state.opt_fake) if state.fake is not None else None,
        "opt_student": without_first_moments(state.opt_student.state_dict()),
        "opt_fake": without_first_moments(state.opt_fake.state_dict()) if state.opt_fake is not None else None,
        "iteration": state.iteration, "student_iter": state.student_iter, "critic_iter": state.critic_iter,
        "counters": dict(state.counters),
        "torch_rng": torch.get_rng_state(),
    }
    out.update(extra or {})
    return out


def rebuilt_from_masters(module: torch.nn.Module, opt) -> set[str]:
    """State-dict keys of `module` that `opt` rebuilds on load: its bf16 working copies of fp32 masters."""
    if not isinstance(opt, MasterWeightOptimizer):
        return set()
    narrow = {id(p) for p, m in zip(opt.params, opt.masters) if m is not p}
    return {k for k, v in module.state_dict(keep_vars=True).items() if id(v) in narrow}


def _module_state(module: torch.nn.Module, opt) -> dict:
    drop = rebuilt_from_masters(module, opt)
    return {k: v for k, v in module.state_dict().items() if k not in drop}


def _adam_part(sd: dict) -> dict:
    return sd["inner"] if "inner" in sd else sd        # MasterWeightOptimizer wraps the AdamW state


def _with_adam_part(sd: dict, adam: dict) -> dict:
    return {**sd, "inner": adam} if "inner" in sd else adam


def _beta1_zero_ids(adam: dict) -> set:
    return {i for g in adam["param_groups"] if tuple(g.get("betas", (1.0,)))[0] == 0.0 for i in g["params"]}


def without_first_moments(sd: dict) -> dict:
    """An optimiser state dict without AdamW's `exp_avg` for the parameters of β₁ = 0 groups (a new dict; the
    optimiser's own state is untouched)."""
    adam = _adam_part(sd)
    zero = _beta1_zero_ids(adam)
    state = {i: {k: v for k, v in s.items() if not (i in zero and k == "exp_avg")} for i, s in adam["state"].items()}
    return _with_adam_part(sd, {**adam, "state": state})


def with_first_moments(sd: dict) -> dict:
    """The inverse for loading: a zero `exp_avg` where a β₁ = 0 parameter has moments but no first one (what the
    next step overwrites anyway); checkpoints that kept it load unchanged."""
    adam = _adam_part(sd)
    zero = _beta1_zero_ids(adam)
    state = {i: ({**s, "exp_avg": torch.zeros_like(s["exp_avg_sq"])}
                 if i in zero and "exp_avg_sq" in s and "exp_avg" not in s else s)
             for i, s in adam["state"].items()}
    return _with_adam_part(sd, {**adam, "state": state})


class CheckpointData(dict):
    """The loaded checkpoint dict, remembering the file it came from (for error messages)."""

    path: Path | None = None


def load_into_state(state, data: dict) -> dict:
    """Restore `state` in place; returns the checkpoint's extra entries (data position, run ids…).
    A checkpoint of another model shape raises ValueError naming the file and the mismatching keys."""
    where = getattr(data, "path", None) or "checkpoint"
    missing = sorted(STATE_KEYS - {"fake", "opt_fake"} - set(data))
    if missing:
        raise ValueError(f"{where}: not a distillation checkpoint (missing {missing})")
    # the working copies left out of the file are refreshed from the masters when the optimisers load (below)
    _load_module(state.student, data["student"], "student", where,
                 rebuilt_from_masters(state.student, state.opt_student))
    state.ema.load_state_dict(data["ema"])
    if state.fake is not None:
        if data.get("fake") is None:
            raise ValueError(f"{where} has no fake score, but distill.mode needs one; resume with the mode it "
                             "was trained with")
        _load_module(state.fake, data["fake"], "fake score", where, rebuilt_from_masters(state.fake, state.opt_fake))
        state.opt_fake.load_state_dict(with_first_moments(data["opt_fake"]))
    state.opt_student.load_state_dict(with_first_moments(data["opt_student"]))
    state.iteration, state.student_iter = int(data["iteration"]), int(data["student_iter"])
    state.critic_iter = int(data["critic_iter"])
    state.counters.update(data["counters"])
    # the CPU generator's state, whatever device the checkpoint was mapped to (a resume on a GPU maps every tensor
    # to it, and set_rng_state refused the CUDA copy: the first resumed job on an H200 died here, 2026-12-02)
    torch.set_rng_state(data["torch_rng"].cpu())
    return {k: v for k, v in data.items() if k not in STATE_KEYS}


def _load_module(module: torch.nn.Module, sd: dict, name: str, where: str | Path = "checkpoint",
                 rebuilt: set[str] = frozenset()) -> None:
    """Load `sd` into `module`; the keys in `rebuilt` (working copies refreshed from fp32 masters) may be absent."""
    check_label_path(sd, f"{where} ({name})")
    own = module.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(sd) - set(rebuilt)), sorted(set(sd) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"{where}: the {name} weights do not match this model (another model shape?): "
                         f"shape mismatches {bad[:5]}, missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    module.load_state_dict(sd, strict=False)


def save_checkpoint(data: dict, directory: str | Path) -> Path:
    """Write `directory/state.pt` atomically: into `directory.tmp-<pid>`, fsync, then rename."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / CKPT_FILE, "wb") as fh:
        torch.save(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def write_run_config(config: dict, directory: str | Path) -> Path:
    """Record the config a checkpoint was trained with (`rcm_core.config.run_config_dict`), so that whoever resumes
    it can compare configs first (workflows/storage.py check_resume) without loading the weights."""
    path = Path(directory) / RUN_CONFIG_FILE
    tmp = path.with_name(f"{RUN_CONFIG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(directory) / CKPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a folder written by save_checkpoint)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding pickled code (refused by weights_only)
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path} holds a {type(data).__name__}, not a state dict")
    out = CheckpointData(data)
    out.path = path
    return out


def is_distributed(directory: str | Path) -> bool:
    """A torch.distributed.checkpoint folder (rcm_core.parallel.dcp, written by sharded runs) rather than state.pt."""
    return (Path(directory) / DCP_METADATA).is_file()


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / CKPT_FILE).is_file() or is_distributed(directory)


def remove_partial_checkpoints(root: str | Path) -> list[Path]:
    """Delete the temporary folders of checkpoints whose write never finished (`step_N.tmp-<pid>` here, `step_N.tmp`
    from rcm_core.parallel.dcp): a job stopped mid-write leaves one, as large as a checkpoint, that no loader picks."""
    root = Path(root)
    partial = [p for p in root.glob("step_*.tmp*") if p.is_dir()] if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def latest_checkpoint(root: str | Path) -> Path | None:
    """Newest complete `step_<N>` folder under root; temporary (partial) folders are never picked."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if p.is_dir() and ".tmp" not in p.name and is_complete(p)]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)
