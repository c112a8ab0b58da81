"""A class-conditional DiT teacher trained here follows its class (issue 32).

The task: a vertical bar sweeps right across an 8×8 frame over 4 frames from a random column; the class sets its
speed (class 0: 0.5 px/frame, class 1: 1.5 px/frame). The class is read back from a sample's motion (the bar's
column centroid per frame, its mean step, the nearer of the two speeds). A tiny DiT (the project's one network,
2 layers of width 32) is trained as a teacher by `rcm_core.run.teacher.train_teacher` and sampled with the
project's ODE sampler without guidance, so what is read back is the conditional model itself.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_class_following.py -q     # ~40 s of one core

The bar (BAR): accuracies over seeds 0-4 with this file's settings (`PYTHONPATH=. python
tests/test_class_following.py` prints one line per seed) were 0.984, 1.000, 0.969, 1.000, 1.000 on 64 samples
each (mean speeds 0.52-0.57 and 1.35-1.42 px/frame for the two classes); with a binomial standard error of about
0.021 at 0.97, the bar sits three of those below the lowest. Chance is 0.5.
This small task does not separate the label paths at this budget (labels only as cross-attention tokens, the
code before issue 32, read back 0.953 on seeds 0 and 1 too); the issue's blob task does (numbers in the comment
of rcm_core/networks/dit.py's `ConditionEmbedder`), and experiments/bench/class_following_cli.py runs a like task
through the command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rcm_core.config import load_config
from rcm_core.data.latents import LatentBatch
from rcm_core.method.samplers import teacher_sample
from rcm_core.run.teacher import train_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEEDS = (0.5, 1.5)                 # px/frame of class 0 and class 1
FRAMES, SIZE = 4, 8
TEACHER = ["model.kind=dit", "model.in_channels=1", "model.dim=32", "model.ffn_dim=64", "model.num_heads=2",
           "model.num_layers=2", "model.text_dim=16", "model.num_classes=2", "model.label_tokens=2",
           "model.freq_dim=32", "teacher.train_steps=1000", "teacher.train_lr=2e-3", "teacher.train_batch_size=32"]
SAMPLES, SAMPLER_STEPS = 64, 8
BAR = 0.90


def sweeping_bars(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n videos [n, 1, T, S, S] of a vertical bar (Gaussian profile, width 0.7 px) moving right at its class's
    speed from a random column that keeps it inside the frame, and their labels [n]."""
    labels = torch.randint(0, len(SPEEDS), (n,), generator=generator)
    speed = torch.tensor(SPEEDS, dtype=torch.float64)[labels]
    room = (SIZE - 3) - speed * (FRAMES - 1)
    start = 1.0 + torch.rand(n, generator=generator, dtype=torch.float64) * room
    column = start[:, None] + speed[:, None] * torch.arange(FRAMES, dtype=torch.float64)        # [n, T]
    profile = torch.exp(-(torch.arange(SIZE, dtype=torch.float64) - column[..., None]) ** 2 / (2 * 0.7 ** 2))
    return profile[:, None, :, None, :].expand(n, 1, FRAMES, SIZE, SIZE).float(), labels


