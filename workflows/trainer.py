"""The Ray Train side of a run: the trainer (`build_trainer`) and what every worker runs (`train_fn_per_worker`):
the teacher loaded on the worker, `rcm_core.run.loop.run_training` on the worker's Ray Data stream, metrics and
checkpoints reported to Ray Train and (rank 0) MLflow, the final samples and EMA student logged."""
from __future__ import annotations

import functools
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import ray.train
import torch

from rcm_core.config import ConfigError, ExperimentCfg, from_dict, to_dict
from rcm_core.data.latents import read_manifest
from rcm_core.method.distill import batch_line, micro_batches
from rcm_core.parallel.sharding import full_state_dict, is_collective, run_shape
from workflows.console import (Phases, log_comparison_figure, print_eval_line, quiet_worker_logs,
                               write_step_count_tables)
from workflows.data_config import GroupReaderDataConfig
from workflows.driver import check_device, check_model_fits_data, feature_net_card, teacher_probe
from workflows.storage import run_storage

OUTCOME_TAG = "rcm.sweep.outcome"       # how a sweep trial ended: finished | stopped_early | diverged | error

# rCM masks non-finite samples out of its losses (rcm_core/method/losses.py), so a blown-up student shows a loss of 0
# rather than NaN: divergence is a non-finite loss or a window where most samples of a batch were non-finite.
NAN_SAMPLE_KEYS = ("train/scm_nan_samples", "train/dmd_nan_samples", "train/critic_nan_samples")
NAN_SAMPLE_RATE = 0.5


