"""One rCM distillation run on Ray Train, fed by Ray Data, tracked in MLflow.

    python workflows/distill.py                                   # the embedded default (local Ray, toy data)
    python workflows/distill.py --config experiments/X.yaml key=value ...
    ray job submit --working-dir . -- python workflows/distill.py --config experiments/smoke.yaml

What happens: the data set is written if the config names a built-in source and it is not there yet; storage
is checked before any worker starts; the teacher is loaded or trained once on the driver (cached by config
hash); for a labelled video/image data set, the evaluation classifier (`rcm_core.eval.features.FeatureNet`) is
trained once on the driver too (cached by the data set's manifest); a `TorchTrainer` runs
`rcm_core.loop.run_training` on every worker with its Ray Data shard; rank 0 logs to MLflow and evaluates
1/2/4 steps against the teacher. Running the same command again resumes from
the run's latest checkpoint and continues the same MLflow run.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
from contextlib import nullcontext
from typing import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:            # `python workflows/distill.py` from a checkout or a job working dir
    sys.path.insert(0, str(ROOT))

import ray.train  # noqa: E402
import torch  # noqa: E402

from rcm_core.config import ConfigError, ExperimentCfg, from_dict, load_config, redact_url, to_dict  # noqa: E402
from rcm_core.data import iterate_batches, read_manifest  # noqa: E402
from rcm_core.parallel import full_state_dict, is_collective, run_shape  # noqa: E402
from workflows.cli import add_debug_flag, run_cli  # noqa: E402
from workflows.console import (log_comparison_figure, print_eval_line, quiet_worker_logs,  # noqa: E402
                               setup_output, write_step_count_tables)
from workflows.plan import preflight  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments" / "demo.yaml"


# ----------------------------------------------------------------------------------------------------------
# Worker side

def _evaluator(cfg: ExperimentCfg, teacher, manifest: dict, device: torch.device, feature_net=None):
    """Step-count evaluator of the run. `feature_net`: the data set's own classifier (`driver_feature_net`),
    which adds the `*_feat` metrics, class_acc and, for video, the temporal ones; None = random projection only."""
    from rcm_core.eval.features import RandomProjection
    from rcm_core.evaluate import EvalBank, StepCountEvaluator
    from rcm_core.pipeline import toy_evaluator
    from rcm_core.toy import default_gmm
    from rcm_core.video_samples import eval_conditions

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


class RayReporter:
    """Forwards metrics and checkpoints to Ray Train (every rank) and MLflow (rank 0)."""

    def __init__(self, cfg: ExperimentCfg, rank: int, extra_state: dict, parent_run_id: str | None,
                 stop_when: Callable[[dict[str, float]], str | None] | None = None, tags: dict[str, str] | None = None):
        self.cfg, self.rank, self.extra, self.parent = cfg, rank, extra_state, parent_run_id
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
        ray.train.report({"step": step, **{k: v for k, v in metrics.items() if not k.endswith(("_ci_low", "_ci_high"))}},
                         checkpoint=ckpt)
        return self.stop_when(metrics) if self.stop_when is not None and metrics else None


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from rcm_core.loop import run_training
    from workflows.data import resumable_batches

    cfg = from_dict(config["cfg"], "train_loop_config")
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    teacher = worker_teacher(config["teacher_path"], cfg, device)
    shard = ray.train.get_dataset_shard("train")
    extra: dict = {}
    collective = is_collective(cfg.parallel, world)      # FSDP/CP: every rank joins evaluation forwards
    evaluates = rank == 0 or collective
    feature_net, tags = _worker_feature_net(config.get("feature_net"), device) if evaluates else (None, {})
    check = _teacher_check(config.get("teacher_probe"), teacher, cfg, device) if rank == 0 else None
    reporter = RayReporter(cfg, rank, extra, config.get("parent_run_id"), _stop_rule(config),
                           tags={**tags, **config.get("tags", {}), **(check.tags() if check else {})})
    reporter.first_metrics = check.metrics() if check else {}
    evaluator = _evaluator(cfg, teacher, config["manifest"], device, feature_net) if evaluates else None
    per_group = cfg.data.batch_size // run_shape(cfg.parallel, world).data_parallel_size
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else nullcontext(None)) as resume:
        state = run_training(cfg, resumable_batches(shard, per_group), reporter, resume, teacher=teacher,
                             evaluator=evaluator, device=device, extra_state=extra,
                             latent_shape=tuple(config["manifest"]["latent_shape"]))
    if state.stopped:                         # every rank agreed (rcm_core.loop): no final samples or weights
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
        tracker.finish()


def _teacher_check(probe: dict | None, teacher, cfg: ExperimentCfg, device: torch.device):
    """The teacher's JVP-vs-central-difference time-derivative check (rcm_core.tangent_check) on the driver's probe
    rows, printed (loudly if rough) before distilling; its numbers go to MLflow as `teacher_check/*` metrics at step
    0 and tags (tags, not params: a resumed run repeats the check, and a GPU may not repeat it to the last bit)."""
    if probe is None:
        return None
    from rcm_core.data import LatentBatch
    from rcm_core.distill import batch_condition
    from rcm_core.tangent_check import time_derivative_check, warn_if_rough

    batch = LatentBatch.from_numpy_batch(probe).to(device)
    check = time_derivative_check(teacher, batch.latent, batch_condition(batch),
                                  generator=torch.Generator(device=device).manual_seed(cfg.train.seed))
    warn_if_rough(check)
    return check


def teacher_probe(cfg: ExperimentCfg) -> dict:
    """The first rows of the data set's first shard, as the workers read them (same normalisation), for the
    teacher check; as many as `rcm_core.tangent_check.check_rows` asks for the latent's size."""
    import math

    from rcm_core.data import read_shard
    from rcm_core.tangent_check import check_rows

    m = read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint)
    arrays, _ = read_shard(cfg.data.url, m.shards[0], m, endpoint=cfg.data.s3_endpoint,
                           on_bad_row=cfg.data.on_bad_row, do_normalize=cfg.data.normalize)
    n = check_rows(math.prod(m.latent_shape))
    return {k: v[:n] for k, v in arrays.items() if k in ("latent", "label", "cond")}


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
    from workflows.sweep import divergence
    return functools.partial(divergence, per_worker_batch=batch)


