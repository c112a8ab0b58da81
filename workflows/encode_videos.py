"""Clips + captions → a latent data set, on Ray Data: decode, fit, Wan2.1 VAE and umT5 in actor pools, Parquet.

    python workflows/prepare_latents.py data.source=videos data.video.clips=s3://my-bucket/clips \
        data.video.encoders=s3://my-bucket/Wan2.1-T2V-1.3B-Diffusers data.url=s3://my-bucket/latents/clips480

The pipeline (one Ray Data dataset, streaming, blocks of one clip):

    clip list ─ decode + fit (tasks, CPU) ─ VAE encode (actor pool) ─ umT5 encode (actor pool) ─ driver: shards

- Clips: every file with a video extension under `data.video.clips` (a folder or any fsspec URL), sorted by path;
  row id = position in that list. Captions: `captions.jsonl` ({"file": ..., "caption": ...} per line) or
  `captions.csv` (columns file, caption) beside the clips (or `data.video.captions`), else `<clip stem>.txt`.
- Decoding reads the clip straight from storage with PyAV, stops at `data.video.frames` frames, scales to cover
  `height × width` and centre-crops (rcm_core/data/clips.py). Pixels travel as uint8.
- The VAE and umT5 actors take one GPU each when the cluster has enough, share them when it has fewer (one GPU
  holds a VAE and an umT5 actor), and run on CPU on a cluster without GPUs (`data.video.gpus_per_actor` sets it by
  hand); `data.video.vae_actors` / `text_actors` set the pool sizes. Each loads its model once. Without GPUs Ray
  fuses decoding into the VAE actor (same resources), so clips are decoded and encoded one after the other there.
- A clip that cannot be decoded, is too short, or has no caption is logged by name, counted, and skipped; it never
  ends the job. Counts and the first names are in the manifest's `source.skipped`, every name in `progress/`.
  A storage error while reading a clip is not the clip's fault: it stops the job naming the clip, and re-running
  the command resumes.
- Shard k holds the clips k·R … (k+1)·R − 1 of the sorted list (R = data.rows_per_shard), so a shard is known
  before it is encoded. When all its clips are through, the driver writes `shard-0000k.parquet` and then
  `progress/shard-0000k.json` (its clip names, skipped clips and channel statistics). Re-running the same command
  skips every shard with a progress file: nothing is encoded twice. manifest.json is written last.
- Latents are stored raw (the VAE posterior's mean). Readers normalise with the manifest's channel statistics:
  by default the VAE's own `latents_mean` / `latents_std` (`data.video.channel_stats=vae`, Wan's coordinates, what
  a Wan2.1 teacher was trained in), or the statistics measured on these clips (`=dataset`, for a teacher trained
  here); the measured ones are always in the manifest's `source.measured`.
- Memory is bounded by Ray Data's streaming back-pressure (a few clips in flight per operator, whatever the clip
  count) and by the driver holding at most the shards still being filled (blocks arrive in order).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from rcm_core.config import ConfigError, DataCfg, VideoCfg
from rcm_core.data.latents import MANIFEST, Manifest, _ChannelStats, _join, _shard_table, filesystem

log = logging.getLogger(__name__)

PROGRESS = "progress"
SKIP_NAMES_IN_MANIFEST = 100          # the manifest lists this many skipped clips; progress/ has them all


# ----------------------------------------------------------------------------------------------------------
# The clip list.

def _read_captions(fs: Any, root: str, v: VideoCfg) -> dict[str, str] | None:
    """{clip path relative to the clips folder: caption} from a JSONL or CSV manifest; None when there is none."""
    names = [v.captions] if v.captions else ["captions.jsonl", "captions.csv"]
    for name in names:
        path = _join(root, name)
        if not fs.exists(path):
            if v.captions:
                raise ConfigError(f"data.video.captions={v.captions!r}: not found under {v.clips}")
            continue
        text = fs.cat_file(path).decode("utf-8")
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif name.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            raise ConfigError(f"data.video.captions={name!r}: give a .jsonl or .csv file")
        try:
            return {str(PurePosixPath(r["file"])): str(r["caption"]) for r in rows}
        except KeyError as e:
            raise ConfigError(f"{v.clips}/{name}: every row needs 'file' and 'caption' (missing {e})") from None
    return None


def list_clips(v: VideoCfg, endpoint: str = "") -> list[dict]:
    """Every clip under `v.clips`, sorted: [{"id", "file" (relative), "caption" (None if it has none)}]."""
    from rcm_core.data.clips import CLIP_EXTENSIONS

    if not v.clips:
        raise ConfigError("data.source=videos needs data.video.clips (a folder or s3://bucket/prefix of clips)")
    fs, root = filesystem(v.clips, endpoint)
    if not fs.exists(root):
        raise ConfigError(f"data.video.clips={v.clips}: does not exist")
    files = sorted(p[len(root):].lstrip("/") for p in fs.find(root) if p.lower().endswith(CLIP_EXTENSIONS))
    if not files:
        raise ConfigError(f"data.video.clips={v.clips}: no clips ({', '.join(CLIP_EXTENSIONS)}) there")
    captions = _read_captions(fs, root, v)
    out = []
    for i, f in enumerate(files):
        if captions is not None:
            caption = captions.get(f)
        else:
            txt = _join(root, str(PurePosixPath(f).with_suffix(".txt")))
            caption = fs.cat_file(txt).decode("utf-8").strip() if fs.exists(txt) else None
        out.append({"id": i, "file": f, "caption": caption})
    return out


# ----------------------------------------------------------------------------------------------------------
# The operators (module-level so Ray pickles them by reference).

class StorageFile:
    """A storage file object for PyAV that remembers an exception its storage raised: PyAV turns a failed read into
    a decoding error, and a clip must not be skipped for good because the bucket had a bad moment."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.f, name)(*args)
        except Exception as e:
            self.error = e
            raise

    def read(self, n: int = -1) -> bytes:
        return self._call("read", n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call("seek", offset, whence)

    def tell(self) -> int:
        return self._call("tell")


def decode_clips(batch: dict, *, clips: str, endpoint: str, frames: int, height: int, width: int) -> dict:
    """map_batches task: read, decode and fit each clip; a bad clip gets zero pixels and its reason in `error`.
    A storage error (not the clip's fault) is raised, naming the clip: the job stops and a re-run resumes."""
    from rcm_core.data.clips import ClipError, decode_frames, fit_clip

    fs, root = filesystem(clips, endpoint)
    n = len(batch["id"])
    video = np.zeros((n, 3, frames, height, width), np.uint8)
    error = []
    for i in range(n):
        why, name = "", str(batch["file"][i])
        if not str(batch["caption"][i]).strip():
            why = "no caption"
        else:
            with fs.open(_join(root, name), "rb") as raw:
                f = StorageFile(raw)
                try:
                    video[i] = fit_clip(decode_frames(f, frames), frames_out=frames, height=height, width=width)
                except ClipError as e:
                    if f.error is not None:
                        raise OSError(f"{clips}/{name}: storage error while decoding: {f.error!r}") from f.error
                    why = str(e)
        if why:
            log.warning("skipping clip %s: %s", batch["file"][i], why)
        error.append(why)
    return {"id": batch["id"], "file": batch["file"], "caption": batch["caption"], "shard": batch["shard"],
            "video": video, "error": np.array(error, dtype=object)}


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class VAEStage:
    """Actor: the Wan VAE, loaded once; replaces `video` by `latent` (zeros for skipped clips)."""

    def __init__(self, encoders: str, dtype: str, endpoint: str, cache: str, latent_shape: list[int],
                 compile: bool = False):
        from rcm_core.data.encoders import WanVAE, resolve_dtype

        device = _device()
        self.vae = WanVAE.load(encoders, device=device, dtype=resolve_dtype(dtype, device), endpoint=endpoint,
                               cache=cache, compile=compile)
        self.shape = latent_shape

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        video = batch.pop("video")
        batch["latent"] = np.zeros((len(ok), *self.shape), np.float32)
        if ok.any():
            batch["latent"][ok] = self.vae.encode(video[ok]).numpy()
        return batch


class TextStage:
    """Actor: umT5 + tokenizer, loaded once; adds `cond` [B, L, D] (zeros for skipped clips)."""

    def __init__(self, encoders: str, dtype: str, endpoint: str, cache: str, cond_shape: list[int]):
        from rcm_core.data.encoders import UMT5Text, resolve_dtype

        device = _device()
        self.text = UMT5Text.load(encoders, device=device, dtype=resolve_dtype(dtype, device),
                                  max_length=cond_shape[0], endpoint=endpoint, cache=cache)
        self.shape = cond_shape

    def __call__(self, batch: dict) -> dict:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        batch["cond"] = np.zeros((len(ok), *self.shape), np.float32)
        if ok.any():
            batch["cond"][ok] = self.text.encode([str(x) for x in batch["caption"][ok]]).numpy()
        return batch


# ----------------------------------------------------------------------------------------------------------
# The driver: plan, resume, stream, write.

def _merge_stats(parts: list[dict], channels: int) -> tuple[list[float], list[float]]:
    """Per-shard (n, mean, m2) → the data set's per-channel mean and std (Chan et al.'s parallel merge)."""
    total = _ChannelStats(channels)
    for p in parts:
        if p["n"] == 0:
            continue
        n_b, mean_b, m2_b = p["n"], np.asarray(p["mean"]), np.asarray(p["m2"])
        delta, n = mean_b - total.mean, total.n + n_b
        total.mean = total.mean + delta * n_b / n
        total.m2 = total.m2 + m2_b + delta ** 2 * total.n * n_b / n
        total.n = n
    return total.result()


def gpus_per_actor(v: VideoCfg, cluster_gpus: float) -> float:
    """data.video.gpus_per_actor, or (-1) one GPU per actor when the cluster has one for each, else the GPUs
    shared evenly (one GPU holds a VAE and an umT5-XXL actor: 11 GB of bf16 weights), 0 on a CPU cluster."""
    if v.gpus_per_actor >= 0:
        return v.gpus_per_actor
    return min(1.0, cluster_gpus / (v.vae_actors + v.text_actors))


def encode_videos(d: DataCfg, url: str, *, progress_bar: Any = None) -> Manifest:
    """Encode `d.video.clips` into the data set at `url` (resuming from its `progress/`); returns its manifest."""
    import pyarrow.parquet as pq
    import ray
    from ray.data import ActorPoolStrategy

    from rcm_core.data.encoders import CACHE, describe_encoders, read_configs, vae_latent_shape

    v = d.video
    if not v.encoders:
        raise ConfigError("data.source=videos needs data.video.encoders: the Wan2.1 *-Diffusers folder (vae/, "
                          "text_encoder/, tokenizer/), local or s3://")
    try:
        configs = read_configs(v.encoders, endpoint=d.s3_endpoint)
        latent_shape = vae_latent_shape(configs["vae"]["config"], v.frames, v.height, v.width)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.video: {e}") from None
    cond_shape = [v.text_len, int(configs["text_encoder"]["config"]["d_model"])]
    _init_ray()
    gpus = gpus_per_actor(v, ray.cluster_resources().get("GPU", 0))
    # "auto" resolved here, so the manifest names the dtype the rows were encoded in (and a re-run on other
    # hardware that would encode in another dtype is refused by the plan check below instead of mixing them)
    dtype = v.dtype if v.dtype != "auto" else ("bfloat16" if gpus > 0 else "float32")
    encoder = describe_encoders(v.encoders, configs, dtype=dtype, frames=v.frames, height=v.height, width=v.width,
                                text_len=v.text_len, fps=v.fps)
    clips = list_clips(v, d.s3_endpoint)
    R = d.rows_per_shard
    shards = [clips[k:k + R] for k in range(0, len(clips), R)]
    fs, root = filesystem(url, d.s3_endpoint)
    fs.makedirs(_join(root, PROGRESS), exist_ok=True)
    plan = {"encoder": encoder, "rows_per_shard": R, "clips": v.clips, "latent_shape": latent_shape}
    _check_plan(fs, root, url, plan)

    done: dict[int, dict] = {}
    for k, members in enumerate(shards):
        path = _join(root, f"{PROGRESS}/shard-{k:05d}.json")
        if fs.exists(path):
            rec = json.loads(fs.cat_file(path))
            if rec["files"] != [c["file"] for c in members]:
                raise ConfigError(f"{url}: the clips of shard {k} changed since it was written ({path}); clips were "
                                  f"added or removed under {v.clips}: write to a new data.url")
            done[k] = rec
    # "" for no caption: Ray Data would turn a None among strings into a float NaN
    pending = [dict(c, shard=k, caption=c["caption"] or "") for k, members in enumerate(shards) if k not in done
               for c in members]
    print(f"videos: {len(clips)} clips in {len(shards)} shards of {R}; {len(done)} shards already written, "
          f"{len(pending)} clips to encode into latents {latent_shape} + text {cond_shape}", flush=True)
    if progress_bar is not None:
        progress_bar.total = len(clips)
        progress_bar.update(sum(len(shards[k]) for k in done))

    m = Manifest(latent_shape=latent_shape, latent_dtype="float32", cond_shape=cond_shape, cond_dtype="float32",
                 encoder=encoder)
    if pending:
        models = {"encoders": v.encoders, "dtype": dtype, "endpoint": d.s3_endpoint,
                  "cache": str(CACHE.resolve())}       # the driver's folder: actors may start elsewhere
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        ds.context.execution_options.preserve_order = True     # shards complete in order: the driver holds ≤ 2
        ds = ds.map_batches(decode_clips, batch_size=1, fn_kwargs={
            "clips": v.clips, "endpoint": d.s3_endpoint, "frames": v.frames, "height": v.height, "width": v.width})
        ds = ds.map_batches(VAEStage, batch_size=v.batch_size, compute=ActorPoolStrategy(size=v.vae_actors),
                            num_gpus=gpus,
                            fn_constructor_kwargs={**models, "latent_shape": latent_shape,
                                                   "compile": v.vae_compile})
        ds = ds.map_batches(TextStage, batch_size=v.batch_size, compute=ActorPoolStrategy(size=v.text_actors),
                            num_gpus=gpus,
                            fn_constructor_kwargs={**models, "cond_shape": cond_shape})
        buffers: dict[int, list[dict]] = {}
        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["id"])):
                k = int(batch["shard"][i])
                buffers.setdefault(k, []).append({
                    "id": int(batch["id"][i]), "file": str(batch["file"][i]), "caption": str(batch["caption"][i]),
                    "error": str(batch["error"][i]), "latent": batch["latent"][i], "cond": batch["cond"][i]})
                if progress_bar is not None:
                    progress_bar.update(1)
                if len(buffers[k]) == len(shards[k]):
                    done[k] = _write_shard(fs, root, k, sorted(buffers.pop(k), key=lambda r: r["id"]), m, pq)
        print(f"videos: encoded {len(pending)} clips in {time.perf_counter() - t0:.1f} s", flush=True)
        if buffers:
            raise RuntimeError(f"shards {sorted(buffers)} did not receive all their clips")
    return _write_manifest(fs, root, m, done, shards, v, configs["vae"]["config"])


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        from workflows.ray_session import init_ray
        init_ray(None)


