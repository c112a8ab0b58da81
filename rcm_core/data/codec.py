"""A fixed, exactly invertible "VAE" for pixel videos: an orthonormal 2-D DCT of non-overlapping p×p patches.

    python -c "from rcm_core.data.codec import PatchDCT; import numpy as np; c = PatchDCT(4); \
x = np.random.rand(8, 32, 32); print(abs(c.decode(c.encode(x)) - x).max())"

Frames [T, S, S] become latents [p², T, S/p, S/p]: channel k = (u, v) holds DCT coefficient (u, v) of every patch,
so channel 0 is the (scaled) patch mean — a low-resolution copy of the video — and higher channels hold detail.
Because the DCT matrix D is orthonormal, decode(encode(x)) = x up to rounding: no learned decoder is needed to turn
latent-space samples into pictures, and pixel-space metrics can judge a latent-space model exactly.
The manifest records the encoder (`PatchDCT.describe()`) and per-channel statistics; `decode_latents` uses both.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from rcm_core.data.latents import Manifest, denormalize


def dct_matrix(p: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D [p, p] (rows are basis vectors): D @ D.T = I."""
    n, k = np.meshgrid(np.arange(p), np.arange(p))
    d = np.cos(math.pi * (2 * n + 1) * k / (2 * p)) * math.sqrt(2 / p)
    d[0] /= math.sqrt(2)
    return d


class PatchDCT:
    name = "patch_dct"

    def __init__(self, patch: int = 4):
        if patch < 1:
            raise ValueError(f"patch={patch} must be ≥ 1")
        self.patch = patch
        self.d = dct_matrix(patch)

    @property
    def channels(self) -> int:
        return self.patch ** 2

    def describe(self, frames: int, size: int) -> dict:
        return {"name": self.name, "patch": self.patch, "frames": frames, "size": size, "pixel_range": [0.0, 1.0],
                "latent_layout": "[C=p*p (DCT u*p+v), T, S/p, S/p]"}

    def encode(self, frames: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[..., T, S, S] → [..., p², T, S/p, S/p] (float64 for numpy input; torch keeps its dtype)."""
        p, s = self.patch, frames.shape[-1]
        if frames.shape[-2] != s or s % p:
            raise ValueError(f"frames {tuple(frames.shape)}: need square frames with size divisible by patch={p}")
        lead, t, h = frames.shape[:-3], frames.shape[-3], s // p
        x = frames.reshape(*lead, t, h, p, h, p)                      # [..., T, h, i, w, j]
        if isinstance(frames, torch.Tensor):
            d = torch.as_tensor(self.d, dtype=frames.dtype, device=frames.device)
            c = torch.einsum("ui,vj,...thiwj->...uvthw", d, d, x)
        else:
            c = np.einsum("ui,vj,...thiwj->...uvthw", self.d, self.d, x.astype(np.float64))
        return c.reshape(*lead, p * p, t, h, h)

    def decode(self, latents: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[..., p², T, h, w] → [..., T, h·p, w·p]: the exact inverse of `encode` (Dᵀ c D per patch)."""
        p = self.patch
        if latents.shape[-4] != p * p:
            raise ValueError(f"latents {tuple(latents.shape)}: expected {p * p} channels for patch={p}")
        lead, (t, h, w) = latents.shape[:-4], latents.shape[-3:]
        c = latents.reshape(*lead, p, p, t, h, w)
        if isinstance(latents, torch.Tensor):
            d = torch.as_tensor(self.d, dtype=latents.dtype, device=latents.device)
            x = torch.einsum("ui,vj,...uvthw->...thiwj", d, d, c)
        else:
            x = np.einsum("ui,vj,...uvthw->...thiwj", self.d, self.d, c)
        return x.reshape(*lead, t, h * p, w * p)


def decode_latents(latents: np.ndarray | torch.Tensor, manifest: Manifest,
                   normalized: bool = True) -> np.ndarray | torch.Tensor:
    """Model-space latents [N, C, T, H, W] → pixel videos [N, T, S, S] clipped to [0, 1].

    `normalized=True` (what the data readers hand the model by default) first undoes the per-channel
    normalisation with the manifest's statistics."""
    enc = manifest.encoder
    if enc.get("name") != PatchDCT.name:
        raise ValueError(f"decode_latents knows the '{PatchDCT.name}' encoder; this data set's encoder is {enc!r} "
                         f"(decode it with that encoder's own decoder)")
    x = denormalize(latents, manifest) if normalized else latents
    frames = PatchDCT(int(enc["patch"])).decode(x)
    return frames.clamp(0, 1) if isinstance(frames, torch.Tensor) else np.clip(frames, 0, 1)