def _log_final_artifacts(cfg, tracker, state, evaluator, manifest: dict, ema_weights: dict) -> None:
    """Resolved config, samples per step count (PNG; GIF for video; MP4 for Wan-VAE data sets), the comparison
    figure, the final EMA student with its data set's card (channel statistics, encoder) for sample.py."""
    from rcm_core.config import dump_yaml
    from rcm_core.samples import save_sample_pictures
    from rcm_core.teacher import save_teacher
    from rcm_core.video_samples import data_card

    tracker.log_text(dump_yaml(cfg), "config/resolved.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        labels = evaluator.bank.labels if evaluator.bank.labels.dim() == 1 else None
        for path in save_sample_pictures(evaluator.last_samples, manifest, Path(tmp), labels=labels,
                                         normalized=cfg.data.normalize, endpoint=cfg.data.s3_endpoint):
            tracker.log_artifact(path, "samples")
        log_comparison_figure(cfg, tracker, evaluator, manifest, labels)
        student = save_teacher(state.ema.module, cfg, Path(tmp) / "ema_student.pt", net_state=ema_weights,
                               data=data_card(manifest, normalized=cfg.data.normalize))
        tracker.log_artifact(student, "student")
        local = Path(cfg.train.run_dir) / "ema_student.pt"
        local.write_bytes(student.read_bytes())


# ----------------------------------------------------------------------------------------------------------
# Driver side

def absolute_paths(cfg: ExperimentCfg) -> ExperimentCfg:
    """Ray workers run in their own working directory: resolve local paths on the driver first."""
    from workflows.tracking import tracking_uri

    for section, key in (("train", "run_dir"), ("data", "url"), ("teacher", "checkpoint")):
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and not Path(value).is_absolute():
            setattr(getattr(cfg, section), key, str(Path(value).resolve()))
    cfg.tracking.tracking_uri = tracking_uri(cfg)
    return cfg


def prepare_data(cfg: ExperimentCfg) -> ExperimentCfg:
    """Built-in sources are written once to data.url (default runs/data/<name>-<source>) and then read as a data
    set; a data set already there must be the one the data.* keys describe (`check_data_request`)."""
    from workflows.data import check_storage
    from workflows.prepare_latents import prepare

    if cfg.data.source in ("gmm", "moving_fashion"):
        url = cfg.data.url or str(Path("runs", "data", f"{cfg.name}-{cfg.data.source}").resolve())
        try:
            there = check_storage(url, cfg.data.s3_endpoint)
        except Exception:
            there = None
            cfg.data.url = url
            prepare(cfg.data)
        cfg.data.url = url
        if there is not None:
            check_data_request(cfg.data, there)
    check_storage(cfg.data.url, cfg.data.s3_endpoint)       # fail before any worker starts, naming the URL
    return cfg


def data_request_differences(d, manifest) -> dict[str, tuple]:
    """data.* keys whose values disagree with the data set `manifest` describes: key -> (there, requested)."""
    src, shards = manifest.source, [s["rows"] for s in manifest.shards]
    pairs = {"data.source": (src.get("name"), d.source), "data.seed": (src.get("seed"), d.seed),
             "data.num_rows": (manifest.num_rows, d.num_rows),
             # the last shard may be short; a single shard holds min(num_rows, rows_per_shard) rows
             "data.rows_per_shard": (max(shards, default=0), min(d.rows_per_shard, d.num_rows))}
    if d.source == "gmm":
        pairs["data.gmm_dim"] = (src.get("dim"), d.gmm_dim)
    else:
        pairs.update({f"data.{k}": (src.get(k), getattr(d, k)) for k in ("frames", "canvas", "item_size")})
        pairs["data.patch"] = (round(manifest.latent_shape[0] ** 0.5), d.patch)       # C = patch²
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


def check_data_request(d, manifest) -> None:
    """A built-in source's data set is written once; a later request that disagrees with it is an error naming
    both, never a silent run on the old data."""
    diff = data_request_differences(d, manifest)
    if diff:
        shown = "; ".join(f"{k}: {there!r} there, {want!r} requested" for k, (there, want) in diff.items())
        raise ConfigError(f"data.url={d.url} already holds a {manifest.source.get('name')} data set that differs "
                          f"from the data.* keys: {shown}. Give another data.url to write the one you asked for, "
                          f"set those keys to what is there, or delete {d.url}")


def check_model_fits_data(cfg: ExperimentCfg, manifest) -> None:
    """The data set decides the latent shape; the model must take it (model.in_channels: channels for the DiT, the
    whole latent for the vector MLP), or every worker would fail at its first batch."""
    shape = list(manifest.latent_shape)
    need = shape[0] if cfg.model.kind == "dit" else math.prod(shape)
    if cfg.model.in_channels != need:
        raise ConfigError(f"model.in_channels={cfg.model.in_channels} does not fit the data set at {cfg.data.url}: "
                          f"its latents are {shape}, so model.kind={cfg.model.kind} needs model.in_channels={need}")


def teacher_data_key(cfg: ExperimentCfg) -> str:
    """The data set's version for the teacher cache (`rcm_core.teacher.teacher_key`): its manifest's content (shards,
    row counts, channel statistics, generator), not its URL. A different data set rewritten at the same URL gets a
    new teacher; the same data set copied elsewhere keeps its teacher."""
    manifest = vars(read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint))
    return "manifest-" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def driver_teacher(cfg: ExperimentCfg) -> Path:
    """What the workers load as the teacher (`worker_teacher`): teacher.checkpoint as it is, a file or a Wan2.1
    folder, never loaded, copied or written here; without one, a toy teacher trained once on the driver from the
    run's data set and cached under .cache/teachers by `teacher_key` (config and the data set's manifest)."""
    from rcm_core.teacher import load_or_train_teacher, teacher_key
    from rcm_core.video_samples import data_card

    if cfg.teacher.checkpoint:
        return Path(cfg.teacher.checkpoint)
    cache = Path(".cache", "teachers").resolve()
    data_key = teacher_data_key(cfg)
    path = cache / f"teacher-{teacher_key(cfg, data_key)}.pt"
    if not path.is_file():
        batches = iterate_batches(cfg.data.url, cfg.teacher.train_batch_size, seed=cfg.train.seed + 1,
                                  endpoint=cfg.data.s3_endpoint, do_normalize=cfg.data.normalize)
        card = data_card(read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint), normalized=cfg.data.normalize)
        load_or_train_teacher(cfg, batches, device=torch.device("cpu"), data_key=data_key, cache_dir=cache,
                              data=card)          # the card: sample.py --teacher writes the data's coordinates
    return path


