"""The latent data set: Parquet shards + `manifest.json`, decoding with validation, and a local iterator.

    python -c "from rcm_core.data.latents import read_manifest; print(read_manifest('runs/data/moving_fashion'))"
    python -c "from rcm_core.data.latents import iterate_batches; b = next(iterate_batches('runs/data/moving_fashion', 8, seed=0)); print(b.latent.shape)"

Write a data set with `python workflows/prepare_latents.py`; read it here without Ray (`iterate_batches`, used by
the training loop when no Ray is around) or through Ray Data (`workflows/data.py`, which calls `decode_batch` from
this module so both paths validate rows the same way).

Layout (DESIGN.md "Latent data set"), at any fsspec URL (a folder, `file://…`, `s3://bucket/prefix`, `memory://…`):

    manifest.json            schema_version, latent_shape [C,T,H,W], latent_dtype, cond_shape [L,D] or null,
                             cond_dtype, num_classes or null, channel_mean / channel_std (one per channel, of the
                             stored latents), num_rows, shards [{path, rows}] (paths relative to the URL),
                             encoder {...} (how pixels became latents), source {...} (what generated the rows)
    shard-00000.parquet      one row per video: id int64 (unique), latent binary (C·T·H·W values of latent_dtype,
                             C order), label int64 (when num_classes) or cond binary (L·D values of cond_dtype),
                             caption string (optional, may be null)

Latents are stored as the encoder produced them; readers normalise per channel with the manifest's statistics
((x − mean) / std) unless told not to, and `denormalize` undoes it before a decoder turns samples into pixels.
`s3://` URLs take the endpoint from the `endpoint` argument (config `data.s3_endpoint`) or `AWS_ENDPOINT_URL`,
credentials from the standard AWS variables. pyarrow and fsspec are imported inside functions so that importing
this module costs nothing for code that never touches files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:      # torch is imported where used: Ray Data's decode workers never pay its ~3 s import
    import torch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LATENT_DTYPES = ("float16", "float32")       # numpy has no bfloat16; store bf16 latents as float32
_STD_FLOOR = 1e-6                            # a constant channel must not turn into inf after normalising
_MAX_LOCAL_BYTES = 8 * 2**30                 # the local iterator holds everything in memory; beyond this use Ray Data
OnBadRow = Literal["error", "skip"]


class DatasetError(ValueError):
    """The data set as a whole is unusable: missing manifest or shard, counts that disagree, impossible sizes."""


class BadRowError(DatasetError):
    """One row is malformed. The message names the shard path, the row id and the field."""

    def __init__(self, shard: str, row_id: Any, fieldname: str, reason: str):
        self.shard, self.row_id, self.field, self.reason = shard, row_id, fieldname, reason
        super().__init__(f"{shard}: row id={row_id} field '{fieldname}': {reason}")


@dataclass(frozen=True)
class BadRow:
    shard: str
    row_id: Any
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: row id={self.row_id} field '{self.field}': {self.reason}"


# ----------------------------------------------------------------------------------------------------------
# The batch type the training code sees.

@dataclass
class LatentBatch:
    latent: torch.Tensor                     # float32 [B, C, T, H, W] (normalised per channel unless disabled)
    label: torch.Tensor | None = None        # int64 [B]
    cond: torch.Tensor | None = None         # float [B, L, D]
    ids: torch.Tensor | None = None          # int64 [B]: the rows' `id`, for resuming and de-duplication checks

    def __len__(self) -> int:
        return self.latent.shape[0]

    def rows(self, index: slice) -> LatentBatch:
        """The rows `index` of every field (a micro-batch of gradient accumulation)."""
        take = lambda t: None if t is None else t[index]       # noqa: E731
        return LatentBatch(take(self.latent), take(self.label), take(self.cond), take(self.ids))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LatentBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return LatentBatch(move(self.latent), move(self.label), move(self.cond), move(self.ids))

    @classmethod
    def from_numpy_batch(cls, batch: Mapping[str, Any]) -> LatentBatch:
        """From a Ray Data batch (numpy arrays from `iter_batches`, or tensors from `iter_torch_batches`)."""
        import torch

        def tensor(key: str, dtype: torch.dtype) -> torch.Tensor | None:
            if key not in batch or batch[key] is None:
                return None
            value = batch[key]
            if isinstance(value, np.ndarray) and value.dtype == object:
                value = np.stack(value)     # tensor columns can arrive as object arrays of rows (P5)
            if isinstance(value, np.ndarray) and not value.flags.writeable:
                # Arrow hands out read-only views; torch would share them and warn that writes are undefined.
                value = value.copy()
            return torch.as_tensor(value).to(dtype)
        return cls(latent=tensor("latent", torch.float32), label=tensor("label", torch.int64),
                   cond=tensor("cond", torch.float32), ids=tensor("id", torch.int64))


# ----------------------------------------------------------------------------------------------------------
# The manifest.

@dataclass(kw_only=True)
class Manifest:
    latent_shape: list[int]                  # [C, T, H, W]
    latent_dtype: str = "float32"
    cond_shape: list[int] | None = None      # [L, D] text-embedding sequence, or None
    cond_dtype: str | None = None
    num_classes: int | None = None
    channel_mean: list[float] = field(default_factory=list)
    channel_std: list[float] = field(default_factory=list)
    num_rows: int = 0
    shards: list[dict] = field(default_factory=list)      # [{"path": "shard-00000.parquet", "rows": 512}]
    encoder: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def row_bytes(self) -> int:
        return math.prod(self.latent_shape) * np.dtype(self.latent_dtype).itemsize

    @property
    def cond_bytes(self) -> int:
        return 0 if self.cond_shape is None else math.prod(self.cond_shape) * np.dtype(self.cond_dtype).itemsize

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DatasetError(f"{where}: unknown manifest keys {unknown} (known: {sorted(known)})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(f"{where}: schema_version {data.get('schema_version')!r}; this code reads "
                               f"{SCHEMA_VERSION} (rewrite the data set with workflows/prepare_latents.py)")
        m = cls(**data)
        _check_manifest_fields(m, where)
        return m


def _check_manifest_fields(m: Manifest, where: str) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DatasetError(f"{where}: {what}")
    need(len(m.latent_shape) == 4 and all(int(s) >= 1 for s in m.latent_shape),
         f"latent_shape {m.latent_shape} must be four positive sizes [C, T, H, W]")
    need(m.latent_dtype in LATENT_DTYPES, f"latent_dtype {m.latent_dtype!r} must be one of {LATENT_DTYPES}")
    need((m.cond_shape is None) == (m.cond_dtype is None), "cond_shape and cond_dtype must be given together")
    need(m.cond_shape is None or (len(m.cond_shape) == 2 and m.cond_dtype in LATENT_DTYPES),
         f"cond_shape {m.cond_shape} must be [L, D] with cond_dtype in {LATENT_DTYPES}")
    need(m.num_classes is None or m.num_classes >= 1, f"num_classes {m.num_classes} must be ≥ 1 or null")
    need(len(m.channel_mean) == len(m.channel_std) == m.latent_shape[0],
         f"channel_mean/channel_std need {m.latent_shape[0]} values each (one per channel)")
    need(sum(s["rows"] for s in m.shards) == m.num_rows,
         f"num_rows={m.num_rows} but the shards list {sum(s['rows'] for s in m.shards)} rows")


# ----------------------------------------------------------------------------------------------------------
# Storage: any fsspec URL; s3 endpoints from config or the environment.

def storage_options(url: str, endpoint: str = "") -> dict:
    """fsspec options for `url`. For s3 only the endpoint is passed: s3fs with a region fails to create
    buckets against S3-compatible servers (reference P4), and credentials come from the AWS variables."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        return {"endpoint_url": endpoint} if endpoint else {}
    return {}