def read_class(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class whose speed is nearest the bar's mean step per frame (column centroid of the positive part)."""
    mass = videos[:, 0].double().clamp(min=0).sum(-2)                                         # [n, T, S]
    centroid = (mass * torch.arange(SIZE, dtype=torch.float64)).sum(-1) / mass.sum(-1).clamp(min=1e-9)
    speed = torch.diff(centroid, dim=1).mean(1)
    return (speed[:, None] - torch.tensor(SPEEDS, dtype=torch.float64)).abs().argmin(1), speed


def class_accuracy(seed: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Train the teacher with `seed`, sample SAMPLES videos (half of each class) → (accuracy, speeds, labels)."""
    cfg = load_config(None, [*TEACHER, f"train.seed={seed}"])
    reference, _ = sweeping_bars(4096, torch.Generator().manual_seed(99))
    mean, std = reference.mean().item(), reference.std().item()          # the readers' normalisation
    data = torch.Generator().manual_seed(1000 + seed)

    def batches():
        while True:
            videos, labels = sweeping_bars(cfg.teacher.train_batch_size, data)
            yield LatentBatch(latent=(videos - mean) / std, label=labels)

    teacher = train_teacher(cfg, batches(), device=torch.device("cpu"), log_every=10 ** 9)
    labels = torch.arange(SAMPLES) % len(SPEEDS)
    noise = torch.randn(SAMPLES, 1, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(5000 + seed))
    with torch.no_grad():
        videos = teacher_sample(teacher, noise, labels, steps=SAMPLER_STEPS, guidance=1.0, shift=3.0)
    read, speed = read_class(videos * std + mean)
    return (read == labels).double().mean().item(), speed, labels


def test_the_task_reads_back_its_own_classes():
    videos, labels = sweeping_bars(512, torch.Generator().manual_seed(0))
    read, speed = read_class(videos)
    assert torch.equal(read, labels)
    assert torch.allclose(speed, torch.tensor(SPEEDS, dtype=torch.float64)[labels], atol=0.02)


@pytest.mark.slow
def test_class_conditional_dit_teacher_follows_its_class():
    accuracy, speed, labels = class_accuracy(seed=0)
    assert accuracy >= BAR, (accuracy, speed[labels == 0].mean(), speed[labels == 1].mean())


# The CLI's network (experiments/video_cpu.yaml, patches 2×2) on issue 32's 4-direction blob task
# (experiments/bench/class_following_cli.py's data): there the class embedding's init scale decided whether the
# teacher used its class at all. EMA teacher, loss with a wrong label minus with the true one, on 512 held rows,
# seeds 0-3. After 400 steps (/tmp probe of 2026-12-02): unit-scale init 5.65 / 5.54 / 5.10 / 1.66, DiT's 0.02 init
# 0.43 / 0.28 / 0.43 / 0.50. After the 200 steps run here (2026-12-03, this test's code with train_steps and the
# init patched, one torch thread): unit-scale 2.780 / 3.961 / 2.824 / 2.084 (worst 2.084, seed 3), 0.02 init
# 0.145 / 0.134 / 0.204 / 0.247 (highest 0.247): apart by more at 200 steps than at 400, and in half the time (88 s
# of the suite's 146 s in this file were the 400 steps). Through the CLI after 2,000 steps the 0.02 teacher read
# back 0.25 direction accuracy (chance) and the unit-scale one 0.996. The bar sits between the two sets.
GAP_BAR = 1.0
BLOB_TEACHER_STEPS = 200


@pytest.mark.slow
def test_blob_direction_moves_the_cli_teachers_loss_early():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
    from class_following_cli import moving_blobs
    from rcm_core.method.losses import flow_matching_loss
    from rcm_core.run.teacher import sample_train_t

    seed = 0
    x, y = moving_blobs(1024, seed)
    x = (x - x.mean((0, 2, 3, 4), keepdims=True)) / x.std((0, 2, 3, 4), keepdims=True)   # the readers' normalisation
    X, L = torch.tensor(x), torch.tensor(y).long()
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "video_cpu.yaml",
                      ["model.in_channels=4", "model.num_classes=4", f"teacher.train_steps={BLOB_TEACHER_STEPS}",
                       f"train.seed={seed}"])
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, len(X), (cfg.teacher.train_batch_size,), generator=g)
            yield LatentBatch(latent=X[i], label=L[i])

    teacher = train_teacher(cfg, batches(), device=torch.device("cpu"), log_every=10 ** 9)
    held = torch.Generator().manual_seed(1000 + seed)
    rows = torch.randperm(len(X), generator=held)[:512]
    t = sample_train_t(512, held, torch.device("cpu"))
    eps = torch.randn((512, *X.shape[1:]), generator=held)
    with torch.no_grad():
        true = flow_matching_loss(teacher, X[rows], L[rows], t=t, eps=eps).loss.item()
        wrong = flow_matching_loss(teacher, X[rows], (L[rows] + 1) % 4, t=t, eps=eps).loss.item()
    assert wrong - true > GAP_BAR, (true, wrong)


if __name__ == "__main__":          # the measurement behind BAR: one line per seed
    for s in map(int, sys.argv[1:] or range(5)):
        acc, v, y = class_accuracy(s)
        print(f"seed {s}: accuracy {acc:.3f}, mean speed class 0 {v[y == 0].mean():.2f}, class 1 "
              f"{v[y == 1].mean():.2f} px/frame", flush=True)
