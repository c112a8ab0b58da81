"""Data layer: manifest + shards, bad rows, codec, moving Fashion-MNIST, local iterator, S3 and Ray Data.

    .venv/bin/python -m pytest tests/test_data.py -q                    # all (starts moto + a Ray head)
    .venv/bin/python -m pytest tests/test_data.py -q -m "not services"  # no services, ~20 s
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rcm_core.config import load_config
from rcm_core.data.latents import BadRowError, DatasetError, LatentDataset, iterate_batches, read_manifest, write_shards
from rcm_core.data.codec import PatchDCT, decode_latents
from rcm_core.data.moving_fashion import generate
from rcm_core.eval.visualize import save_gif, save_grid_png

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflows"))
from prepare_latents import prepare

ROWS, PER_SHARD = 40, 16          # 3 shards: 16, 16, 8


def data_cfg(url: str, **kw):
    over = [f"data.url={url}", "data.source=moving_fashion", f"data.num_rows={ROWS}",
            f"data.rows_per_shard={PER_SHARD}"] + [f"data.{k}={v}" for k, v in kw.items()]
    return load_config(None, over).data


@pytest.fixture(scope="module")
def mf_dir(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("mf"))
    prepare(data_cfg(url))
    return url


# ----------------------------------------------------------------------------------------------------------
# Manifest and shards.

def test_prepare_local_manifest_matches_shards(mf_dir):
    m = read_manifest(mf_dir)
    assert m.latent_shape == [16, 8, 8, 8] and m.num_classes == 10 and m.num_rows == ROWS
    assert [s["rows"] for s in m.shards] == [16, 16, 8]
    assert sorted(p.name for p in Path(mf_dir).iterdir()) == ["manifest.json"] + [f"shard-0000{i}.parquet" for i in range(3)]
    raw = LatentDataset(mf_dir, do_normalize=False)
    assert sorted(raw.arrays["id"].tolist()) == list(range(ROWS))
    lat = raw.arrays["latent"].astype(np.float64)
    np.testing.assert_allclose(m.channel_mean, lat.mean((0, 2, 3, 4)), atol=1e-6)
    np.testing.assert_allclose(m.channel_std, lat.std((0, 2, 3, 4)), rtol=1e-5)
    normed = LatentDataset(mf_dir).arrays["latent"].astype(np.float64)
    np.testing.assert_allclose(normed.mean((0, 2, 3, 4)), 0, atol=1e-4)
    np.testing.assert_allclose(normed.std((0, 2, 3, 4)), 1, atol=1e-3)


def test_stored_latents_decode_to_the_generated_videos(mf_dir):
    m = read_manifest(mf_dir)
    ds = LatentDataset(mf_dir)                                   # normalised, as the model sees them
    order = np.argsort(ds.arrays["id"])
    first = generate(ROWS, frames=8, size=32, item=16, seed=0)  # prepare's first chunk uses seed 0·1000003 + 0
    frames = decode_latents(torch.from_numpy(ds.arrays["latent"][order]).double(), m)
    np.testing.assert_allclose(frames.numpy(), first.videos, atol=1e-5)
    assert (ds.arrays["label"][order] == first.labels).all()


def test_manifest_disagreeing_with_shards_names_the_shard(mf_dir, tmp_path):
    import shutil

    bad = tmp_path / "ds"
    shutil.copytree(mf_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][1]["rows"] = 17
    manifest["num_rows"] = ROWS + 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"shard-00001\.parquet: has 16 rows, .* says 17"):
        read_manifest(str(bad))
    manifest["shards"][1]["rows"] = 16
    manifest["num_rows"] = ROWS
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "shard-00002.parquet").unlink()
    with pytest.raises(DatasetError, match=r"shard-00002\.parquet: listed in .* but missing"):
        read_manifest(str(bad))
    with pytest.raises(DatasetError, match="manifest.json does not exist"):
        read_manifest(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------
# Bad rows: truncated bytes, wrong shape, NaN — named by shard path and field, or skipped and counted.

def corrupt_shard(src: str, dst: Path, kind: str) -> tuple[str, int]:
    """Copy the data set and break row 3 of shard 1; return (path of the broken shard, its row id)."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "shard-00001.parquet"
    t = pq.read_table(path).to_pydict()
    blob = t["latent"][3]
    if kind == "truncated":
        t["latent"][3] = blob[:-100]
    elif kind == "wrong_shape":                               # a [16, 8, 4, 4] latent where [16, 8, 8, 8] is promised
        t["latent"][3] = np.zeros((16, 8, 4, 4), np.float32).tobytes()
    elif kind == "nan":
        x = np.frombuffer(blob, np.float32).copy()
        x[123] = np.nan
        t["latent"][3] = x.tobytes()
    pq.write_table(pa.table(t, schema=pq.read_schema(path)), path)
    return str(path), t["id"][3]