def filesystem(url: str, endpoint: str = "") -> tuple[Any, str]:
    """(fsspec filesystem, root path without protocol) for a data set URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options(url, endpoint))
    return fs, root.rstrip("/")


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


# ----------------------------------------------------------------------------------------------------------
# Writing.

class _ChannelStats:
    """Running per-channel mean and variance over (rows, T, H, W), merged in float64 (Chan et al.)."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def update(self, x: np.ndarray) -> None:          # x [B, C, T, H, W]
        x = x.astype(np.float64).transpose(1, 0, 2, 3, 4).reshape(x.shape[1], -1)
        n_b, mean_b = x.shape[1], x.mean(1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(1)
        delta, n = mean_b - self.mean, self.n + n_b
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    def result(self) -> tuple[list[float], list[float]]:
        std = np.sqrt(self.m2 / max(self.n, 1))
        return self.mean.tolist(), std.tolist()


def _shard_table(rows: list[dict], m: Manifest) -> Any:
    import pyarrow as pa

    cols: dict[str, Any] = {
        "id": pa.array([int(r["id"]) for r in rows], pa.int64()),
        "latent": pa.array([np.ascontiguousarray(r["latent"], m.latent_dtype).tobytes() for r in rows],
                           pa.binary()),
    }
    if m.num_classes is not None:
        cols["label"] = pa.array([int(r["label"]) for r in rows], pa.int64())
    if m.cond_shape is not None:
        cols["cond"] = pa.array([np.ascontiguousarray(r["cond"], m.cond_dtype).tobytes() for r in rows],
                                pa.binary())
    if any(r.get("caption") is not None for r in rows):
        cols["caption"] = pa.array([r.get("caption") for r in rows], pa.string())
    return pa.table(cols)


def _check_row_for_writing(r: dict, m: Manifest, i: int) -> None:
    shape = tuple(np.shape(r["latent"]))
    if shape != tuple(m.latent_shape):
        raise DatasetError(f"row {i} (id={r.get('id')}): latent shape {shape} != latent_shape {m.latent_shape}")
    if m.num_classes is not None and not 0 <= int(r["label"]) < m.num_classes:
        raise DatasetError(f"row {i} (id={r.get('id')}): label {r['label']} outside [0, {m.num_classes})")
    if m.cond_shape is not None and tuple(np.shape(r["cond"])) != tuple(m.cond_shape):
        raise DatasetError(f"row {i} (id={r.get('id')}): cond shape {np.shape(r['cond'])} != {m.cond_shape}")


def write_shards(rows: Iterable[dict], url: str, *, rows_per_shard: int, latent_shape: Sequence[int],
                 latent_dtype: str = "float32", num_classes: int | None = None,
                 cond_shape: Sequence[int] | None = None, cond_dtype: str | None = None,
                 encoder: dict | None = None, source: dict | None = None, endpoint: str = "") -> Manifest:
    """Write rows {id, latent [C,T,H,W], label | cond [L,D], caption?} as Parquet shards plus manifest.json.

    The manifest is written last, so a reader never sees a manifest whose shards are incomplete; channel
    statistics are accumulated while writing (one pass over the rows, any number of them).
    """
    import pyarrow.parquet as pq

    if rows_per_shard < 1:
        raise DatasetError(f"rows_per_shard={rows_per_shard} must be ≥ 1")
    m = Manifest(latent_shape=[int(s) for s in latent_shape], latent_dtype=latent_dtype,
                 cond_shape=None if cond_shape is None else [int(s) for s in cond_shape],
                 cond_dtype=None if cond_shape is None else (cond_dtype or "float32"),
                 num_classes=num_classes, encoder=dict(encoder or {}), source=dict(source or {}))
    if (num_classes is None) == (cond_shape is None):
        raise DatasetError("give exactly one kind of conditioning: num_classes (labels) or cond_shape (embeddings)")
    fs, root = filesystem(url, endpoint)
    fs.makedirs(root, exist_ok=True)
    stats, buf, seen = _ChannelStats(m.latent_shape[0]), [], set()

    def flush() -> None:
        name = f"shard-{len(m.shards):05d}.parquet"
        with fs.open(_join(root, name), "wb") as f:
            pq.write_table(_shard_table(buf, m), f)
        stats.update(np.stack([np.asarray(r["latent"], np.float64) for r in buf]))
        m.shards.append({"path": name, "rows": len(buf)})
        m.num_rows += len(buf)
        buf.clear()

    for i, r in enumerate(rows):
        _check_row_for_writing(r, m, i)
        if int(r["id"]) in seen:
            raise DatasetError(f"row {i}: duplicate id {r['id']} (ids must be unique within a data set)")
        seen.add(int(r["id"]))
        buf.append(r)
        if len(buf) == rows_per_shard:
            flush()
    if buf:
        flush()
    if m.num_rows == 0:
        raise DatasetError(f"{url}: no rows to write")
    m.channel_mean, m.channel_std = stats.result()
    with fs.open(_join(root, MANIFEST), "w") as f:
        f.write(m.to_json())
    return m


# ----------------------------------------------------------------------------------------------------------
# Reading and validating.

def read_manifest(url: str, *, endpoint: str = "", check_shards: bool = True) -> Manifest:
    """Load manifest.json and (by default) check it against the shards: each listed shard exists, has the
    listed row count in its Parquet footer and the columns the manifest promises."""
    import pyarrow.parquet as pq

    fs, root = filesystem(url, endpoint)
    where = f"{url.rstrip('/')}/{MANIFEST}"
    try:
        with fs.open(_join(root, MANIFEST), "r") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{where} does not exist: write the data set with "
                           f"`python workflows/prepare_latents.py data.url={url}`") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from None
    m = Manifest.from_dict(data, where)
    if check_shards:
        for s in m.shards:
            path = f"{url.rstrip('/')}/{s['path']}"
            try:
                with fs.open(_join(root, s["path"]), "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                    names = set(meta.schema.names)
            except FileNotFoundError:
                raise DatasetError(f"{path}: listed in {where} but missing") from None
            if meta.num_rows != s["rows"]:
                raise DatasetError(f"{path}: has {meta.num_rows} rows, {where} says {s['rows']}")
            missing = sorted(set(required_columns(m)) - names)
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing} (has {sorted(names)})")
    return m