def worker_teacher(path: str | Path, cfg: ExperimentCfg, device: torch.device):
    """The teacher on a worker, loaded where it lies (a released Wan2.1 folder or file, or our .pt). The one place
    a worker builds it: sharded building for large teachers belongs here (rcm_core.parallel)."""
    from rcm_core.teacher import load_teacher

    if not Path(path).exists():
        raise FileNotFoundError(f"teacher.checkpoint={path}: no such file or folder on this worker; the workers "
                                f"load it from there, so put it on storage every node mounts")
    return load_teacher(path, cfg, device)


# Fixed, not train.seed: every run on one data set is scored in the same feature space, so runs compare.
FEATURE_NET_SEED = 0
FEATURE_NET_HOLDOUT = 0.1       # share of the data set's videos kept out of training to measure the classifier


def feature_net_applies(manifest: dict) -> bool:
    """Labelled frames the classifier's convolutions can read ([C, T, H, W], H·W > 1). The toy mixture keeps its
    exact GMM metrics; its rows are points ([D, 1, 1, 1]), not pictures."""
    shape = manifest["latent_shape"]
    return (manifest.get("source", {}).get("name") != "gmm" and (manifest.get("num_classes") or 0) >= 2
            and len(shape) == 4 and shape[2] * shape[3] > 1)


