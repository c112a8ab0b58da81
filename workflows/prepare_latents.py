"""Write a latent data set (Parquet shards + manifest.json) to a local folder or s3://bucket/prefix.

    python workflows/prepare_latents.py data.source=moving_fashion data.num_rows=512 data.url=runs/data/mf
    python workflows/prepare_latents.py --config experiments/X.yaml data.url=s3://latents/mf data.s3_endpoint=http://127.0.0.1:9000
    python workflows/prepare_latents.py --from-npz my_latents.npz data.url=s3://latents/mine

Sources (`data.source`):
  moving_fashion  Fashion-MNIST items moving over `data.frames` frames of a `data.canvas`² canvas, encoded by the
                  fixed patch DCT (rcm_core/data/codec.py) into [data.patch², T, S/p, S/p]; label = class.
  gmm             the core toy (rcm_core/data/toy.py): a class-conditional Gaussian mixture, latents [D, 1, 1, 1].
  precomputed     latents made elsewhere, from `data.precomputed` (or `--from-npz FILE`), see below.
  videos          a folder or bucket of clips + captions, encoded by the Wan2.1 VAE and umT5 on Ray Data actors
                  (data.video.*; workflows/encode_videos.py says how, README "Your own videos" gives the commands).

Your own encoder (a video VAE and a text encoder) — two ways in:
  1. Save one .npz and pass `--from-npz FILE` (or data.source=precomputed data.precomputed=FILE). Keys:
       latents   [N, C, T, H, W] float16 or float32   the VAE's latents, as the VAE produced them (not normalised;
                                                      per-channel statistics are computed here and readers normalise)
       labels    [N] int                              class conditioning, or
       cond      [N, L, D] float16 or float32         a text-embedding sequence per row (pad every row to L)
       num_classes  ()  int                           optional with labels (default: max label + 1)
       ids       [N] int64                            optional (default 0..N-1), unique
       captions  [N] str                              optional, kept in the `caption` column
       encoder   () str                               optional JSON describing the encoder (recorded in the manifest)
  2. For data sets bigger than memory, stream rows from your own loop into `rcm_core.data.latents.write_shards(rows, url,
     rows_per_shard=..., latent_shape=[C, T, H, W], num_classes=... | cond_shape=[L, D], encoder={...})`, where
     `rows` yields dicts {id, latent, label | cond, caption?}.
The last line printed says where the data set went, its row count and latent shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # run as a script from anywhere in the checkout

from rcm_core.config import ConfigError, DataCfg, load_config
from rcm_core.data.latents import Manifest, write_shards
from workflows.cli import add_debug_flag, run_cli

_CHUNK = 128    # videos generated and encoded at a time: bounded memory for any num_rows


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # delay: no bar at all for work that ends (or fails on a bad input) within a second
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True, delay=1.0)


def moving_fashion_rows(d: DataCfg, bar) -> tuple[Iterator[dict], dict]:
    from rcm_core.data.codec import PatchDCT
    from rcm_core.data.moving_fashion import generate, load_items

    if d.canvas % d.patch:
        raise ConfigError(f"data.canvas={d.canvas} must be divisible by data.patch={d.patch}")
    codec = PatchDCT(d.patch)
    h = d.canvas // d.patch
    info = {"latent_shape": [codec.channels, d.frames, h, h], "num_classes": 10,
            "encoder": codec.describe(d.frames, d.canvas),
            "source": {"name": "moving_fashion", "seed": d.seed, "frames": d.frames, "canvas": d.canvas,
                       "item_size": d.item_size,
                       # known before any row: write_shards copies `source` into the manifest when it starts
                       "images": load_items("train")[2]}}

    def rows() -> Iterator[dict]:
        for start in range(0, d.num_rows, _CHUNK):
            n = min(_CHUNK, d.num_rows - start)
            # one seed per chunk: the data set does not depend on how it is chunked when resumed or extended
            v = generate(n, frames=d.frames, size=d.canvas, item=d.item_size, seed=d.seed * 1_000_003 + start)
            lat = codec.encode(v.videos).astype(np.float32)
            for i in range(n):
                yield {"id": start + i, "latent": lat[i], "label": int(v.labels[i])}
            bar.update(n)
    return rows(), info


def gmm_rows(d: DataCfg, bar) -> tuple[Iterator[dict], dict]:
    import torch

    from rcm_core.data.toy import default_gmm  # the lead's toy; imported lazily so other sources never need it

    gmm = default_gmm(dim=d.gmm_dim)
    info = {"latent_shape": [gmm.dim, 1, 1, 1], "num_classes": gmm.num_classes, "encoder": {"name": "identity"},
            "source": {"name": "gmm", "seed": d.seed, "dim": gmm.dim, "builder": "rcm_core.data.toy.default_gmm"}}

    def rows() -> Iterator[dict]:
        g = torch.Generator().manual_seed(d.seed)
        for start in range(0, d.num_rows, 4096):
            n = min(4096, d.num_rows - start)
            x, labels = gmm.sample(n, g)
            for i in range(n):
                yield {"id": start + i, "latent": x[i].numpy(), "label": int(labels[i])}
            bar.update(n)
    return rows(), info


def precomputed_rows(path: str, bar) -> tuple[Iterator[dict], dict, int]:
    """Rows from a user's .npz (format in the module docstring)."""
    if not Path(path).is_file():
        raise ConfigError(f"precomputed latents {path!r} not found (give --from-npz FILE or data.precomputed=FILE)")
    z = np.load(path, allow_pickle=False)
    if "latents" not in z or z["latents"].ndim != 5:
        raise ConfigError(f"{path}: needs 'latents' [N, C, T, H, W]; has {[(k, z[k].shape) for k in z.files]}")
    lat = z["latents"]
    n = lat.shape[0]
    if ("labels" in z) == ("cond" in z):
        raise ConfigError(f"{path}: give exactly one of 'labels' [N] or 'cond' [N, L, D]")
    dtype = "float16" if lat.dtype == np.float16 else "float32"
    info: dict = {"latent_shape": list(lat.shape[1:]), "latent_dtype": dtype,
                  "encoder": json.loads(str(z["encoder"])) if "encoder" in z else {"name": "user"},
                  "source": {"name": "precomputed", "file": str(Path(path).resolve())}}
    if "labels" in z:
        labels = z["labels"].astype(np.int64)
        info["num_classes"] = int(z["num_classes"]) if "num_classes" in z else int(labels.max()) + 1
    else:
        cond = z["cond"]
        info["cond_shape"] = list(cond.shape[1:])
        info["cond_dtype"] = "float16" if cond.dtype == np.float16 else "float32"
    ids = z["ids"] if "ids" in z else np.arange(n)
    captions = z["captions"] if "captions" in z else None
    for key, arr in (("labels", z["labels"] if "labels" in z else None), ("cond", z["cond"] if "cond" in z else None),
                     ("ids", ids), ("captions", captions)):
        if arr is not None and len(arr) != n:
            raise ConfigError(f"{path}: '{key}' has {len(arr)} rows, 'latents' has {n}")

    def rows() -> Iterator[dict]:
        for i in range(n):
            r = {"id": int(ids[i]), "latent": lat[i]}
            r.update({"label": int(labels[i])} if "labels" in z else {"cond": cond[i]})
            if captions is not None:
                r["caption"] = str(captions[i])
            yield r
            bar.update(1)
    return rows(), info, n


