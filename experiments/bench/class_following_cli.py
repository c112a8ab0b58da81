"""Does a class-conditional DiT distilled through the CLI follow its class? (issue 32's hold-out path, own data)

A user's class-conditional latents go through the commands a user runs, and the class is read back from the
samples' motion:

  1. a data set of moving Gaussian blobs, latents [4, 6, 8, 8] (one blob per clip, 0.5 cells/frame; the class is
     the direction: 0 = +x, 1 = −x, 2 = +y, 3 = −y), saved as a user's .npz;
  2. `workflows/prepare_latents.py --from-npz`;
  3. `workflows/distill.py --config experiments/video_cpu.yaml data.source=dataset … model.in_channels=4
     model.num_classes=4 teacher.train_steps=2000` (Ray Train, MLflow; the teacher is trained on the driver);
  4. `workflows/sample.py` from the cached teacher (ODE, guidance 1 and the recipe's 2) and the EMA student
     (4 steps), labels 0, 1, 2, 3 in turn;
  5. the blob's centroid per frame, its least-squares velocity, the nearest of the four directions.

    python experiments/bench/class_following_cli.py --out /tmp/class_cli            # ~15 CPU-minutes
    python experiments/bench/class_following_cli.py --out /tmp/x --teacher-steps 20  # the wiring only

It prints one line per sampler: direction accuracy (chance 0.25), mean speed along the class's direction
(data: 0.5 cells/frame), and the student's accuracy relative to the teacher's with the same guidance.
Trailing arguments are more distill.py overrides.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CHANNEL_WEIGHTS = np.array([1.0, 0.6, -0.4, 0.3])          # the blob in each latent channel (plus noise)
DIRECTIONS = np.array([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])   # (dx, dy) cells/frame per class


def moving_blobs(n: int, seed: int, frames: int = 6, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Latents [n, 4, T, S, S] float32 of one Gaussian blob (σ = 1 cell) moving along its class's direction from
    a random start that keeps its centre at least 1.5 cells inside the frame, and labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DIRECTIONS), n)
    velocity = DIRECTIONS[labels]
    travel = np.abs(velocity) * (frames - 1)
    low, high = 1.5, size - 2.5
    start = low + rng.random((n, 2)) * (high - low - travel) + np.where(velocity < 0, travel, 0)
    centre = start[:, None, :] + velocity[:, None, :] * np.arange(frames)[None, :, None]        # [n, T, (x, y)]
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    blob = np.exp(-((xx - centre[..., 0, None, None]) ** 2 + (yy - centre[..., 1, None, None]) ** 2) / 2)
    latents = CHANNEL_WEIGHTS[None, :, None, None, None] * blob[:, None]
    return (latents + 0.02 * rng.standard_normal(latents.shape)).astype(np.float32), labels


def read_direction(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, 4, T, S, S] → (class of the motion, speed along it): the blob is the latent projected on the channel
    weights (positive part), its centroid per frame is fitted by a line in time."""
    blob = np.clip(np.tensordot(CHANNEL_WEIGHTS, latents.astype(np.float64), axes=(0, 1)), 0, None)
    blob /= CHANNEL_WEIGHTS @ CHANNEL_WEIGHTS
    size = blob.shape[-1]
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    mass = blob.sum((-1, -2)) + 1e-9
    centre = np.stack([(blob * xx).sum((-1, -2)) / mass, (blob * yy).sum((-1, -2)) / mass], -1)   # [K, T, 2]
    t = np.arange(centre.shape[1]) - (centre.shape[1] - 1) / 2
    velocity = (centre * t[None, :, None]).sum(1) / (t ** 2).sum()
    along = velocity @ (DIRECTIONS / 0.5).T                     # [K, 4]: velocity along each unit direction
    return along.argmax(1), along


def run(args: list[str], cwd: Path) -> None:
    print("$", " ".join(args[1:]), flush=True)
    subprocess.run(args, cwd=cwd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="working folder (data, run, caches, samples)")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray-address", default=None, help="distill.py --address (e.g. 'local': a new Ray even when "
                    "other Ray instances run on this machine)")
    ap.add_argument("overrides", nargs="*", help="more distill.py overrides")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    latents, labels = moving_blobs(a.rows, a.seed)
    assert (read_direction(latents)[0] == labels).all()          # the read-back is exact on the data itself
    np.savez(out / "blobs.npz", latents=latents, labels=labels, num_classes=np.int64(len(DIRECTIONS)))
    py = sys.executable
    run([py, str(ROOT / "workflows/prepare_latents.py"), "--from-npz", str(out / "blobs.npz"),
         f"data.url={out / 'data'}"], out)
    address = ["--address", a.ray_address] if a.ray_address else []
    run([py, str(ROOT / "workflows/distill.py"), *address, "--config", str(ROOT / "experiments/video_cpu.yaml"),
         "data.source=dataset", f"data.url={out / 'data'}", "model.in_channels=4", "model.num_classes=4",
         f"teacher.train_steps={a.teacher_steps}", f"train.run_dir={out / 'run'}",
         f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", *a.overrides], out)
    teachers = sorted((out / ".cache" / "teachers").glob("teacher-*.pt"), key=lambda p: p.stat().st_mtime)
    sample = [py, str(ROOT / "workflows/sample.py"), "--num-samples", str(a.samples), "--seed", str(a.seed + 1)]
    rows = {}
    for w in (1.0, 2.0):
        rows[f"teacher, 10 Euler steps, w={w:g}"] = out / f"teacher_w{w:g}.npy"
        run([*sample, "--checkpoint", str(teachers[-1]), "--teacher", "--steps", "10", "--solver", "euler",
             "--guidance", str(w), "--out", str(rows[f"teacher, 10 Euler steps, w={w:g}"])], out)
    rows["student (EMA), 4 steps"] = out / "student_4.npy"
    run([*sample, "--checkpoint", str(out / "run" / "ema_student.pt"), "--steps", "4",
         "--out", str(rows["student (EMA), 4 steps"])], out)
    want = np.arange(a.samples) % len(DIRECTIONS)                  # sample.py's labels: 0, 1, 2, 3 in turn
    accuracy = {}
    print(f"\n{'sampler':34s} {'direction acc':>13s} {'speed along class':>18s}")
    for name, path in rows.items():
        read, along = read_direction(np.load(path))
        accuracy[name] = float((read == want).mean())
        speed = float(along[np.arange(len(want)), want].mean())
        print(f"{name:34s} {accuracy[name]:13.3f} {speed:18.3f}")
    student = accuracy["student (EMA), 4 steps"]
    for w in (1.0, 2.0):
        teacher = accuracy[f"teacher, 10 Euler steps, w={w:g}"]
        print(f"student / teacher (w={w:g}): {student / max(teacher, 1e-9):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