def required_columns(m: Manifest) -> list[str]:
    return ["id", "latent"] + (["label"] if m.num_classes is not None else []) + \
        (["cond"] if m.cond_shape is not None else [])


def _decode_blob(blob: Any, shape: Sequence[int], dtype: str, shard: str, row_id: Any, name: str) -> np.ndarray:
    if blob is None:
        raise BadRowError(shard, row_id, name, "is null")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise BadRowError(shard, row_id, name, f"expected bytes, got {type(blob).__name__}")
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(blob) != want:
        raise BadRowError(shard, row_id, name, f"{len(blob)} bytes, expected {want} "
                          f"({'x'.join(map(str, shape))} {dtype}): truncated or wrong shape/dtype")
    x = np.frombuffer(blob, dtype=dtype).reshape(shape)
    if not np.isfinite(x).all():
        n_bad = int((~np.isfinite(x)).sum())
        raise BadRowError(shard, row_id, name, f"{n_bad} NaN/Inf value(s)")
    return x


def decode_record(record: Mapping[str, Any], m: Manifest, *, shard: str) -> dict[str, Any]:
    """One Parquet row → {"id", "latent" float32 [C,T,H,W], "label" | "cond"}; raises BadRowError."""
    row_id = record.get("id")
    if row_id is None:
        raise BadRowError(shard, None, "id", "is null")
    out = {"id": int(row_id),
           "latent": _decode_blob(record.get("latent"), m.latent_shape, m.latent_dtype, shard, row_id, "latent")}
    if m.num_classes is not None:
        label = record.get("label")
        if label is None or not 0 <= int(label) < m.num_classes:
            raise BadRowError(shard, row_id, "label", f"{label!r} outside [0, {m.num_classes})")
        out["label"] = int(label)
    if m.cond_shape is not None:
        out["cond"] = _decode_blob(record.get("cond"), m.cond_shape, m.cond_dtype, shard, row_id, "cond")
    return out