def prepare(d: DataCfg, npz: str | None = None) -> tuple[str, Manifest]:
    """Generate or load the rows for `d.source` and write them to `d.url` (default runs/data/<source>)."""
    source = "precomputed" if npz else d.source
    if source == "dataset":
        raise ConfigError("data.source=dataset reads an existing data set; choose what to write with "
                          "data.source=moving_fashion|gmm|precomputed|videos")
    url = d.url or f"runs/data/{source}"
    n = d.num_rows
    with _progress(n, f"prepare {source}") as bar:
        if source == "videos":                  # Ray Data actors; resumable; its own shard writer
            from workflows.encode_videos import encode_videos
            return url, encode_videos(d, url, progress_bar=bar)
        if source == "moving_fashion":
            rows, info = moving_fashion_rows(d, bar)
        elif source == "gmm":
            rows, info = gmm_rows(d, bar)
        else:
            rows, info, n = precomputed_rows(npz or d.precomputed, bar)
            bar.total = n
        m = write_shards(rows, url, rows_per_shard=d.rows_per_shard, endpoint=d.s3_endpoint, **info)
    return url, m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 epilog="Overrides: any data.* key of rcm_core/config.py, e.g. data.num_rows=512",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="experiment YAML (its data section is used)")
    ap.add_argument("--from-npz", metavar="FILE", help="write precomputed latents from FILE (see the module docstring)")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    url, m = prepare(cfg.data, args.from_npz)
    cond = f"{m.num_classes} classes" if m.num_classes else f"cond {m.cond_shape}"
    print(f"wrote {m.num_rows} rows ({len(m.shards)} shards, latent {m.latent_shape} {m.latent_dtype}, {cond}) "
          f"to {url.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