def divergence(metrics: dict[str, Any], per_worker_batch: int) -> str | None:
    """Why this training report counts as diverged, or None."""
    loss = metrics.get("train/loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        return f"train/loss={loss}"
    for key in NAN_SAMPLE_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and (not math.isfinite(value)
                                                or value >= NAN_SAMPLE_RATE * max(per_worker_batch, 1)):
            return f"{key}={value:.3g} of a per-worker batch of {per_worker_batch}"
    return None


def _evaluator(cfg: ExperimentCfg, teacher, manifest: dict, device: torch.device, feature_net=None):
    """Step-count evaluator of the run. `feature_net`: the data set's own classifier (`driver_feature_net`),
    which adds the `*_feat` metrics, class_acc and, for video, the temporal ones; None = random projection only."""
    from rcm_core.eval.features import RandomProjection
    from rcm_core.eval.evaluate import EvalBank, StepCountEvaluator
    from rcm_core.run.pipeline import toy_evaluator
    from rcm_core.data.toy import default_gmm
    from rcm_core.eval.video_samples import eval_conditions

    if manifest.get("source", {}).get("name") == "gmm" and not cfg.data.normalize:
        # the mixture the data set was written from (its manifest), not one rebuilt from model.* keys
        gmm = default_gmm(dim=manifest["source"]["dim"], classes=manifest["num_classes"])
        return toy_evaluator(cfg, teacher, gmm, device)
    shape = manifest["latent_shape"]
    n, k = cfg.eval.num_samples, max(manifest.get("num_classes") or 1, 1)
    conds = torch.arange(n) % k if manifest.get("cond_shape") is None else eval_conditions(   # text: the data's own
        cfg.data.url, manifest, n, endpoint=cfg.data.s3_endpoint)
    bank = EvalBank.make(shape, conds, cfg.eval.seed)
    dim = int(torch.tensor(shape).prod())
    projection = RandomProjection(dim, out_dim=min(64, dim), seed=0)
    extractors = [projection] if feature_net is None else [feature_net, projection]
    return StepCountEvaluator(cfg=cfg, teacher=teacher, bank=bank, device=device, extractors=extractors,
                              classifier=feature_net)

def managed_checkpoint_root() -> Path | None:
    """Where the loop writes checkpoints when Ray Train's storage is a folder (local or mounted): inside the run's
    own Ray folder, where Ray registers them as they lie (CheckpointUploadMode.NO_UPLOAD). Written under
    train.run_dir and reported, each was copied there and kept twice (a 1.3B state is 26 GiB: two copies of each
    of two kept checkpoints did not fit the 64 GiB disk of a one-GPU host). None for object storage (s3://):
    there the loop writes under train.run_dir and the reporter uploads it and deletes the local copy."""
    storage = ray.train.get_context().get_storage()
    if storage.storage_filesystem.type_name != "local":
        return None
    return Path(storage.experiment_fs_path) / "checkpoints"


class RayReporter:
    """Forwards metrics and checkpoints to Ray Train (every rank) and MLflow (rank 0)."""

    def __init__(self, cfg: ExperimentCfg, rank: int, extra_state: dict, parent_run_id: str | None,
                 stop_when: Callable[[dict[str, float]], str | None] | None = None, tags: dict[str, str] | None = None,
                 checkpoint_root: Path | None = None):
        self.cfg, self.rank, self.extra, self.parent = cfg, rank, extra_state, parent_run_id
        self.checkpoint_root = checkpoint_root      # read by the loop (rcm_core.run.loop.Reporter)
        self.stop_when = stop_when      # metrics -> reason to end the run now (sweeps: divergence)
        self.tags = tags or {}          # set on the MLflow run once it is known (e.g. the feature net's version)
        self.first_metrics: dict[str, float] = {}   # logged at step 0 with the first report (the teacher check)
        self.tracker = None

    def ensure_tracker(self):
        # Created lazily, at the first report: by then a resumed run has read its MLflow run id from the checkpoint.
        if self.rank == 0 and self.tracker is None:
            from workflows.tracking import Tracker
            self.tracker = Tracker(self.cfg, run_id=self.extra.get("mlflow_run_id"), parent_run_id=self.parent)
            self.extra["mlflow_run_id"] = self.tracker.run_id     # saved in every later checkpoint
            for key, value in self.tags.items():
                self.tracker.client.set_tag(self.tracker.run_id, key, value)
        return self.tracker

    def __call__(self, step: int, metrics: dict[str, float], ckpt_dir: Path | None) -> str | None:
        import ray.train

        if self.rank == 0 and self.first_metrics:
            self.ensure_tracker().log_metrics(0, self.first_metrics)
            self.first_metrics = {}
        if self.rank == 0 and metrics:
            self.ensure_tracker().log_metrics(step, metrics)
            print_eval_line(step, metrics)
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None and self.rank == 0 else None
        in_place = self.checkpoint_root is not None          # already in Ray's run folder: register, don't copy
        ray.train.report({"step": step, **{k: v for k, v in metrics.items() if not k.endswith(("_ci_low", "_ci_high"))}},
                         checkpoint=ckpt, delete_local_checkpoint_after_upload=not in_place and ckpt is not None,
                         checkpoint_upload_mode=(ray.train.CheckpointUploadMode.NO_UPLOAD if in_place
                                                 else ray.train.CheckpointUploadMode.SYNC))
        return self.stop_when(metrics) if self.stop_when is not None and metrics else None

def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from rcm_core.run.loop import run_training
    from workflows.data import resumable_batches

    cfg = from_dict(config["cfg"], "train_loop_config")
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    t0 = time.perf_counter()
    teacher = worker_teacher(config["teacher_path"], cfg, device)
    setup = {"timing/teacher_load_seconds": time.perf_counter() - t0}     # a 1.3B teacher: tens of seconds
    shard = ray.train.get_dataset_shard("train")
    extra: dict = {}
    collective = is_collective(cfg.parallel, world)      # FSDP/CP: every rank joins evaluation forwards
    evaluates = rank == 0 or collective
    feature_net, tags = _worker_feature_net(config.get("feature_net"), device) if evaluates else (None, {})
    t0 = time.perf_counter()
    check = _teacher_check(config.get("teacher_probe"), teacher, cfg, device) if rank == 0 else None
    if check is not None:
        setup["timing/teacher_check_seconds"] = time.perf_counter() - t0
    reporter = RayReporter(cfg, rank, extra, config.get("parent_run_id"), _stop_rule(config),
                           tags={**tags, **config.get("tags", {}), **(check.tags() if check else {})},
                           checkpoint_root=managed_checkpoint_root())
    reporter.first_metrics = {**(check.metrics() if check else {}), **setup}
    evaluator = _evaluator(cfg, teacher, config["manifest"], device, feature_net) if evaluates else None
    per_group = cfg.data.batch_size // run_shape(cfg.parallel, world).data_parallel_size
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else nullcontext(None)) as resume:
        state = run_training(cfg, resumable_batches(shard, per_group), reporter, resume, teacher=teacher,
                             evaluator=evaluator, device=device, extra_state=extra,
                             latent_shape=tuple(config["manifest"]["latent_shape"]))
    if state.stopped:                         # every rank agreed (rcm_core.run.loop): no final samples or weights
        if rank == 0:
            reporter.ensure_tracker().finish("FAILED")
        return
    if extra.get("data_position") == state.iteration:
        return      # resumed at its last step (main() skips such runs; a sweep trial restored after its end does not)
    ema_weights = full_state_dict(state.ema.module.net)      # collective when sharded
    if rank == 0:
        tracker = reporter.ensure_tracker()
        _log_final_artifacts(cfg, tracker, state, evaluator, config["manifest"], ema_weights)
        write_step_count_tables(cfg.train.run_dir, tracker, evaluator.last_report)
        end_run(tracker, sweep_trial=bool(config.get("parent_run_id")))