def _check_plan(fs: Any, root: str, url: str, plan: dict) -> None:
    """The first run records what the shards are made of; a re-run must ask for the same, or it would mix data."""
    path = _join(root, f"{PROGRESS}/plan.json")
    if fs.exists(path):
        before = json.loads(fs.cat_file(path))
        if before != json.loads(json.dumps(plan)):
            diff = sorted(k for k in plan if before.get(k) != json.loads(json.dumps(plan[k])))
            raise ConfigError(f"{url} was started with other settings ({', '.join(diff)} differ, see {path}); "
                              f"write to a new data.url or delete that one")
        return
    with fs.open(path, "w") as f:
        f.write(json.dumps(plan, indent=1))


def _write_shard(fs: Any, root: str, k: int, rows: list[dict], m: Manifest, pq: Any) -> dict:
    """Shard k's good rows as Parquet, then its progress record (the record marks it done)."""
    good = [r for r in rows if not r["error"]]
    stats = _ChannelStats(m.latent_shape[0])
    name = f"shard-{k:05d}.parquet"
    if good:
        with fs.open(_join(root, name), "wb") as f:
            pq.write_table(_shard_table(good, m), f)
        stats.update(np.stack([r["latent"] for r in good]))
    rec = {"path": name if good else None, "rows": len(good), "files": [r["file"] for r in rows],
           "skipped": [{"file": r["file"], "reason": r["error"]} for r in rows if r["error"]],
           "stats": {"n": stats.n, "mean": stats.mean.tolist(), "m2": stats.m2.tolist()}}
    with fs.open(_join(root, f"{PROGRESS}/shard-{k:05d}.json"), "w") as f:
        f.write(json.dumps(rec))
    return rec