def feature_net_key(cfg: ExperimentCfg, manifest: dict) -> str:
    """The data set's version (its manifest: shards, row counts, channel statistics, generator) and what shapes the
    classifier. Not the URL: the same data set copied to another folder or bucket keeps its classifier."""
    from rcm_core.eval.features import FEATURE_NET_SCHEMA

    shaped_by = {"manifest": manifest, "normalize": cfg.data.normalize, "on_bad_row": cfg.data.on_bad_row,
                 "steps": cfg.eval.classifier_steps, "seed": FEATURE_NET_SEED, "holdout": FEATURE_NET_HOLDOUT,
                 "schema": FEATURE_NET_SCHEMA}
    return hashlib.sha256(json.dumps(shaped_by, sort_keys=True).encode()).hexdigest()[:16]


def driver_feature_net(cfg: ExperimentCfg, manifest: dict | None = None) -> Path | None:
    """Train the data set's frame classifier once, on the driver's CPU, and cache it by the data set's version
    (`.cache/feature_nets/featnet-<key>.pt`, its held-out accuracy beside it in `.json`). None where the evaluator
    has no use for one (unlabelled data, the toy mixture). `manifest`: the data set's, read from cfg.data if None."""
    if manifest is None:
        manifest = vars(read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint))
    if not feature_net_applies(manifest):
        return None
    path = Path(".cache", "feature_nets").resolve() / f"featnet-{feature_net_key(cfg, manifest)}.pt"
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        _train_feature_net(cfg, path)
    card = feature_net_card(path)
    print(f"feature net: {card['version']} at {path}, held-out video accuracy {card['heldout_accuracy']:.3f} "
          f"({card['heldout_videos']} videos)", flush=True)
    return path