@pytest.mark.parametrize("kind,reason", [("truncated", "truncated"), ("wrong_shape", "expected 32768"),
                                         ("nan", "NaN/Inf")])
def test_bad_row_fails_naming_shard_and_field(mf_dir, tmp_path, kind, reason):
    path, row_id = corrupt_shard(mf_dir, tmp_path / kind, kind)
    with pytest.raises(BadRowError, match=reason) as e:
        LatentDataset(str(tmp_path / kind))
    assert e.value.shard == path and e.value.field == "latent" and e.value.row_id == row_id
    assert path in str(e.value) and "field 'latent'" in str(e.value)


def test_bad_rows_skipped_and_counted(mf_dir, tmp_path):
    corrupt_shard(mf_dir, tmp_path / "nan", "nan")
    ds = LatentDataset(str(tmp_path / "nan"), on_bad_row="skip")
    assert ds.num_skipped == 1 and len(ds) == ROWS - 1
    assert "shard-00001.parquet" in ds.skipped[0].shard and ds.skipped[0].field == "latent"


def test_writer_rejects_inconsistent_rows(tmp_path):
    rows = [{"id": 0, "latent": np.zeros((2, 1, 1, 1)), "label": 0}, {"id": 0, "latent": np.zeros((2, 1, 1, 1)),
                                                                       "label": 1}]
    with pytest.raises(DatasetError, match="duplicate id 0"):
        write_shards(rows, str(tmp_path / "a"), rows_per_shard=4, latent_shape=[2, 1, 1, 1], num_classes=2)
    with pytest.raises(DatasetError, match=r"latent shape \(2, 1, 1, 1\) != latent_shape \[3, 1, 1, 1\]"):
        write_shards(rows[:1], str(tmp_path / "b"), rows_per_shard=4, latent_shape=[3, 1, 1, 1], num_classes=2)


# ----------------------------------------------------------------------------------------------------------
# Codec and moving Fashion-MNIST.

