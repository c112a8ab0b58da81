"""Ray Data over the latent data set: storage checks that fail fast, and a Dataset for Ray Train workers.

    python -c "from workflows.data import check_storage; check_storage('s3://rcm-data/mf', 'http://127.0.0.1:9000')"

Driver side (before any worker starts):

    check_storage(cfg.data.url, cfg.data.s3_endpoint)                  # names the URL on any storage problem
    ds = make_ray_dataset(cfg.data)                                    # read_parquet → map_batches(decode) → shuffle
    TorchTrainer(train_fn, datasets={"train": ds}, ...)

Worker side (inside `train_fn`):

    it = ray.train.get_dataset_shard("train")
    for batch in it.iter_torch_batches(batch_size=per_worker_batch, prefetch_batches=2):
        batch = LatentBatch.from_numpy_batch(batch)                    # core type from the worker's first lines

Resuming (a restarted worker, a re-run driver): `resumable_batches(shard, per_worker_batch)` is a callable
`start_step -> iterator` that `rcm_core.run.loop.run_training` asks for the stream from the checkpoint's step, so a
resumed run sees the batches the uninterrupted one would have seen. That holds because the order is
reproducible: the dataset keeps Ray Data's `preserve_order` on (without it two executions of the same seeded
shuffle differ, measured) and a fresh execution of the dataset replays epoch 0, 1, … with the same seeds. Ray
Train rebuilds a dataset's execution options when it splits it, so its DataConfig must keep the flag too
(`workflows.data_config.GroupReaderDataConfig`).

S3 reads go through pyarrow's S3 client, wrapped by Ray Data in its retry layer: "AWS Error NETWORK_CONNECTION"
(a refused or dropped connection) and the other transient errors in `DataContext.retried_io_errors` are retried
10 times with exponential back-off up to 32 s between tries, about 3 minutes in all, before the read fails. The
same errors raised in any other operator of the dataset (file listing, decoding) re-run that task up to
`MAP_RETRIES` times; Ray skips the blocks a retried task had already produced, so no row is read twice.

Decoding uses `rcm_core.data.latents.decode_batch`, the same function as the local iterator, so a bad shard fails (or is
skipped) identically on both paths. Each epoch (each execution of the dataset) is reshuffled from
`data.shuffle_seed`. Skipped rows (`data.on_bad_row=skip`) are logged by the workers and counted in a
`BadRowCounter` actor when one is passed in.
"""
from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import ray

from rcm_core.config import DataCfg, ExperimentCfg
from rcm_core.data.latents import (MANIFEST, DatasetError, LatentBatch, Manifest, decode_batch, filesystem, read_manifest,
                           storage_options)

log = logging.getLogger(__name__)


MAP_RETRIES = 10          # per map task, for storage errors only (DataContext.retried_io_errors patterns)
# Parquet footer-reader actors per listing (Ray's default is 32). One: Ray kills the pool as soon as the footers it
# needs are read, and an actor still being created then (one that got no footer batch, e.g. the second of two for
# a data set of under 10 files) makes the GCS print "Failed to kill actor … Socket closed" (issue 27; seen in 3 of 9
# demo-path runs with 2). One actor reads up to 128 footers at once on its own threads.
FOOTER_ACTORS = 1


class StorageError(DatasetError):
    """Storage is unreachable or unusable; the message starts with the URL."""


class DatasetAbsent(StorageError):
    """Storage is reachable and no data set is there yet (no folder, or no manifest): the one case in which a
    built-in source may be written (workflows.driver.prepare_data)."""


# ----------------------------------------------------------------------------------------------------------
# Fail fast, before workers start.

def _endpoint_reachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """None if a TCP connection to the endpoint opens, else the reason."""
    u = urllib.parse.urlparse(endpoint)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return str(e)


