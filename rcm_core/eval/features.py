"""Feature spaces the project owns: seeded random projections of raw latents, and a small conv classifier trained here.

Test: `.venv/bin/python -m pytest tests/test_eval.py -q -k "feature or projection"`.
Use:  `net = train_feature_classifier(latents, labels, steps=300, seed=0, device=torch.device("cpu"))`,
      `out = net.extract(samples)` (per-frame and per-video features and logits), `save_feature_net(net, path)`.

No downloaded network is ever used (shared/reference/peers_and_users.md §4.1, principle 3): numbers in these spaces
carry the extractor's `version` (a content hash) and must never be compared with literature FID/FVD.
Latents are `[N, C, T, H, W]` (T = 1 for images); the classifier sees frames and averages over time per video.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_NET_SCHEMA = 1


class FeatureExtractor(Protocol):
    """Anything that maps samples `[N, ...]` to features `[N, F]` and names its exact version."""

    name: str  # short, stable, used in metric keys (e.g. "feat", "rp64")
    version: str  # content hash; log it beside the numbers

    def features(self, x: Tensor) -> Tensor: ...


def _sha256_tensors(items: dict[str, Tensor], header: str) -> str:
    h = hashlib.sha256(header.encode())
    for key in sorted(items):
        t = items[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# (a) Fixed random projections of raw latents (Johnson–Lindenstrauss; a network-free feature space)


class RandomProjection:
    """x ↦ flatten(x) W with W ~ N(0, 1/D) drawn from `seed` in float64 on the CPU (identical on every device)."""

    def __init__(self, in_dim: int, out_dim: int = 64, *, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(in_dim, out_dim, generator=gen, dtype=torch.float64) / in_dim**0.5
        self.in_dim, self.out_dim, self.seed = in_dim, out_dim, seed
        self.name = f"rp{out_dim}"
        digest = _sha256_tensors({"weight": self.weight}, header=f"rp:{in_dim}:{out_dim}:{seed}")
        self.version = f"rp{out_dim}-d{in_dim}-s{seed}-{digest[:12]}"

    @classmethod
    def for_samples(cls, x: Tensor, out_dim: int = 64, *, seed: int = 0) -> RandomProjection:
        """A projection sized for samples shaped like `x[0]`."""
        return cls(x[0].numel(), out_dim, seed=seed)

    def features(self, x: Tensor) -> Tensor:
        """[N, ...] -> [N, out_dim] float64."""
        rows = x.reshape(x.shape[0], -1).to(torch.float64)
        return rows @ self.weight.to(rows.device)


# ----------------------------------------------------------------------------------------------------------------
# (b) Owned encoder/classifier on frames of latents


@dataclass(frozen=True)
class FeatureNetConfig:
    in_channels: int
    num_classes: int
    width: int = 32
    feat_dim: int = 64


@dataclass(frozen=True)
class FeatureOut:
    """Per-frame outputs of the owned classifier; per-video values average over frames."""

    frame_features: Tensor  # [N, T, F]
    frame_logits: Tensor  # [N, T, K]

    @property
    def video_features(self) -> Tensor:  # [N, F]
        return self.frame_features.mean(dim=1)

    @property
    def video_logits(self) -> Tensor:  # [N, K]
        return self.frame_logits.mean(dim=1)


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    groups = 8 if c_out % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(groups, c_out), nn.SiLU())


class FeatureNet(nn.Module):
    """Three conv blocks (28→14→7→7 for 28×28), global average pool, a feature layer and a linear classifier head."""

    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        self.cfg, w = cfg, cfg.width
        self.register_buffer("in_mean", torch.zeros(cfg.in_channels))  # per-channel latent statistics
        self.register_buffer("in_std", torch.ones(cfg.in_channels))
        # Downsample first: full-resolution activations dominate CPU training time, not the convolutions.
        self.body = nn.Sequential(_conv_block(cfg.in_channels, w, 2), _conv_block(w, 2 * w, 2),
                                  _conv_block(2 * w, 2 * w, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(2 * w, cfg.feat_dim)
        self.head = nn.Linear(cfg.feat_dim, cfg.num_classes)

    def forward_frames(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames [M, C, H, W] -> penultimate features [M, F], logits [M, K]."""
        x = (frames - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        feat = F.silu(self.embed(self.body(x)))
        return feat, self.head(feat)

    def forward(self, x: Tensor) -> FeatureOut:
        """x [N, C, T, H, W] -> per-frame features and logits."""
        n, _, t = x.shape[:3]
        feat, logits = self.forward_frames(to_frames(x))
        return FeatureOut(feat.reshape(n, t, -1), logits.reshape(n, t, -1))

    @torch.no_grad()
    def extract(self, x: Tensor, *, batch_size: int = 256) -> FeatureOut:
        """Batched, gradient-free `forward` on the net's device; outputs float64 on that device."""
        device = next(self.parameters()).device
        outs = [self(x[i:i + batch_size].to(device, torch.float32)) for i in range(0, x.shape[0], batch_size)]
        return FeatureOut(torch.cat([o.frame_features for o in outs]).double(),
                          torch.cat([o.frame_logits for o in outs]).double())

    # FeatureExtractor protocol: short stable name, content-hash version, video features.
    name = "feat"

    @property
    def version(self) -> str:
        return f"featnet-{self.content_hash()[:12]}"

    def features(self, x: Tensor) -> Tensor:
        return self.extract(x).video_features

    def content_hash(self) -> str:
        """sha256 of the config and every parameter and buffer: names the extractor behind each metric."""
        return _sha256_tensors(self.state_dict(), header=json.dumps(asdict(self.cfg), sort_keys=True))


def to_frames(x: Tensor) -> Tensor:
    """[N, C, T, H, W] -> [N*T, C, H, W] (video-major order)."""
    n, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


def _channel_stats(frames: Tensor) -> tuple[Tensor, Tensor]:
    f = frames.to(torch.float64).transpose(0, 1).reshape(frames.shape[1], -1)
    return f.mean(dim=1).float(), f.std(dim=1).clamp(min=1e-6).float()


def train_feature_classifier(
    latents: Tensor,
    labels: Tensor,
    *,
    steps: int = 300,
    seed: int = 0,
    device: torch.device,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 32,
    feat_dim: int = 64,
) -> FeatureNet:
    """Train the owned classifier on frames of `latents [N, C, T, H, W]` labelled by their video's label.

    Deterministic given `seed` (the global RNG is forked, not touched). Every frame of a video carries the video's
    class (true for moving Fashion-MNIST). AdamW with cosine decay; cross-entropy on frame logits.
    """
    frames, frame_labels = to_frames(latents).float(), labels.repeat_interleave(latents.shape[2]).long()
    cfg = FeatureNetConfig(latents.shape[1], int(labels.max()) + 1, width, feat_dim)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        net = FeatureNet(cfg)
    net.in_mean, net.in_std = _channel_stats(frames)
    net.to(device).train()
    _fit(net, frames, frame_labels, steps=steps, seed=seed, batch_size=batch_size, lr=lr)
    return net.eval()


def _fit(net: FeatureNet, frames: Tensor, labels: Tensor, *, steps: int, seed: int, batch_size: int,
         lr: float) -> None:
    device = next(net.parameters()).device
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(frames.shape[0], (min(batch_size, frames.shape[0]),), generator=gen)
        _, logits = net.forward_frames(frames[idx].to(device))
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def save_feature_net(net: FeatureNet, path: str | Path) -> str:
    """Save config + weights + content hash (plain types and tensors only, so `weights_only=True` loads it)."""
    digest = net.content_hash()
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save({"schema": FEATURE_NET_SCHEMA, "config": asdict(net.cfg), "state_dict": state, "sha256": digest},
               path)
    return digest


def load_feature_net(path: str | Path, *, device: torch.device | str = "cpu") -> FeatureNet:
    """Load with `weights_only=True`; raises if the stored hash does not match the loaded weights."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("schema") != FEATURE_NET_SCHEMA:
        raise ValueError(f"{path}: feature net schema {blob.get('schema')} != {FEATURE_NET_SCHEMA}")
    net = FeatureNet(FeatureNetConfig(**blob["config"]))
    net.load_state_dict(blob["state_dict"])
    if net.content_hash() != blob["sha256"]:
        raise ValueError(f"{path}: content hash mismatch (file corrupt or edited)")
    return net.to(device).eval()


def holdout_split(n: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, training) row indices: a seeded permutation, so classes stored in order are split evenly."""
    held = max(round(n * share), 1)
    if n - held < 1:
        raise ValueError(f"{n} rows are too few to train the evaluation classifier and hold {held} out")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:held], perm[held:]