def _train_feature_net(cfg: ExperimentCfg, path: Path) -> None:
    """Read the data set as the workers see it (same normalisation, same bad-row rule), hold out a seeded
    FEATURE_NET_HOLDOUT of its videos, train on the rest, measure video accuracy on the held-out part."""
    import time

    from rcm_core.data import LatentDataset
    from rcm_core.eval.features import holdout_split, save_feature_net, train_feature_classifier

    print(f"feature net: reading {cfg.data.url}", flush=True)
    ds = LatentDataset(cfg.data.url, endpoint=cfg.data.s3_endpoint, on_bad_row=cfg.data.on_bad_row,
                       do_normalize=cfg.data.normalize)
    latents, labels = torch.from_numpy(ds.arrays["latent"]), torch.from_numpy(ds.arrays["label"])
    held, fit = holdout_split(len(ds), FEATURE_NET_HOLDOUT, FEATURE_NET_SEED)
    print(f"feature net: training {cfg.eval.classifier_steps} steps on {len(fit)} videos "
          f"({len(fit) * latents.shape[2]} frames) on the CPU, {len(held)} held out", flush=True)
    t0 = time.perf_counter()
    net = train_feature_classifier(latents[fit], labels[fit], steps=cfg.eval.classifier_steps,
                                   seed=FEATURE_NET_SEED, device=torch.device("cpu"))
    accuracy = float((net.extract(latents[held]).video_logits.argmax(-1).cpu() == labels[held]).double().mean())
    print(f"feature net: trained in {time.perf_counter() - t0:.1f} s", flush=True)
    card = {"version": net.version, "heldout_accuracy": accuracy, "heldout_videos": len(held),
            "train_videos": len(fit), "steps": cfg.eval.classifier_steps, "images": ds.manifest.source.get("images")}
    # Each file appears whole (written aside, then renamed), the weights before the card: driver_feature_net
    # reuses a cache entry only when both are there.
    path.parent.mkdir(parents=True, exist_ok=True)
    weights, card_file = path.with_suffix(".pt.tmp"), path.with_suffix(".json.tmp")
    save_feature_net(net, weights)
    weights.replace(path)
    card_file.write_text(json.dumps(card, indent=1))
    card_file.replace(path.with_suffix(".json"))


def feature_net_card(path: Path) -> dict:
    """What travels to the workers: the weights' path, version and held-out accuracy."""
    return {**json.loads(path.with_suffix(".json").read_text()), "path": str(path)}


def build_trainer(cfg: ExperimentCfg, teacher_path: Path, *, feature_net_path: Path | None = None,
                  parent_run_id: str | None = None, callbacks: list | None = None,
                  stop_on_divergence: int | None = None, tags: dict[str, str] | None = None):
    """A TorchTrainer for `cfg`. stop_on_divergence: the per-worker batch size; when given, workers end the run
    at the first report that `workflows.sweep.divergence` calls diverged (sweep trials). tags: set on the MLflow
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=train_logging_config(),         # Ray Train's console chatter only with --verbose
            callbacks=callbacks or []))


class GroupReaderDataConfig(ray.train.DataConfig):
    """Ray Train's default splits the data set into one stream per worker; with context parallelism the cp
    ranks of a group train on the same samples, so split it into one stream per group and hand it to the
    group's first rank (rank = group·cp + c, rcm_core.mesh), which sends each batch to the others
    (rcm_core.parallel.share_batch). The other ranks hold the same iterator but never pull from it."""

    def __init__(self, cp: int = 1):
        super().__init__()
        self.cp = cp

    def _resolve_execution_options(self, name: str):
        # Ray Train replaces the dataset's execution options with ones built from the *global* DataContext,
        # which drops the preserve_order that workflows.data sets; without it two runs with the same seed get
        # their batches in different orders (measured: train/loss 91.85 vs 93.90 at step 1), and a resumed
        # worker could not replay the stream to its checkpoint's position.
        options = super()._resolve_execution_options(name)
        options.preserve_order = True
        return options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if self.cp == 1:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        groups = world_size // self.cp
        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            leaders = worker_node_ids[::self.cp] if (worker_node_ids and self._enable_shard_locality) else None
            for g, split in enumerate(ds.streaming_split(groups, equal=True, locality_hints=leaders)):
                for c in range(self.cp):
                    out[g * self.cp + c][name] = split
        return out


def _strip_scheme(storage: str, fs) -> str:
    """With an explicit filesystem Ray wants `bucket/path`, not `s3://bucket/path`."""
    return storage.split("://", 1)[1] if fs is not None else storage


def storage_filesystem(storage: str, endpoint: str = ""):
    """pyarrow's S3 client for s3:// storage, with the endpoint from `endpoint` (the config's data.s3_endpoint),
    else AWS_ENDPOINT_URL (moto, MinIO…); None for other storage and for AWS itself."""
    if not storage.startswith("s3://"):
        return None
    import pyarrow.fs as pafs
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
    if not endpoint:
        return None                      # real AWS: Ray resolves the filesystem from the URI itself
    scheme, host = endpoint.split("://", 1)
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme,
                             region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def run_storage(cfg: ExperimentCfg) -> tuple[str, object]:
    """Where Ray Train keeps the run's checkpoints: (path as Ray wants it, filesystem or None)."""
    storage = cfg.train.storage_path or str(Path(cfg.train.run_dir).resolve().parent / "ray_results")
    fs = storage_filesystem(storage, cfg.data.s3_endpoint)
    return _strip_scheme(storage, fs), fs


