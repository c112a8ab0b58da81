"""Moving Fashion-MNIST: a synthetic video data set with real image content and known motion.

    python -c "from rcm_core.data.moving_fashion import generate; v = generate(4, seed=0); print(v.videos.shape, v.labels)"

Each video is one Fashion-MNIST item (resized to `item`×`item`) moving at a constant random velocity across a
black `size`×`size` canvas for `frames` frames, bouncing elastically off the walls; its label is the item's class.
Positions are continuous: the item is placed with bilinear weights, which moves its centre of mass by exactly the
sub-pixel displacement, so the ground-truth motion can be checked on the pixels (tests do) and on model samples.

Images come from Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`:
/usr/share/datasets/fashion-mnist/*.gz, read with numpy at offsets 16/8). Where that package is absent,
scikit-learn's bundled 8×8 digits stand in (with a warning); `source` in the result says which was used.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FASHION_DIR = Path(os.environ.get("RCM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


@dataclass
class MovingVideos:
    videos: np.ndarray       # float32 [N, T, S, S] in [0, 1]
    labels: np.ndarray       # int64 [N]
    positions: np.ndarray    # float64 [N, T, 2] top-left corner (y, x) of the item in each frame
    velocities: np.ndarray   # float64 [N, 2] (dy, dx) pixels per frame before any bounce
    source: str              # "fashion-mnist" or "sklearn-digits"


@lru_cache(maxsize=2)
def load_items(split: str = "train") -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 [N, H, W], labels int64 [N], source name); resize with `resize_items`."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path, lab_path = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if img_path.exists() and lab_path.exists():
        with gzip.open(img_path, "rb") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(lab_path, "rb") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        source = "fashion-mnist"
    else:
        try:  # scikit-learn bundles its digits: no download
            from sklearn.datasets import load_digits
        except ImportError:
            raise FileNotFoundError(
                f"{img_path} not found and scikit-learn (the fallback) is not installed: install "
                f"dataset-fashion-mnist (or point RCM_FASHION_MNIST_DIR at a folder with the four *-ubyte.gz "
                f"files), or write the latent data set elsewhere and carry it (workflows/prepare_latents.py)"
            ) from None
        log.warning("%s not found (apt-get install dataset-fashion-mnist); using scikit-learn digits", img_path)
        digits = load_digits()
        images, labels, source = (digits.images / 16.0 * 255).astype(np.uint8), digits.target.astype(np.int64), \
            "sklearn-digits"
    return images, labels, source


def resize_items(images: np.ndarray, item: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    # antialias keeps thin Fashion-MNIST strokes from aliasing away when shrinking 28 → 16
    y = F.interpolate(x, size=(item, item), mode="bilinear", antialias=True, align_corners=False)
    return y[:, 0].clamp(0, 1).numpy()


def bounce(p0: np.ndarray, v: np.ndarray, t: np.ndarray, limit: float) -> np.ndarray:
    """Positions of a point moving at v from p0 inside [0, limit], reflecting off both ends (a triangle wave)."""
    raw = p0[..., None, :] + v[..., None, :] * t[:, None]                 # [N, T, 2]
    period = 2 * limit
    r = np.mod(raw, period)
    return np.where(r <= limit, r, period - r)


def _place(canvas: np.ndarray, item: np.ndarray, y: float, x: float) -> None:
    """Add `item` at sub-pixel position (y, x) with bilinear weights (centre of mass moves by exactly (y, x))."""
    iy, ix = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - iy, x - ix
    s = item.shape[0]
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            if wy * wx > 0:
                canvas[iy + dy:iy + dy + s, ix + dx:ix + dx + s] += wy * wx * item


def generate(n: int, *, frames: int = 8, size: int = 32, item: int = 16, speed: tuple[float, float] = (0.75, 2.0),
             seed: int = 0, split: str = "train") -> MovingVideos:
    """`n` videos [T, S, S]; items, start positions and velocities drawn from `seed` (deterministic)."""
    if item + 1 > size:
        raise ValueError(f"item={item} must be smaller than size={size} (one pixel spare for sub-pixel motion)")
    all_images, labels, source = load_items(split)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(all_images), n)
    items = resize_items(all_images[pick], item)      # only the picked ones: resizing all 60k costs seconds
    limit = float(size - item - 1)                                          # keep the bilinear spill on the canvas
    p0 = rng.uniform(0, limit, (n, 2))
    angle, mag = rng.uniform(0, 2 * np.pi, n), rng.uniform(*speed, n)
    v = np.stack([mag * np.sin(angle), mag * np.cos(angle)], 1)
    pos = bounce(p0, v, np.arange(frames, dtype=np.float64), limit)
    videos = np.zeros((n, frames, size, size), np.float64)
    for i in range(n):
        for t in range(frames):
            _place(videos[i, t], items[i], *pos[i, t])
    return MovingVideos(np.clip(videos, 0, 1).astype(np.float32), labels[pick], pos, v, source)