def _check_s3(url: str, endpoint: str) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    endpoint = storage_options(url, endpoint).get("endpoint_url", "")
    if endpoint:
        why = _endpoint_reachable(endpoint)
        if why:
            raise StorageError(f"{url}: cannot reach the S3 endpoint {endpoint} ({why}); check data.s3_endpoint "
                               f"or AWS_ENDPOINT_URL")
    bucket = urllib.parse.urlparse(url).netloc
    cfg = botocore.config.Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1})
    # a fresh session: boto3's default one caches credentials it resolved earlier in this process
    client = boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=cfg)
    where = f"endpoint {endpoint}" if endpoint else "AWS S3"
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           f"(or AWS_PROFILE)") from None
    except botocore.exceptions.EndpointConnectionError as e:
        raise StorageError(f"{url}: cannot connect to {where} ({e})") from None
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{url}: bucket '{bucket}' does not exist at {where}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{url}: access to bucket '{bucket}' at {where} denied ({code}); check the "
                               f"credentials") from None
        raise StorageError(f"{url}: {where} answered {code}: {e}") from None


def check_storage(url: str, endpoint: str = "", *, must_exist: bool = True) -> Manifest | None:
    """Check that `url` is usable: endpoint reachable, credentials present, bucket there, and (must_exist) a valid
    data set whose manifest agrees with its shards. Raises StorageError / DatasetError naming the URL."""
    if not url:
        raise StorageError("data.url is empty: give a folder or s3://bucket/prefix holding manifest.json")
    if url.startswith(("s3://", "s3a://")):
        _check_s3(url, endpoint)
    elif "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if must_exist and not os.path.isdir(path):
            raise DatasetAbsent(f"{url}: no such folder (write the data set with workflows/prepare_latents.py)")
    if not must_exist:
        return None
    fs, root = filesystem(url, endpoint)
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise DatasetAbsent(f"{url}: no {MANIFEST} there (write it with `python workflows/prepare_latents.py "
                           f"data.url={url}`)")
    return read_manifest(url, endpoint=endpoint)


def check_batching(m: Manifest, num_workers: int, batch_size: int) -> int:
    """Per-worker batches per epoch; raises with the numbers when the workers cannot each get one batch."""
    workers = max(num_workers, 1)
    per_worker = m.num_rows // workers
    if per_worker < batch_size:
        raise DatasetError(f"{m.num_rows} rows over {workers} worker(s) is {per_worker} rows each, fewer than one "
                           f"batch of {batch_size}; lower data.batch_size or resources.num_workers, or write more rows")
    return per_worker // batch_size


# ----------------------------------------------------------------------------------------------------------
# The Ray dataset.