def check_device(cfg: ExperimentCfg) -> None:
    """Under Ray the worker's device is the one Ray assigns: a GPU exactly when resources.use_gpu is true. A
    train.device that says otherwise would be silently ignored, so it is refused."""
    wants_cuda = cfg.train.device.startswith("cuda")
    if wants_cuda != cfg.resources.use_gpu:
        raise ConfigError(f"train.device={cfg.train.device} but resources.use_gpu={str(cfg.resources.use_gpu).lower()}"
                          f": Ray workers get a GPU only with resources.use_gpu=true, and then train on it. Set both "
                          f"(train.device=cuda resources.use_gpu=true) or neither (train.device=cpu "
                          f"resources.use_gpu=false)")


RESUMED_TAG, FORCED_TAG = "rcm.resume.changed", "rcm.resume.forced"


def latest_ray_checkpoint(cfg: ExperimentCfg):
    """The newest checkpoint of the Ray Train run `{name}-ray` (what a run of this config resumes from) and the
    metrics reported with it, or None when there is none yet."""
    from ray.train.v2.api.result import Result

    path, fs = run_storage(cfg)
    try:
        result = Result.from_path(f"{path.rstrip('/')}/{cfg.name}-ray", storage_filesystem=fs)
    except RuntimeError:                       # no run folder, or no checkpoint written yet
        return None
    return None if result.checkpoint is None else (result.checkpoint, result.metrics or {})


def latest_run_config(cfg: ExperimentCfg) -> dict | None:
    """The config saved in the checkpoint a run of `cfg` would resume from, {} for a checkpoint without one
    (written before configs were saved), None when there is no checkpoint."""
    from rcm_core.checkpoint import RUN_CONFIG_FILE

    latest = latest_ray_checkpoint(cfg)
    if latest is None:
        return None
    ckpt = latest[0]
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{RUN_CONFIG_FILE}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return {}


def finished_checkpoint(cfg: ExperimentCfg) -> str | None:
    """The path of the run's checkpoint if it already reached train.steps (the same command run again): then
    there is nothing to train, and no worker needs to start."""
    latest = latest_ray_checkpoint(cfg)
    if latest is None or latest[1].get("step", -1) < cfg.train.steps:
        return None
    return latest[0].path


def check_resume(cfg: ExperimentCfg, *, allow_changed: bool = False) -> dict[str, str]:
    """Before a run resumes its checkpoint, compare the config it was trained with: keys that shape training must
    be the same (a different λ must not continue a run whose MLflow params say another); steps, logging and
    evaluation keys may change. Returns the MLflow tags that record what changed; raises ConfigError naming the
    differing keys unless `allow_changed` (--resume-changed), which is then recorded as a tag too."""
    from rcm_core.config import resume_changes

    saved = latest_run_config(cfg)
    if saved is None:
        return {}
    unknown = {"config": ("not recorded (a checkpoint from before configs were saved)", "this one")}
    shaping, free = resume_changes(saved, cfg) if saved else (unknown, {})
    show = lambda d: "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in d.items())   # noqa: E731
    tags = {RESUMED_TAG: show(free)[:5000]} if free else {}
    if shaping and not allow_changed:
        raise ConfigError(f"run '{cfg.name}' has a checkpoint trained with another config ({show(shaping)}), and "
                          f"running it again continues that run. Either give this run a new name (name=NEW), or "
                          f"continue the old run anyway with --resume-changed (recorded as the MLflow tag "
                          f"{FORCED_TAG})")
    if free:
        print(f"run '{cfg.name}' resumes with: {show(free)}", flush=True)
    if shaping:
        tags[FORCED_TAG] = show(shaping)[:5000]
        print(f"run '{cfg.name}' resumes despite (--resume-changed): {show(shaping)}", flush=True)
    return tags