def test_codec_round_trip_is_exact():
    rng = np.random.default_rng(0)
    for p in (1, 2, 4, 8):
        x = rng.random((3, 5, 16, 16))
        c = PatchDCT(p)
        z = c.encode(x)
        assert z.shape == (3, p * p, 5, 16 // p, 16 // p)
        assert np.abs(c.decode(z) - x).max() < 1e-12
        zt = c.encode(torch.from_numpy(x))
        assert torch.allclose(c.decode(zt), torch.from_numpy(x), atol=1e-12, rtol=0)
    np.testing.assert_allclose(PatchDCT(4).d @ PatchDCT(4).d.T, np.eye(4), atol=1e-15)
    # channel 0 is p·(patch mean): a low-resolution copy of the frames
    np.testing.assert_allclose(PatchDCT(4).encode(x)[:, 0] / 4, x.reshape(3, 5, 4, 4, 4, 4).mean((3, 5)), atol=1e-12)


def centre_of_mass(frames: np.ndarray) -> np.ndarray:
    """[N, T, S, S] → [N, T, 2] (y, x)."""
    f = frames.astype(np.float64)
    idx = np.arange(f.shape[-1])
    mass = f.sum((2, 3))
    return np.stack([(f.sum(3) * idx).sum(2) / mass, (f.sum(2) * idx).sum(2) / mass], -1)


def test_moving_fashion_videos_move_at_their_velocity():
    v = generate(64, frames=8, size=32, item=16, seed=3)
    assert v.source == ("fashion-mnist" if Path("/usr/share/datasets/fashion-mnist").exists() else "sklearn-digits")
    assert v.videos.shape == (64, 8, 32, 32) and v.videos.min() >= 0 and v.videos.max() <= 1
    assert set(v.labels.tolist()) <= set(range(10)) and len(set(v.labels.tolist())) >= 5
    step = np.diff(centre_of_mass(v.videos), axis=1)                       # [N, T-1, 2]
    np.testing.assert_allclose(step, np.diff(v.positions, axis=1), atol=1e-4)
    # away from the walls the step is exactly the velocity; at a bounce that component flips sign
    free = np.abs(step - v.velocities[:, None, :]) < 1e-4
    flipped = np.abs(step + v.velocities[:, None, :]) < 1e-4
    assert free.mean() > 0.6
    speed = np.linalg.norm(v.velocities, axis=1)
    assert (speed >= 0.75).all() and (speed <= 2.0).all()
    bounced = ~free & ~flipped                                             # the frame where the bounce happens
    assert (np.abs(step[bounced]) <= np.abs(v.velocities[:, None, :].repeat(7, 1)[bounced]) + 1e-4).all()


def test_visualize_writes_png_grid_and_gif(tmp_path):
    from PIL import Image

    v = generate(4, seed=1).videos
    png = save_grid_png(v, tmp_path / "grid.png", scale=1)
    assert Image.open(png).size == (8 * 33 + 1, 4 * 33 + 1)              # 8 frames across, 4 videos down
    gif = save_gif(v, tmp_path / "grid.gif", scale=1)
    im = Image.open(gif)
    assert im.n_frames == 8 and im.size == (2 * 33 + 1, 2 * 33 + 1)
    img = save_grid_png(v[:, 0], tmp_path / "images.png", scale=2)        # [N, H, W] grey images → 2×2 grid
    assert Image.open(img).size == (2 * (2 * 33 + 1), 2 * (2 * 33 + 1))


# ----------------------------------------------------------------------------------------------------------
# The local iterator.

def test_iterator_resumes_exactly_and_reshuffles_each_epoch(mf_dir):
    ds = LatentDataset(mf_dir)
    spe = ds.steps_per_epoch(batch_size=8)                                 # 40 // 8 = 5
    it = iterate_batches(ds, 8, seed=7)
    full = [next(it) for _ in range(3 * spe)]
    resumed = iterate_batches(ds, 8, seed=7, start_step=7)
    for k in range(7, 3 * spe):
        b = next(resumed)
        assert torch.equal(b.ids, full[k].ids) and torch.equal(b.latent, full[k].latent)
    epochs = [torch.cat([b.ids for b in full[e * spe:(e + 1) * spe]]) for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(ROWS)) for e in epochs)   # every row once per epoch
    assert not torch.equal(epochs[0], epochs[1])                           # a new order each epoch
    other_seed = next(iterate_batches(ds, 8, seed=8))
    assert not torch.equal(other_seed.ids, full[0].ids)
    assert full[0].latent.dtype == torch.float32 and full[0].latent.shape == (8, 16, 8, 8, 8)


def test_iterator_ranks_partition_each_epoch(mf_dir):
    ds = LatentDataset(mf_dir)
    a, b = iterate_batches(ds, 4, seed=0, rank=0, world_size=2), iterate_batches(ds, 4, seed=0, rank=1, world_size=2)
    spe = ds.steps_per_epoch(4, 2)
    seen = torch.cat([torch.cat([next(a).ids, next(b).ids]) for _ in range(spe)])
    assert sorted(seen.tolist()) == list(range(ROWS))
    with pytest.raises(DatasetError, match=r"40 rows cannot fill one step of batch_size=32 .* world_size=2 = 64"):
        ds.steps_per_epoch(32, 2)