def normalize(latent: np.ndarray, m: Manifest) -> np.ndarray:
    """(x − mean_c) / std_c over axis 1 (channels) of [B, C, T, H, W], float32."""
    mean = np.asarray(m.channel_mean, np.float32)[None, :, None, None, None]
    std = np.maximum(np.asarray(m.channel_std, np.float32), _STD_FLOOR)[None, :, None, None, None]
    return ((latent - mean) / std).astype(np.float32)


def denormalize(latent: torch.Tensor | np.ndarray, m: Manifest) -> torch.Tensor | np.ndarray:
    """Inverse of `normalize` (for samples before they are decoded to pixels); keeps the input's type."""
    mean = np.asarray(m.channel_mean, np.float64)
    std = np.maximum(np.asarray(m.channel_std, np.float64), _STD_FLOOR)
    shape = (1, -1, 1, 1, 1)
    if not isinstance(latent, np.ndarray):        # a torch tensor
        import torch

        return latent * torch.as_tensor(std, dtype=latent.dtype, device=latent.device).view(shape) + \
            torch.as_tensor(mean, dtype=latent.dtype, device=latent.device).view(shape)
    return latent * std.reshape(shape) + mean.reshape(shape)


def decode_batch(columns: Mapping[str, Sequence[Any]], m: Manifest, *, shard: str | Sequence[str],
                 on_bad_row: OnBadRow = "error", do_normalize: bool = True
                 ) -> tuple[dict[str, np.ndarray], list[BadRow]]:
    """Columns of Parquet rows → stacked arrays {"id" int64 [B], "latent" float32 [B,C,T,H,W], "label" int64 [B]
    | "cond" float32 [B,L,D]} and the list of rows skipped (on_bad_row="skip"; "error" raises BadRowError).

    `shard` is the path of the shard these rows came from, or one path per row (Ray Data's `path` column).
    This is the one decode function both the local iterator and Ray Data's `map_batches` call.
    """
    ids = columns.get("id")
    if ids is None:
        raise BadRowError(shard if isinstance(shard, str) else "<batch>", None, "id", "column missing")
    n = len(ids)
    shards = [shard] * n if isinstance(shard, str) else list(shard)
    for name in required_columns(m):
        if name not in columns:
            raise BadRowError(shards[0] if shards else "<batch>", None, name, "column missing")
    out: dict[str, list] = {k: [] for k in ["id", "latent"] + required_columns(m)[2:]}
    skipped: list[BadRow] = []
    for i in range(n):
        record = {k: columns[k][i] for k in out}
        try:
            dec = decode_record(record, m, shard=shards[i])
        except BadRowError as e:
            if on_bad_row == "error":
                raise
            skipped.append(BadRow(e.shard, e.row_id, e.field, e.reason))
            continue
        for k in out:
            out[k].append(dec[k])
    shape = tuple(m.latent_shape)
    arrays: dict[str, np.ndarray] = {
        "id": np.asarray(out["id"], np.int64),
        "latent": np.stack(out["latent"]).astype(np.float32) if out["latent"] else np.zeros((0, *shape), np.float32),
    }
    if do_normalize:
        arrays["latent"] = normalize(arrays["latent"], m)
    if "label" in out:
        arrays["label"] = np.asarray(out["label"], np.int64)
    if "cond" in out:
        arrays["cond"] = (np.stack(out["cond"]).astype(np.float32) if out["cond"]
                          else np.zeros((0, *m.cond_shape), np.float32))
    return arrays, skipped