def init_ray(address: str | None) -> None:
    import ray

    from workflows.console import ray_init_kwargs, worker_env

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Workers import rcm_core/workflows by module name (pitfall P10): ship this checkout as the working dir.
    # The quiet-output settings (workflows/console.py) travel with it, so a cluster's workers get them too.
    env_vars = {"PYTHONPATH": str(ROOT), **worker_env()}
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` Ray refuses to merge a key the job's own runtime env already sets: keep the job's.
        taken = job_env_vars()
        ray.init(address=address or os.environ["RAY_ADDRESS"], **ray_init_kwargs(),
                 runtime_env={"env_vars": {k: v for k, v in env_vars.items() if k not in taken}})
        return
    # More logical CPUs than cores: the work is small and Ray Data needs slots beside the workers (P6).
    # The dashboard stays on (bound to loopback): it also serves the State API, which Ray Train's
    # PlacementGroupCleaner polls every second; without it each poll logs "Failed to query Ray Train Controller
    # actor state" (measured: 25 such lines in a 60-step run). The State API client finds its server through
    # RAY_API_SERVER_ADDRESS, else by looking for Ray on this machine, which fails when another Ray runs here too
    # ("Found multiple active Ray instances"): name ours. One machine has no node to be preempted: Ray Train's
    # preemption watcher would only add a core_worker error line about its restarts.
    port = free_port()
    env_vars.update(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env={"env_vars": env_vars}, object_store_memory=512 * 2 ** 20,
             log_to_driver=True, **ray_init_kwargs())
    print(f"Ray: a local instance for this run; its dashboard: http://127.0.0.1:{port}", flush=True)


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env this driver was submitted with (`ray job submit`), else {}."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else {}
    except (ValueError, AttributeError):
        return {}


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="rCM distillation on Ray Train (Ray Data input, MLflow tracking).")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: %(default)s)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)")
    ap.add_argument("--resume-changed", action="store_true",
                    help="continue the run's checkpoint although keys that shape training differ from the config it "
                         f"was trained with (recorded as the MLflow tag {FORCED_TAG}); default: refuse and name them")
    ap.add_argument("--full-table", action="store_true", help="print every metric of the step-count table (wide; "
                    "the default table fits 100 columns)")
    ap.add_argument("--verbose", action="store_true", help="show Ray's own logs and Ray Data's progress bars")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.reg_weight=0.1")
    args = ap.parse_args(argv)
    setup_output(args.verbose)
    cfg = absolute_paths(load_config(args.config, args.overrides))
    check_device(cfg)
    cfg = prepare_data(cfg)                              # before the comparison: it resolves data.url
    resume_tags = check_resume(cfg, allow_changed=args.resume_changed)
    checkpoint = finished_checkpoint(cfg)
    if checkpoint is not None:
        print(f"run '{cfg.name}' finished its {cfg.train.steps} steps before: nothing to train", flush=True)
    else:
        teacher_path = driver_teacher(cfg)
        feature_net_path = driver_feature_net(cfg)
        init_ray(args.address)
        preflight(cfg)          # a mesh that cannot fit on the GPUs stops here, not in an OOM on the workers
        result = build_trainer(cfg, teacher_path, feature_net_path=feature_net_path, tags=resume_tags).fit()
        checkpoint = result.checkpoint.path if result.checkpoint else None
    print(summary(cfg, checkpoint or "(none)", full_table=args.full_table))
    return 0


def summary(cfg: ExperimentCfg, checkpoint: str, *, full_table: bool = False) -> str:
    """The printout after a run: the step-count table (short, or every metric), then where everything is."""
    from workflows.console import final_printout, run_info
    from workflows.tracking import tracking_uri

    run_dir = Path(cfg.train.run_dir).resolve()
    table_file = run_dir / ("eval_table_full.txt" if full_table else "eval_table.txt")
    table = table_file.read_text().rstrip() if table_file.is_file() else "(no evaluation table written)"
    figure = run_dir / "comparison" / "samples.png"
    ids = run_info(run_dir)
    return final_printout(table=table, run_dir=run_dir, uri=redact_url(tracking_uri(cfg)),  # printed: no credentials
                          experiment=cfg.tracking.experiment, checkpoint=checkpoint,
                          experiment_id=ids.get("experiment_id"), run_id=ids.get("run_id"),
                          figure=str(figure) if figure.is_file() else None,
                          full_table=None if full_table else run_dir / "eval_table_full.txt")


if __name__ == "__main__":
    sys.exit(run_cli(main))
