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

from rcm_core.config import ExperimentCfg, from_dict, load_config, redact_url, to_dict  # noqa: E402
from rcm_core.data import iterate_batches, read_manifest  # noqa: E402
from rcm_core.parallel import full_state_dict, is_collective, run_shape  # noqa: E402
from workflows.cli import add_debug_flag, run_cli  # noqa: E402
from workflows.console import (log_comparison_figure, print_eval_line, quiet_worker_logs,  # noqa: E402
                               setup_output, write_step_count_tables)

DEFAULT_CONFIG = ROOT / "experiments" / "demo.yaml"


# ----------------------------------------------------------------------------------------------------------
# Worker side

def _evaluator(cfg: ExperimentCfg, teacher, manifest: dict, device: torch.device, feature_net=None):
    """Step-count evaluator of the run. `feature_net`: the data set's own classifier (`driver_feature_net`),
    which adds the `*_feat` metrics, class_acc and, for video, the temporal ones; None = random projection only."""
    from rcm_core.eval.features import RandomProjection
    from rcm_core.evaluate import EvalBank, StepCountEvaluator
    from rcm_core.pipeline import toy_evaluator, toy_gmm

    if manifest.get("source", {}).get("name") == "gmm" and not cfg.data.normalize:
        return toy_evaluator(cfg, teacher, toy_gmm(cfg), device)
    shape = manifest["latent_shape"]
    n, k = cfg.eval.num_samples, max(manifest.get("num_classes") or 1, 1)
    bank = EvalBank.make(shape, torch.arange(n) % k, cfg.eval.seed)
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
    from rcm_core.teacher import load_teacher
    from workflows.data import resumable_batches

    cfg = from_dict(config["cfg"], "train_loop_config")
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    teacher = load_teacher(config["teacher_path"], cfg, device)
    shard = ray.train.get_dataset_shard("train")
    extra: dict = {}
    collective = is_collective(cfg.parallel, world)      # FSDP/CP: every rank joins evaluation forwards
    evaluates = rank == 0 or collective
    feature_net, tags = _worker_feature_net(config.get("feature_net"), device) if evaluates else (None, {})
    reporter = RayReporter(cfg, rank, extra, config.get("parent_run_id"), _stop_rule(config), tags=tags)
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
    ema_weights = full_state_dict(state.ema.module.net)      # collective when sharded
    if rank == 0:
        tracker = reporter.ensure_tracker()
        _log_final_artifacts(cfg, tracker, state, evaluator, config["manifest"], ema_weights)
        write_step_count_tables(cfg.train.run_dir, tracker, evaluator.last_report)
        tracker.finish()


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
    """Resolved config, samples per step count (PNG; GIF for video), the comparison figure, the EMA student."""
    from rcm_core.config import dump_yaml
    from rcm_core.samples import save_sample_pictures
    from rcm_core.teacher import save_teacher

    tracker.log_text(dump_yaml(cfg), "config/resolved.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        labels = evaluator.bank.labels if evaluator.bank.labels.dim() == 1 else None
        for path in save_sample_pictures(evaluator.last_samples, manifest, Path(tmp), labels=labels):
            tracker.log_artifact(path, "samples")
        log_comparison_figure(cfg, tracker, evaluator, manifest, labels)
        student = save_teacher(state.ema.module, cfg, Path(tmp) / "ema_student.pt", net_state=ema_weights)
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
    """Built-in sources are written once to data.url (default runs/data/<source>) and then read as a data set."""
    from workflows.data import check_storage
    from workflows.prepare_latents import prepare

    if cfg.data.source in ("gmm", "moving_fashion"):
        url = cfg.data.url or str(Path("runs", "data", f"{cfg.name}-{cfg.data.source}").resolve())
        try:
            check_storage(url, cfg.data.s3_endpoint)
        except Exception:
            cfg.data.url = url
            prepare(cfg.data)
        cfg.data.url = url
    check_storage(cfg.data.url, cfg.data.s3_endpoint)       # fail before any worker starts, naming the URL
    return cfg


def driver_teacher(cfg: ExperimentCfg) -> Path:
    """Load or train the teacher once, on the driver, from the same data set (cached by config hash)."""
    from rcm_core.teacher import load_or_train_teacher, save_teacher, teacher_key

    path = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else Path(".cache", "teachers").resolve() / (
        f"teacher-{teacher_key(cfg, cfg.data.url)}.pt")
    if not path.is_file():
        batches = iterate_batches(cfg.data.url, cfg.teacher.train_batch_size, seed=cfg.train.seed + 1,
                                  endpoint=cfg.data.s3_endpoint, do_normalize=cfg.data.normalize)
        teacher = load_or_train_teacher(cfg, batches, device=torch.device("cpu"), data_key=cfg.data.url,
                                        cache_dir=path.parent)
        save_teacher(teacher, cfg, path)
    return path


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
                  stop_on_divergence: int | None = None):
    """A TorchTrainer for `cfg`. stop_on_divergence: the per-worker batch size; when given, workers end the run
    at the first report that `workflows.sweep.divergence` calls diverged (sweep trials)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from workflows.console import train_logging_config
    from workflows.data import check_batching, make_ray_dataset

    manifest = read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint)
    r = cfg.resources
    shape = run_shape(cfg.parallel, max(r.num_workers, 1))
    readers = shape.data_parallel_size                   # one reader per context-parallel group
    check_batching(manifest, readers, cfg.data.batch_size // readers)
    if cfg.data.batch_size % readers:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {readers} data-parallel "
                         f"groups (resources.num_workers={r.num_workers} / parallel.cp={shape.cp}); choose a multiple")
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    storage = cfg.train.storage_path or str(Path(cfg.train.run_dir).resolve().parent / "ray_results")
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "teacher_path": str(teacher_path), "manifest": vars(manifest),
                           "feature_net": feature_net_card(feature_net_path) if feature_net_path else None,
                           "parent_run_id": parent_run_id, "stop_on_divergence": stop_on_divergence},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        datasets={"train": make_ray_dataset(cfg)},
        dataset_config=GroupReaderDataConfig(shape.cp),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-ray", storage_path=_strip_scheme(storage, fs := storage_filesystem(storage)),
            storage_filesystem=fs,
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


def storage_filesystem(storage: str):
    """pyarrow's S3 client for s3:// storage, with the endpoint from AWS_ENDPOINT_URL (moto, MinIO…)."""
    if not storage.startswith("s3://"):
        return None
    import pyarrow.fs as pafs
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if not endpoint:
        return None                      # real AWS: Ray resolves the filesystem from the URI itself
    scheme, host = endpoint.split("://", 1)
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme,
                             region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


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
    ap.add_argument("--full-table", action="store_true", help="print every metric of the step-count table (wide; "
                    "the default table fits 100 columns)")
    ap.add_argument("--verbose", action="store_true", help="show Ray's own logs and Ray Data's progress bars")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.reg_weight=0.1")
    args = ap.parse_args(argv)
    setup_output(args.verbose)
    cfg = prepare_data(absolute_paths(load_config(args.config, args.overrides)))
    teacher_path = driver_teacher(cfg)
    feature_net_path = driver_feature_net(cfg)
    init_ray(args.address)
    result = build_trainer(cfg, teacher_path, feature_net_path=feature_net_path).fit()
    print(summary(cfg, result.checkpoint.path if result.checkpoint else "(none)", full_table=args.full_table))
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
