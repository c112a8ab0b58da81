"""Ray Data throughput from the S3 server: rows/s per consumer worker, read → decode → shuffle → torch batches.

    python -m workflows.bench_data                                # starts its own moto S3 server and local Ray
    source .stack/stack.env && python -m workflows.bench_data     # or use the local stack's S3 and Ray head
    python -m workflows.bench_data --rows 2048 --workers 1,2,4 --epochs 3 --batch-size 32

Writes a moving-Fashion-MNIST latent data set ([16, 8, 8, 8] float32, 32 KiB a row) to s3://rcm-data/bench, then for
each worker count streams it with `make_ray_dataset` + `streaming_split` into that many Ray actors (0.5 CPU each,
like Train workers under P6) calling `iter_torch_batches(prefetch_batches=2)`, and prints a Markdown table.
Epoch 1 includes starting the pipeline's workers; later epochs are "warm".
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from rcm_core.config import load_config


@ray.remote(num_cpus=0.5)
class Consumer:
    def run(self, it, epochs: int, batch_size: int) -> list[tuple[int, float]]:
        from rcm_core.data.latents import LatentBatch

        out = []
        for _ in range(epochs):
            t0, rows = time.perf_counter(), 0
            for batch in it.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
                rows += len(LatentBatch.from_numpy_batch(batch))
            out.append((rows, time.perf_counter() - t0))
        return out


def bench(url: str, endpoint: str, workers: int, epochs: int, batch_size: int, shuffle: bool) -> dict:
    from workflows.data import make_ray_dataset

    cfg = load_config(None, [f"data.url={url}", f"data.s3_endpoint={endpoint}"]).data
    ds = make_ray_dataset(cfg, shuffle=shuffle)
    splits = ds.streaming_split(workers, equal=True)
    actors = [Consumer.remote() for _ in range(workers)]
    results = ray.get([a.run.remote(s, epochs, batch_size) for a, s in zip(actors, splits)])
    for a in actors:
        ray.kill(a)
    per_epoch = list(zip(*results))                                   # [epoch][worker] → (rows, seconds)
    rate = [[r / s for r, s in ep] for ep in per_epoch]
    warm = [x for ep in rate[1:] for x in ep] or rate[0]
    wall = [max(s for _, s in ep) for ep in per_epoch]
    rows = [sum(r for r, _ in ep) for ep in per_epoch]
    return {"workers": workers, "cold": sum(rate[0]) / workers, "warm": sum(warm) / len(warm),
            "total_warm": sum(rows[1:]) / sum(wall[1:]) if epochs > 1 else rows[0] / wall[0],
            "epoch_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shuffle", choices=["on", "off", "both"], default="both",
                    help="the per-epoch global random_shuffle (an all-to-all exchange) on, off, or both")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    stack = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        from cluster.local_stack import Stack

        stack = Stack(Path(tempfile.mkdtemp(prefix="rcm-bench-")))
        os.environ.update(stack.up(["s3"]) and stack.env())
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    try:
        from workflows.prepare_latents import prepare

        url = "s3://rcm-data/bench"
        t0 = time.perf_counter()
        prepare(load_config(None, ["data.source=moving_fashion", f"data.num_rows={args.rows}",
                                   f"data.rows_per_shard={args.rows_per_shard}", f"data.url={url}"]).data)
        print(f"wrote {args.rows} rows to {url} at {endpoint} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 * 2**20,
                     log_to_driver=False)          # its own instance, not a `ray start` cluster found on the machine
        print("| workers | shuffle | rows/s per worker, epoch 1 (cold) | rows/s per worker, epochs 2+ (warm) | "
              "rows/s all workers (warm) | MiB/s all workers (warm) | epoch wall times (s) |")
        print("|---|---|---|---|---|---|---|")
        shuffles = {"on": [True], "off": [False], "both": [False, True]}[args.shuffle]
        for n, shuffle in [(int(w), sh) for w in args.workers.split(",") for sh in shuffles]:
            r = bench(url, endpoint, n, args.epochs, args.batch_size, shuffle)
            print(f"| {n} | {'global' if shuffle else 'off'} | {r['cold']:.0f} | {r['warm']:.0f} | {r['total_warm']:.0f} | "
                  f"{r['total_warm'] * 32 / 1024:.1f} | {', '.join(f'{s:.1f}' for s in r['epoch_s'])} |", flush=True)
    finally:
        ray.shutdown()
        if stack is not None:
            stack.down()
            shutil.rmtree(stack.state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