def end_run(tracker, sweep_trial: bool) -> None:
    """End a run that ran to its last step. A sweep trial then tags itself finished, after its end state: the
    driver's Tune callback may have marked it stopped early (and KILLED) already, when the scheduler's stop overtook
    the trial's last report (CI, 2026-12-03: a trial tagged stopped_early had ended FINISHED, evaluated at every
    step, while the trial still wrote its final artifacts). The two writers can still cross inside the driver's own
    two requests (tag, then end state): a window of milliseconds, not the seconds of a trial's final artifacts."""
    tracker.finish()
    if sweep_trial:
        tracker.client.set_tag(tracker.run_id, OUTCOME_TAG, "finished")


def _teacher_check(probe: dict | None, teacher, cfg: ExperimentCfg, device: torch.device):
    """The teacher's JVP-vs-central-difference time-derivative check (rcm_core.method.tangent_check) on the driver's probe
    rows, printed (loudly if rough) before distilling; its numbers go to MLflow as `teacher_check/*` metrics at step
    0 and tags (tags, not params: a resumed run repeats the check, and a GPU may not repeat it to the last bit)."""
    if probe is None:
        return None
    from rcm_core.data.latents import LatentBatch
    from rcm_core.method.distill import batch_condition
    from rcm_core.method.tangent_check import time_derivative_check, warn_if_rough

    batch = LatentBatch.from_numpy_batch(probe).to(device)
    check = time_derivative_check(teacher, batch.latent, batch_condition(batch),
                                  generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    warn_if_rough(check)
    return check

def _worker_feature_net(card: dict | None, device: torch.device):
    """The driver's classifier on this worker's device, and the MLflow tags that name it. Tags, not params:
    a resumed run sets them again, and MLflow refuses to change a param that a lost cache retrained differently."""
    if card is None:
        return None, {}
    from rcm_core.eval.features import load_feature_net

    net = load_feature_net(card["path"], device=device)          # checks the weights against their stored hash
    return net, {"feature_net.version": net.version, "feature_net.heldout_accuracy": f"{card['heldout_accuracy']:.4f}",
                 "feature_net.heldout_videos": str(card["heldout_videos"]), "feature_net.steps": str(card["steps"])}

def _stop_rule(config: dict) -> Callable[[dict[str, float]], str | None] | None:
    """Sweeps pass `stop_on_divergence` (the per-worker batch): a trial whose student blew up ends on its worker
    at that report instead of running on until Tune's stop signal arrives (which would race its next evaluation)."""
    batch = config.get("stop_on_divergence")
    if batch is None:
        return None
    return functools.partial(divergence, per_worker_batch=batch)

def _log_final_artifacts(cfg, tracker, state, evaluator, manifest: dict, ema_weights: dict) -> None:
    """Resolved config, samples per step count (PNG; GIF for video; MP4 for Wan-VAE data sets), the comparison
    figure, the final EMA student with its data set's card (channel statistics, encoder) for sample.py."""
    from rcm_core.config import dump_yaml
    from rcm_core.eval.samples import save_sample_pictures
    from rcm_core.run.teacher import save_teacher
    from rcm_core.eval.video_samples import data_card, decodable

    tracker.log_text(dump_yaml(cfg), "config/resolved.yaml")
    # at 1.3B and 480p × 81 this took 215 s on an H200 host with no line printed (2026-12-03): say what runs when
    # the samples go through the VAE, and how long each part took
    if decodable(manifest):
        print("writing the final artifacts: samples through the Wan VAE (PNG, GIF, MP4), comparison figure, EMA "
              "student", flush=True)
    phase = Phases()
    with tempfile.TemporaryDirectory() as tmp:
        labels = evaluator.bank.labels if evaluator.bank.labels.dim() == 1 else None
        with phase("samples"):
            for path in save_sample_pictures(evaluator.last_samples, manifest, Path(tmp), labels=labels,
                                             normalized=cfg.data.normalize, endpoint=cfg.data.s3_endpoint):
                tracker.log_artifact(path, "samples")
        with phase("comparison figure"):
            log_comparison_figure(cfg, tracker, evaluator, manifest, labels)
    # written once, into the run folder, and logged from there (a 1.3B EMA student in fp32 is 5.3 GiB)
    with phase("EMA student"):
        student = save_teacher(state.ema.module, cfg, Path(cfg.train.run_dir) / "ema_student.pt",
                               net_state=ema_weights, data=data_card(manifest, normalized=cfg.data.normalize))
        tracker.log_artifact(student, "student")
    tracker.log_metrics(state.iteration, phase.metrics())
    print(phase.line(), flush=True)

def worker_teacher(path: str | Path, cfg: ExperimentCfg, device: torch.device):
    """The teacher on a worker, loaded where it lies (a released Wan2.1 folder or file, or our .pt). The one place
    a worker builds it: sharded building for large teachers belongs here (rcm_core.parallel.sharding)."""
    from rcm_core.run.teacher import load_teacher

    if not Path(path).exists():
        raise FileNotFoundError(f"teacher.checkpoint={path}: no such file or folder on this worker; the workers "
                                f"load it from there, so put it on storage every node mounts")
    return load_teacher(path, cfg, device)

def build_trainer(cfg: ExperimentCfg, teacher_path: Path, *, feature_net_path: Path | None = None,
                  parent_run_id: str | None = None, callbacks: list | None = None,
                  stop_on_divergence: int | None = None, tags: dict[str, str] | None = None):
    """A TorchTrainer for `cfg`. stop_on_divergence: the per-worker batch size; when given, workers end the run
    at the first report that `divergence` calls diverged (sweep trials). tags: set on the MLflow
    run (e.g. `check_resume`'s record of what a resumed run changed)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from workflows.console import train_logging_config
    from workflows.data import check_batching, make_ray_dataset

    check_device(cfg)
    manifest = read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint)
    check_model_fits_data(cfg, manifest)
    r = cfg.resources
    shape = run_shape(cfg.parallel, max(r.num_workers, 1))
    readers = shape.data_parallel_size                   # one reader per context-parallel group
    check_batching(manifest, readers, cfg.data.batch_size // readers)
    if cfg.data.batch_size % readers:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {readers} data-parallel "
                         f"groups (resources.num_workers={r.num_workers} / parallel.cp={shape.cp}); choose a multiple")
    try:
        accumulates = len(micro_batches(cfg.data.batch_size // readers, cfg.data.micro_batch_size)) > 1
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if accumulates:
        print(batch_line(cfg.data.batch_size, readers, cfg.data.micro_batch_size), flush=True)
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    storage, fs = run_storage(cfg)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "teacher_path": str(teacher_path), "manifest": vars(manifest),
                           "feature_net": feature_net_card(feature_net_path) if feature_net_path else None,
                           "parent_run_id": parent_run_id, "stop_on_divergence": stop_on_divergence,
                           "tags": tags or {}, "teacher_probe": teacher_probe(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        datasets={"train": make_ray_dataset(cfg)},
        dataset_config=GroupReaderDataConfig(shape.cp),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-ray", storage_path=storage, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            logging_config=train_logging_config(),         # Ray Train's console chatter only with --verbose
            callbacks=callbacks or []))
