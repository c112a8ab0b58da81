"""Samples back to videos: the data set's card a student carries, its coordinates restored, pixels through the
Wan2.1 VAE decoder, MP4/GIF files.

    card = data_card(manifest, normalized=cfg.data.normalize)     # saved inside ema_student.pt (save_teacher)
    raw = to_dataset_coordinates(samples, card)                     # undo (x − mean_c) / std_c when it was applied
    vae = decoder_for(card, endpoint="")                            # WanVAE from the folder the data set was made with
    paths = write_videos(decode(raw, vae), "out/nfe_4", fps=card["encoder"]["fps"])   # out/nfe_4.mp4 and .gif

A model trained on normalised latents (data.normalize=true, the default) samples in normalised coordinates; the
card holds the manifest's per-channel statistics, so `sample.py` and the evaluation hand back latents in the data
set's own coordinates, which is what the VAE decodes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcm_core.data.latents import Manifest, denormalize, read_shard


def data_card(manifest: dict | Manifest, *, normalized: bool) -> dict:
    """What a checkpoint must know about its data set to turn samples into videos."""
    m = vars(manifest) if isinstance(manifest, Manifest) else manifest
    return {"latent_shape": list(m["latent_shape"]), "channel_mean": list(m["channel_mean"]),
            "channel_std": list(m["channel_std"]), "normalized": bool(normalized), "encoder": dict(m["encoder"] or {}),
            "cond_shape": m.get("cond_shape"), "num_classes": m.get("num_classes")}


def _stats(card: dict) -> Manifest:
    return Manifest(latent_shape=card["latent_shape"], channel_mean=card["channel_mean"],
                    channel_std=card["channel_std"])


def to_dataset_coordinates(x: torch.Tensor, card: dict | None) -> torch.Tensor:
    """Samples [N, C, T, H, W] in the model's coordinates → the data set's stored coordinates."""
    if card is None or not card.get("normalized"):
        return x
    return denormalize(x.double(), _stats(card)).to(x.dtype)


def decodable(card: dict | None) -> bool:
    return bool(card) and (card.get("encoder") or {}).get("name") == "wan2.1"


def decoder_for(card: dict, *, path: str = "", endpoint: str = "", device: torch.device | None = None):
    """The Wan VAE the data set was encoded with (`path` overrides the folder recorded in the card), on `device`
    (default: the GPU when there is one; a 480p×81 decode on a CPU takes minutes)."""
    from rcm_core.data.encoders import WanVAE, resolve_dtype

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc = card["encoder"]
    # bfloat16 on a GPU, float32 on a CPU, whatever the encoding dtype was (CPU bf16 convolutions are slow)
    return WanVAE.load(path or enc["path"], device=device, dtype=resolve_dtype("auto", device), endpoint=endpoint)


def decode(raw: torch.Tensor, vae: Any, *, chunk: int = 1) -> np.ndarray:
    """Latents in the data set's coordinates [N, C, t, h, w] → uint8 videos [N, T, H, W, 3]."""
    from rcm_core.data.clips import to_uint8

    out = [to_uint8(vae.decode(raw[i:i + chunk]).permute(0, 2, 3, 4, 1)) for i in range(0, raw.shape[0], chunk)]
    return np.concatenate(out)


# Previews of 480p × 81-frame videos (2 videos side by side, random-init 1.3B samples, this 2-core box, 2026-12-03):
# the GIF of every frame at full size took 112 s and 84 MiB, a PNG of all 81 frames 35 s and 185 MiB, the MP4 27 s
# and 41 MiB; on the H200 host the run's end (4 sample sets, the EMA student) took 215 s with no line printed.
# The MP4 keeps every frame at full resolution; the GIF is a preview at most GIF_MAX_SIDE pixels per video side,
# the PNG a strip of PNG_FRAMES frames spread over the clip.
GIF_MAX_SIDE = 416
PNG_FRAMES = 8


def strip_frames(videos: np.ndarray, n: int = PNG_FRAMES) -> np.ndarray:
    """[N, T, ...] → [N, ≤n, ...]: n frames evenly spread over the clip, its first and last included."""
    idx = np.unique(np.linspace(0, videos.shape[1] - 1, min(n, videos.shape[1])).round().astype(int))
    return videos[:, idx]


def shrink(videos: np.ndarray, max_side: int = GIF_MAX_SIDE) -> np.ndarray:
    """uint8 RGB [N, T, H, W, 3] → the same videos box-filtered by the smallest integer factor that brings H and W to
    at most `max_side` (Pillow's `reduce`: 1.3 s for two 480p × 81 videos here, a NumPy mean over the boxes 9.7 s);
    unchanged when they already fit."""
    from PIL import Image

    s = math.ceil(max(videos.shape[2:4]) / max_side)
    if s <= 1:
        return videos
    return np.stack([np.stack([np.asarray(Image.fromarray(f).reduce(s)) for f in v]) for v in videos])


def write_videos(videos: np.ndarray, stem: str | Path, *, fps: int, gif: bool = True) -> list[Path]:
    """uint8 [N, T, H, W, 3] → `<stem>.mp4` (one grid of all N, every frame at full size) and `<stem>.gif` (the same
    grid as a preview: each video shrunk to at most GIF_MAX_SIDE pixels a side)."""
    from rcm_core.data.clips import video_grid, write_mp4
    from rcm_core.eval.visualize import save_gif

    paths = [write_mp4(video_grid(videos), Path(f"{stem}.mp4"), fps=fps)]
    if gif:
        preview = video_grid(shrink(videos))
        paths.append(save_gif(preview[None].transpose(0, 4, 1, 2, 3), Path(f"{stem}.gif"), ncol=1, scale=1, pad=0,
                              fps=fps, value_range=(0, 255)))
    return paths


def eval_conditions(url: str, manifest: dict, n: int, *, endpoint: str = "") -> torch.Tensor:
    """Text conditions for the evaluation bank: the `cond` of the data set's first rows, cycled to `n`
    (a text-conditioned model has no class labels to count through)."""
    m = Manifest(**manifest)
    conds: list[np.ndarray] = []
    for s in m.shards:
        arrays, _ = read_shard(url, s, m, endpoint=endpoint, on_bad_row="skip", do_normalize=False)
        conds.append(arrays["cond"])
        if sum(len(c) for c in conds) >= n:
            break
    c = torch.from_numpy(np.concatenate(conds)).float()
    return c[torch.arange(n) % c.shape[0]]


MAX_DECODED = 4         # videos decoded per step count for the evaluation's files (a 480p×81 decode is seconds)


def save_decoded_samples(samples: dict[str, torch.Tensor], card: dict, out_dir: Path, *, endpoint: str = "",
                         vae: Any = None, max_items: int = MAX_DECODED) -> list[Path]:
    """Per sample set (name → [N, C, T, H, W] in the model's coordinates): `<name>.png` (one row per video of
    PNG_FRAMES frames spread over it), `<name>.gif` (preview) and `<name>.mp4` (every frame), decoded by the data
    set's VAE."""
    from rcm_core.eval.visualize import save_grid_png

    vae = vae or decoder_for(card, endpoint=endpoint)
    fps = int(card["encoder"].get("fps", 16))
    paths = []
    for name, x in samples.items():
        videos = decode(to_dataset_coordinates(x[:max_items].float(), card), vae)      # [N, T, H, W, 3]
        paths.append(save_grid_png(strip_frames(videos).transpose(0, 4, 1, 2, 3), out_dir / f"{name}.png", scale=1,
                                   value_range=(0, 255), layout="videos"))
        paths += write_videos(videos, out_dir / name, fps=fps)
    return paths
