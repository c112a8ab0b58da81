"""Pictures of samples per step count: scatter plots for vector toys, frame grids and GIFs for video latents.

Written beside every evaluation and logged to MLflow as `samples/nfe_<N>.png` (and `.gif` for video, `.mp4` for
data sets encoded by the Wan2.1 VAE).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rcm_core.data import Manifest
from rcm_core.visualize import save_gif, save_grid_png

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def scatter_png(points: torch.Tensor, path: Path, *, labels: torch.Tensor | None = None, size: int = 320,
                extent: float = 2.0) -> Path:
    """First two coordinates of [N, D, ...] samples as coloured dots on a white square of ±extent."""
    from PIL import Image, ImageDraw

    xy = points.reshape(points.shape[0], -1)[:, :2].double().numpy()
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(size // 2, 0), (size // 2, size)], fill=(230, 230, 230))
    draw.line([(0, size // 2), (size, size // 2)], fill=(230, 230, 230))
    pix = (xy / (2 * extent) + 0.5) * size
    for i, (u, v) in enumerate(pix):
        color = PALETTE[int(labels[i]) % len(PALETTE)] if labels is not None else (0, 0, 0)
        draw.ellipse([u - 1.5, size - v - 1.5, u + 1.5, size - v + 1.5], fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_sample_pictures(samples: dict[str, torch.Tensor], manifest: dict | Manifest | None, out_dir: Path,
                         *, labels: torch.Tensor | None = None, max_items: int = 16, normalized: bool = True,
                         endpoint: str = "") -> list[Path]:
    """One picture per sample set (name → [N, C, T, H, W]); decoded to pixels when the data set's codec allows.
    Data sets encoded by the Wan2.1 VAE are decoded by it into PNG, GIF and MP4 (rcm_core/video_samples.py)."""
    m = Manifest(**manifest) if isinstance(manifest, dict) else manifest
    if m is not None and (m.encoder or {}).get("name") == "wan2.1":
        from rcm_core.video_samples import data_card, save_decoded_samples
        return save_decoded_samples(samples, data_card(m, normalized=normalized), out_dir, endpoint=endpoint)
    paths = []
    for name, x in samples.items():
        if x[0].numel() <= 16 and x.shape[2:] == (1, 1, 1):          # a vector toy: scatter plot
            paths.append(scatter_png(x, out_dir / f"{name}.png", labels=labels))
            continue
        frames = _pixels(x[:max_items], m)
        paths.append(save_grid_png(frames, out_dir / f"{name}.png", layout="videos"))
        if frames.shape[1] > 1:
            paths.append(save_gif(frames, out_dir / f"{name}.gif"))
    return paths


def _pixels(x: torch.Tensor, m: Manifest | None) -> np.ndarray:
    """[N, C, T, H, W] → [N, T, H', W'] in [0, 1]: through the data set's decoder, else channel 0 rescaled."""
    if m is not None and (m.encoder or {}).get("name") == "patch_dct":
        from rcm_core.datasets.codec import decode_latents
        return np.asarray(decode_latents(x.float(), m))
    c0 = x[:, 0].float()
    lo, hi = c0.min(), c0.max()
    return ((c0 - lo) / (hi - lo + 1e-8)).numpy()