@ray.remote(num_cpus=0)
class BadRowCounter:
    """Collects the rows skipped by `map_batches` across all read tasks (data.on_bad_row=skip)."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def add(self, rows: list[str]) -> None:
        self.rows.extend(rows)

    def get(self) -> list[str]:
        return list(self.rows)


def _decode(batch: dict, *, manifest: dict, scheme: str, on_bad_row: str, do_normalize: bool,
            counter: Any = None) -> dict:
    """map_batches function: Parquet columns (+ Ray's `path` column) → decoded, normalised arrays.

    A plain function, not a callable class: a class would make Ray Data start an actor pool per execution."""
    m = Manifest(**manifest)
    paths = [f"{scheme}{p}" for p in batch["path"]]
    arrays, skipped = decode_batch(batch, m, shard=paths, on_bad_row=on_bad_row, do_normalize=do_normalize)
    for b in skipped:
        log.warning("skipped bad row: %s", b)
    if skipped and counter is not None:
        counter.add.remote([str(b) for b in skipped])
    return arrays


def _arrow_filesystem(url: str, endpoint: str, fs: Any) -> Any:
    """pyarrow's own S3 client for s3:// (1.5–2.5× faster reads than s3fs behind FSSpecHandler, measured on the
    moto server; docs/BENCHMARKS.md), the fsspec filesystem wrapped for anything else. Credentials are resolved
    by each worker from the standard AWS variables (put them in the job's runtime_env, never in configs)."""
    import pyarrow.fs as pafs

    if url.startswith(("s3://", "s3a://")):
        ep = storage_options(url, endpoint).get("endpoint_url", "")
        if not ep:
            return pafs.S3FileSystem()
        u = urllib.parse.urlparse(ep)
        return pafs.S3FileSystem(endpoint_override=u.netloc, scheme=u.scheme or "https",
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def make_ray_dataset(cfg: DataCfg | ExperimentCfg, *, shuffle: bool = True,
                     bad_rows: Any = None) -> ray.data.Dataset:
    """The data set at `cfg.url` as a Ray Dataset of {"id", "latent" [C,T,H,W] float32, "label" | "cond"} rows,
    decoded in `map_batches` and (shuffle=True) reshuffled every epoch from `cfg.shuffle_seed`.

    Pass `bad_rows=BadRowCounter.remote()` to count rows skipped under on_bad_row=skip."""
    from ray.data import RandomSeedConfig

    d = cfg.data if isinstance(cfg, ExperimentCfg) else cfg
    # Ray 2.60's Parquet reader starts 32 footer-reader actors per execution by default: each is a Python
    # process, and on a small machine starting them dominated (30–50 s vs 3–4 s for 40 rows; docs/BENCHMARKS.md).
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(FOOTER_ACTORS))
    m = check_storage(d.url, d.s3_endpoint)
    fs, root = filesystem(d.url, d.s3_endpoint)
    paths = [f"{root}/{s['path']}" for s in m.shards]
    scheme = d.url.split("://", 1)[0] + "://" if "://" in d.url else ""
    # One read task per shard at most, so shards stream to the workers instead of arriving at the end (P5).
    ds = ray.data.read_parquet(paths, filesystem=_arrow_filesystem(d.url, d.s3_endpoint, fs), include_paths=True,
                               override_num_blocks=len(paths))
    # Reproducible order: blocks leave every operator in input order, so the seeded shuffle below gives the same
    # rows in the same order on every execution (the derived datasets share this context object).
    ds.context.execution_options.preserve_order = True
    # Transient storage errors inside any operator (Ray 2.60 lists files in a map task of its own, outside the
    # I/O retry layer) re-run that task from where it stopped; items already yielded are skipped, not repeated.
    ds.context.retried_map_errors = list(ds.context.retried_io_errors)
    ds.context.max_map_retries = MAP_RETRIES
    ds = ds.map_batches(_decode, batch_format="numpy", batch_size=None, zero_copy_batch=True,
                        fn_kwargs={"manifest": vars(m), "scheme": scheme, "on_bad_row": d.on_bad_row,
                                   "do_normalize": d.normalize, "counter": bad_rows})
    if shuffle:
        # reseed_after_execution: each epoch (a new execution) gets a new, reproducible order
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=d.shuffle_seed, reseed_after_execution=True))
    return ds


def resumable_batches(shard: Any, batch_size: int, *, prefetch_batches: int = 2
                      ) -> Callable[[int], Iterator[LatentBatch]]:
    """A batch source for `run_training`: called with the step to start from, it yields `LatentBatch`es of a
    Ray Data shard (`ray.train.get_dataset_shard`) forever, one pass per epoch, after skipping `start_step`
    batches. Skipped batches are read and dropped (whole epochs too, so each epoch keeps its own shuffle seed):
    resuming costs one read of the data up to the saved position, no training."""
    def stream(start_step: int = 0) -> Iterator[LatentBatch]:
        skip = start_step
        while True:
            n = 0
            for batch in shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches,
                                                  drop_last=True):
                n += 1
                if skip:
                    skip -= 1
                    continue
                yield LatentBatch.from_numpy_batch(batch)
            if n == 0:
                raise DatasetError(f"an epoch of the Ray Data shard gave no batch of {batch_size} rows")
    return stream
