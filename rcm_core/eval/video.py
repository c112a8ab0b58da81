"""Temporal consistency of video samples `[N, C, T, H, W]`: stable class, smooth features, honest motion.

Test: `.venv/bin/python -m pytest tests/test_eval.py -q -k temporal`.
Use:  `tc = temporal_consistency(student_videos, feature_net, reference=teacher_videos)`.

Catches the "static then flashing" collapse of few-step video students (FastVideo #1219 symptoms,
shared/reference/peers_and_users.md §4.2): a flickering video changes predicted class and features between frames
and has more frame-difference energy than the teacher's; a frozen one has almost none.
The per-video functions return `[N]` tensors so the report can bootstrap them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rcm_core.eval.features import FeatureNet


@dataclass(frozen=True)
class TemporalConsistency:
    label_constant: float  # share of videos whose per-frame predicted class never changes
    label_agreement: float  # mean share of frames agreeing with the video's majority class
    frame_cosine: float  # mean cosine similarity of consecutive-frame features
    motion_ratio: float | None  # frame-difference energy / the reference's (≈1 good, ≪1 frozen, ≫1 flicker)


def per_video_label_constant(frame_logits: Tensor) -> Tensor:
    """[N, T, K] -> [N] float64: 1 where argmax is the same in every frame."""
    pred = frame_logits.argmax(dim=-1)
    return (pred == pred[:, :1]).all(dim=1).to(torch.float64)


def per_video_majority_agreement(frame_logits: Tensor) -> Tensor:
    """[N, T, K] -> [N] float64: share of frames predicting the video's majority (mode) class."""
    pred = frame_logits.argmax(dim=-1)
    majority = pred.mode(dim=1).values
    return (pred == majority[:, None]).to(torch.float64).mean(dim=1)


def per_video_frame_cosine(frame_features: Tensor) -> Tensor:
    """[N, T, F] -> [N] float64: mean cos(f_t, f_{t+1}) over consecutive frames (needs T ≥ 2)."""
    f = frame_features.to(torch.float64)
    return F.cosine_similarity(f[:, 1:], f[:, :-1], dim=-1).mean(dim=1)


def frame_difference_energy(x: Tensor) -> Tensor:
    """[N, C, T, H, W] -> [N] float64: mean squared difference between consecutive frames."""
    x = x.to(torch.float64)
    return (x[:, :, 1:] - x[:, :, :-1]).square().flatten(1).mean(dim=1)


def motion_ratio(candidate: Tensor, reference: Tensor) -> float:
    """Mean frame-difference energy of the candidate over the reference's (flicker / frozen detector)."""
    return float(frame_difference_energy(candidate).mean() / frame_difference_energy(reference).mean())


def temporal_consistency(
    videos: Tensor, net: FeatureNet, *, reference: Tensor | None = None
) -> TemporalConsistency:
    """All temporal statistics of `videos` in one call; `motion_ratio` only when a reference is given."""
    if videos.shape[2] < 2:
        raise ValueError(f"temporal consistency needs T >= 2 frames, got shape {tuple(videos.shape)}")
    out = net.extract(videos)
    return TemporalConsistency(
        label_constant=float(per_video_label_constant(out.frame_logits).mean()),
        label_agreement=float(per_video_majority_agreement(out.frame_logits).mean()),
        frame_cosine=float(per_video_frame_cosine(out.frame_features).mean()),
        motion_ratio=motion_ratio(videos, reference) if reference is not None else None,
    )