def test_precomputed_npz_with_text_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((10, 4, 2, 3, 3)).astype(np.float16)
    cond = rng.standard_normal((10, 5, 6)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", latents=lat, cond=cond, ids=np.arange(100, 110),
             captions=np.array([f"clip {i}" for i in range(10)]), encoder=json.dumps({"name": "my-vae"}))
    url = str(tmp_path / "ds")
    _, m = prepare(load_config(None, [f"data.url={url}", "data.rows_per_shard=4"]).data, str(tmp_path / "mine.npz"))
    assert m.latent_dtype == "float16" and m.cond_shape == [5, 6] and m.num_classes is None
    assert m.encoder == {"name": "my-vae"} and len(m.shards) == 3
    ds = LatentDataset(url, do_normalize=False)
    order = np.argsort(ds.arrays["id"])
    np.testing.assert_array_equal(ds.arrays["latent"][order], lat.astype(np.float32))
    np.testing.assert_array_equal(ds.arrays["cond"][order], cond)
    assert pq.read_table(Path(url) / "shard-00000.parquet")["caption"][0].as_py() == "clip 0"
    b = next(iterate_batches(url, 5, seed=0))
    assert b.cond.shape == (5, 5, 6) and b.label is None


def test_prepare_cli_help_and_gmm(tmp_path):
    py, script = sys.executable, str(REPO / "workflows" / "prepare_latents.py")
    h = subprocess.run([py, script, "--help"], capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and "--from-npz" in h.stdout and "data.source" in h.stdout
    url = str(tmp_path / "gmm")
    r = subprocess.run([py, script, "data.source=gmm", "data.num_rows=64", f"data.url={url}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote 64 rows (1 shards, latent [2, 1, 1, 1] float32, 4 classes) " \
                                                f"to {url}/manifest.json"
    bad = subprocess.run([py, script, "data.source=nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "data.source='nope'" in bad.stderr


# ----------------------------------------------------------------------------------------------------------
# Object storage (the moto S3 server of the local stack).

@pytest.fixture(scope="module")
def s3_url(s3_endpoint, mf_dir) -> str:
    url = "s3://rcm-data/mf"
    prepare(data_cfg(url, s3_endpoint=s3_endpoint))
    return url


@pytest.mark.services
def test_prepare_to_s3_reads_back_identically(s3_url, s3_endpoint, mf_dir):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("rcm-data/mf", refresh=True)) == \
        ["manifest.json"] + [f"shard-0000{i}.parquet" for i in range(3)]
    remote, local = LatentDataset(s3_url, endpoint=s3_endpoint), LatentDataset(mf_dir)
    assert read_manifest(s3_url, endpoint=s3_endpoint) == read_manifest(mf_dir)
    for k in local.arrays:
        np.testing.assert_array_equal(remote.arrays[k], local.arrays[k])


@pytest.mark.services
def test_check_storage_fails_fast_naming_the_url(s3_url, s3_endpoint, monkeypatch, tmp_path):
    from cluster.local_stack import free_port
    from workflows.data import StorageError, check_storage

    assert check_storage(s3_url, s3_endpoint).num_rows == ROWS
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        check_storage("s3://no-such-bucket/x", s3_endpoint)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=rf"s3://rcm-data/mf: cannot reach the S3 endpoint {dead}"):
        check_storage(s3_url, dead)
    with pytest.raises(StorageError, match=r"s3://rcm-data/empty: no manifest.json there"):
        check_storage("s3://rcm-data/empty", s3_endpoint)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match=r"s3://rcm-data/mf: no S3 credentials found"):
        check_storage(s3_url, s3_endpoint)


# ----------------------------------------------------------------------------------------------------------
# Ray Data from the S3 server.

def consume_concurrently(shards, epoch_count: int) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """Each consumer iterates its streaming-split shard like a Train worker would; returns ids[epoch][consumer]
    and the latent of row id 0 each time it was seen."""
    from rcm_core.data.latents import LatentBatch

    out = [[[] for _ in shards] for _ in range(epoch_count)]
    errors, first_row = [], []

    def run(i: int) -> None:
        try:
            for e in range(epoch_count):
                for batch in shards[i].iter_torch_batches(batch_size=4, prefetch_batches=2):
                    b = LatentBatch.from_numpy_batch(batch)
                    assert b.latent.shape[1:] == (16, 8, 8, 8) and b.label.dtype == torch.int64
                    out[e][i] += b.ids.tolist()
                    if (b.ids == 0).any():
                        first_row.append(b.latent[b.ids == 0][0])
        except BaseException as exc:   # noqa: BLE001 — re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    if errors:
        raise errors[0]
    return out, first_row


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
def test_ray_data_streams_every_row_once_per_epoch_to_two_consumers(ray_connected, s3_url, s3_endpoint, mf_dir):
    from workflows.data import make_ray_dataset

    ds = make_ray_dataset(data_cfg(s3_url, s3_endpoint=s3_endpoint, shuffle_seed=5))
    ids, row0 = consume_concurrently(ds.streaming_split(2, equal=True), epoch_count=2)
    for epoch in ids:
        both = epoch[0] + epoch[1]
        assert len(epoch[0]) == len(epoch[1]) == ROWS // 2
        assert sorted(both) == list(range(ROWS))                    # no loss, no duplicates
    assert ids[0][0] + ids[0][1] != ids[1][0] + ids[1][1]          # reshuffled between epochs
    # same decode as the local path: the row with id 0 is identical
    local = LatentDataset(mf_dir)
    assert len(row0) == 2 and all(torch.equal(r, torch.from_numpy(local.arrays["latent"][local.arrays["id"] == 0][0]))
                                  for r in row0)


@pytest.mark.ray
@pytest.mark.services
def test_ray_data_bad_rows_error_or_skip(ray_connected, s3_endpoint, mf_dir, tmp_path):
    import s3fs

    from workflows.data import BadRowCounter, make_ray_dataset

    path, row_id = corrupt_shard(mf_dir, tmp_path / "nan", "nan")
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).put(str(tmp_path / "nan"), "rcm-data/bad", recursive=True)
    cfg = data_cfg("s3://rcm-data/bad", s3_endpoint=s3_endpoint)
    with pytest.raises(Exception, match=rf"s3://rcm-data/bad/shard-00001.parquet: row id={row_id} field 'latent'"):
        make_ray_dataset(cfg, shuffle=False).take_all()
    counter = BadRowCounter.remote()
    cfg.on_bad_row = "skip"
    rows = make_ray_dataset(cfg, shuffle=False, bad_rows=counter).take_all()
    assert len(rows) == ROWS - 1 and row_id not in {r["id"] for r in rows}
    skipped = ray_connected.get(counter.get.remote())
    assert len(skipped) == 1 and "shard-00001.parquet" in skipped[0] and "NaN" in skipped[0]


def test_a_read_only_batch_converts_without_a_warning():
    """Ray Data hands out read-only NumPy views of Arrow buffers; torch.as_tensor on one warns ("not writable") in
    every worker of the demo. The batch is copied instead: same values, no warning, and writable tensors."""
    import warnings

    import numpy as np

    from rcm_core.data.latents import LatentBatch

    latent = np.arange(24, dtype=np.float32).reshape(2, 3, 1, 2, 2)
    label = np.array([1, 3])
    for a in (latent, label):
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = LatentBatch.from_numpy_batch({"latent": latent, "label": label})
    assert np.array_equal(b.latent.numpy(), latent) and b.label.tolist() == [1, 3]
    b.latent += 1                                            # its own memory: the Arrow buffer is untouched
    assert latent[0, 0, 0, 0, 0] == 0
