"""What the driver prepares before any worker starts: absolute paths, the data set (written once for built-in
sources, checked against the data.* keys), the teacher (loaded where it lies, or a toy teacher trained once and
cached), the data set's evaluation classifier (trained once, cached), and the rows of the teacher check."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from rcm_core.config import ConfigError, ExperimentCfg
from rcm_core.data.latents import iterate_batches, read_manifest
from workflows.storage import output_root


def teacher_probe(cfg: ExperimentCfg) -> dict:
    """The first rows of the data set's first shard, as the workers read them (same normalisation), for the
    teacher check; as many as `rcm_core.method.tangent_check.check_rows` asks for the latent's size."""
    import math

    from rcm_core.data.latents import read_shard
    from rcm_core.method.tangent_check import check_rows

    m = read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint)
    arrays, _ = read_shard(cfg.data.url, m.shards[0], m, endpoint=cfg.data.s3_endpoint,
                           on_bad_row=cfg.data.on_bad_row, do_normalize=cfg.data.normalize)
    n = check_rows(math.prod(m.latent_shape))
    return {k: v[:n] for k, v in arrays.items() if k in ("latent", "label", "cond")}

def absolute_paths(cfg: ExperimentCfg) -> ExperimentCfg:
    """Ray workers run in their own working directory: resolve local paths on the driver first. Inputs
    (data.url, teacher.checkpoint) resolve against the current folder; the run's outputs (train.run_dir and the
    default MLflow file) against `output_root()`, which under `ray job submit` lies outside Ray's temporary copy."""
    from workflows.tracking import tracking_uri

    base = output_root()
    for section, key in (("train", "run_dir"), ("data", "url"), ("teacher", "checkpoint")):
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value and not Path(value).is_absolute():
            root = base if (section, key) == ("train", "run_dir") else Path.cwd()
            setattr(getattr(cfg, section), key, str((root / value).resolve()))
    cfg.tracking.tracking_uri = tracking_uri(cfg, base)
    return cfg

def prepare_data(cfg: ExperimentCfg) -> ExperimentCfg:
    """Built-in sources are written once to data.url (default runs/data/<name>-<source>) and then read as a data
    set; a data set already there must be the one the data.* keys describe (`check_data_request`)."""
    from workflows.data import DatasetAbsent, check_storage
    from workflows.prepare_latents import prepare

    if cfg.data.source in ("gmm", "moving_fashion"):
        url = cfg.data.url or str(output_root() / "runs" / "data" / f"{cfg.name}-{cfg.data.source}")
        try:
            there = check_storage(url, cfg.data.s3_endpoint)
        except DatasetAbsent:       # only "nothing there yet" writes it; a broken manifest or storage raises
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
    """The data set's version for the teacher cache (`rcm_core.run.teacher.teacher_key`): its manifest's content (shards,
    row counts, channel statistics, generator), not its URL. A different data set rewritten at the same URL gets a
    new teacher; the same data set copied elsewhere keeps its teacher."""
    manifest = vars(read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint))
    return "manifest-" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]

def driver_teacher(cfg: ExperimentCfg) -> Path:
    """What the workers load as the teacher (`worker_teacher`): teacher.checkpoint as it is, a file or a Wan2.1
    folder, never loaded, copied or written here; without one, a toy teacher trained once on the driver from the
    run's data set and cached under .cache/teachers by `teacher_key` (config and the data set's manifest)."""
    from rcm_core.run.teacher import load_or_train_teacher, teacher_key
    from rcm_core.eval.video_samples import data_card

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

    from rcm_core.data.latents import LatentDataset
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

def check_device(cfg: ExperimentCfg) -> None:
    """Under Ray the worker's device is the one Ray assigns: a GPU exactly when resources.use_gpu is true. A
    train.device that says otherwise would be silently ignored, so it is refused."""
    wants_cuda = cfg.train.device.startswith("cuda")
    if wants_cuda != cfg.resources.use_gpu:
        raise ConfigError(f"train.device={cfg.train.device} but resources.use_gpu={str(cfg.resources.use_gpu).lower()}"
                          f": Ray workers get a GPU only with resources.use_gpu=true, and then train on it. Set both "
                          f"(train.device=cuda resources.use_gpu=true) or neither (train.device=cpu "
                          f"resources.use_gpu=false)")