def read_shard(url: str, shard: dict, m: Manifest, *, endpoint: str = "", on_bad_row: OnBadRow = "error",
               do_normalize: bool = True) -> tuple[dict[str, np.ndarray], list[BadRow]]:
    """Read and decode one shard listed in the manifest."""
    import pyarrow.parquet as pq

    fs, root = filesystem(url, endpoint)
    path = f"{url.rstrip('/')}/{shard['path']}"
    with fs.open(_join(root, shard["path"]), "rb") as f:
        table = pq.read_table(f, columns=[c for c in required_columns(m)])
    return decode_batch(table.to_pydict(), m, shard=path, on_bad_row=on_bad_row, do_normalize=do_normalize)


# ----------------------------------------------------------------------------------------------------------
# The local (no-Ray) path: the whole data set decoded in memory, a seeded permutation per epoch.

class LatentDataset:
    """All rows of a data set, decoded and validated once. Meant for the single-process training loop and for
    data sets that fit in memory (up to 8 GiB of latents); bigger ones stream through Ray Data."""

    def __init__(self, url: str, *, endpoint: str = "", on_bad_row: OnBadRow = "error", do_normalize: bool = True):
        self.url = url
        self.manifest = read_manifest(url, endpoint=endpoint)
        m = self.manifest
        total = m.num_rows * (m.row_bytes + m.cond_bytes) * (4 / np.dtype(m.latent_dtype).itemsize)
        if total > _MAX_LOCAL_BYTES:
            raise DatasetError(f"{url}: {total / 2**30:.1f} GiB of decoded latents is more than the local iterator "
                               f"holds in memory ({_MAX_LOCAL_BYTES / 2**30:.0f} GiB); stream it with Ray Data")
        parts, self.skipped = [], []
        for s in m.shards:
            arrays, skipped = read_shard(url, s, m, endpoint=endpoint, on_bad_row=on_bad_row,
                                         do_normalize=do_normalize)
            parts.append(arrays)
            self.skipped += skipped
        for b in self.skipped:
            log.warning("skipped bad row: %s", b)
        self.arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if len(self) == 0:
            raise DatasetError(f"{url}: every one of the {m.num_rows} rows was bad")

    def __len__(self) -> int:
        return len(self.arrays["id"])

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Whole global batches (batch_size per rank × world_size) per epoch; the remainder is dropped."""
        steps = len(self) // (batch_size * world_size)
        if steps == 0:
            raise DatasetError(f"{self.url}: {len(self)} rows cannot fill one step of batch_size={batch_size} per "
                               f"rank × world_size={world_size} = {batch_size * world_size} rows; lower "
                               f"data.batch_size or the worker count, or write more rows")
        return steps

    def indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Row indices of `rank`'s part of global step `step` (a pure function of its arguments, so resuming
        at any step gives exactly the batches an uninterrupted run would have seen)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        spe = self.steps_per_epoch(batch_size, world_size)
        epoch, within = divmod(step, spe)
        perm = np.random.default_rng([seed, epoch]).permutation(len(self))   # reshuffled each epoch
        start = within * batch_size * world_size + rank * batch_size
        return perm[start:start + batch_size]

    def batch(self, idx: np.ndarray) -> LatentBatch:
        return LatentBatch.from_numpy_batch({k: v[idx] for k, v in self.arrays.items()})


def iterate_batches(url: str | LatentDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    start_step: int = 0, *, endpoint: str = "", on_bad_row: OnBadRow = "error",
                    do_normalize: bool = True) -> Iterator[LatentBatch]:
    """Yield `LatentBatch`es of `batch_size` rows (per rank) forever, epoch after epoch, from `start_step` on.

    Step s of rank r is rows perm_e[(s mod S)·B·W + r·B : … + B] with perm_e a permutation seeded by (seed, e),
    e = s div S and S = steps per epoch, so ranks never share a row within an epoch and a resumed iterator
    (start_step = saved step) continues exactly where the interrupted one stopped.
    """
    ds = url if isinstance(url, LatentDataset) else LatentDataset(
        url, endpoint=endpoint, on_bad_row=on_bad_row, do_normalize=do_normalize)
    step = start_step
    while True:
        yield ds.batch(ds.indices(step, batch_size, seed, rank, world_size))
        step += 1