def _write_manifest(fs: Any, root: str, m: Manifest, done: dict[int, dict], shards: list, v: VideoCfg,
                    vae_config: dict) -> Manifest:
    skipped = [s for k in sorted(done) for s in done[k]["skipped"]]
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    for k in sorted(done):
        if done[k]["rows"]:
            m.shards.append({"path": done[k]["path"], "rows": done[k]["rows"]})
            m.num_rows += done[k]["rows"]
    if m.num_rows == 0:
        raise ConfigError(f"{v.clips}: no clip could be used ({dict(reasons)}); see the log for each clip")
    mean, std = _merge_stats([done[k]["stats"] for k in sorted(done)], m.latent_shape[0])
    if v.channel_stats == "vae":        # Wan's coordinates: (z − latents_mean) / latents_std, as its pipelines do
        m.channel_mean, m.channel_std = list(vae_config["latents_mean"]), list(vae_config["latents_std"])
    else:
        m.channel_mean, m.channel_std = mean, std
    m.source = {"name": "videos", "clips": v.clips, "clip_count": sum(len(s) for s in shards),
                "channel_stats": v.channel_stats, "measured": {"channel_mean": mean, "channel_std": std},
                "skipped": {"count": len(skipped), "reasons": dict(reasons),
                            "clips": skipped[:SKIP_NAMES_IN_MANIFEST]}}
    with fs.open(_join(root, MANIFEST), "w") as f:
        f.write(m.to_json())
    if skipped:
        print(f"videos: skipped {len(skipped)} clip(s) ({', '.join(f'{r}: {n}' for r, n in reasons.items())}); "
              f"names in the manifest's source.skipped and {PROGRESS}/shard-*.json", file=sys.stderr, flush=True)
    return m
