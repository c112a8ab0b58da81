"""The toy problem with a known answer: a class-conditional Gaussian mixture in D dimensions.

Latents are [N, D, 1, 1, 1] so the same loop, samplers and metrics serve toy and video. The exact
denoiser E[x0 | x_t] is closed form, so an analytic rectified-flow teacher exists (`ExactGMMVelocity`),
and trained teachers and students can be scored exactly (rcm_core/eval/gmm.py).

    python -c "from rcm_core.data.toy import default_gmm; print(default_gmm().sample(4, torch.Generator()))"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GaussianMixture:
    means: torch.Tensor      # [K, D]
    std: float               # isotropic per-mode standard deviation
    weights: torch.Tensor    # [K], sums to 1
    mode_class: torch.Tensor  # [K] int64: the class label each mode belongs to

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.mode_class.max().item()) + 1

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, D, 1, 1, 1] float32, labels [n] int64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return x.float().reshape(n, self.dim, 1, 1, 1), self.mode_class[k]

    def class_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """[n, K] mode weights given each sample's class (renormalised within the class)."""
        w = self.weights[None, :] * (self.mode_class[None, :] == labels[:, None])
        return w / w.sum(1, keepdim=True)

    def posterior_mean(self, x_raw: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """E[x0 | x_raw] for x_raw = (1 − s)·x0 + s·ε, in float64; x_raw [n, D], s [n]."""
        x, s = x_raw.double(), s.double()[:, None]
        mu = self.means.double()                                            # [K, D]
        var = (1 - s) ** 2 * self.std ** 2 + s ** 2                        # [n, 1]
        diff = x[:, None, :] - (1 - s)[:, None, :] * mu[None]              # [n, K, D]
        log_p = -0.5 * (diff ** 2).sum(-1) / var - 0.5 * self.dim * torch.log(var)
        w = self.weights.double()[None] if labels is None else self.class_weights(labels).double()
        resp = torch.softmax(log_p + torch.log(w.clamp_min(1e-300)), dim=1)   # [n, K]
        gain = (1 - s) * self.std ** 2 / var                                 # [n, 1]
        cond_mean = mu[None] + gain[:, None, :] * diff                       # E[x0 | x, k]
        return (resp[..., None] * cond_mean).sum(1)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x0) under the true mixture (class-conditional if labels are given), float64."""
        x = x.reshape(x.shape[0], -1).double()
        d2 = ((x[:, None, :] - self.means.double()[None]) ** 2).sum(-1)
        log_n = -0.5 * d2 / self.std ** 2 - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi))
        w = self.weights.double()[None] if labels is None else self.class_weights(labels).double()
        return torch.logsumexp(log_n + torch.log(w.clamp_min(1e-300)), dim=1)


def default_gmm(dim: int = 2, modes: int = 8, classes: int = 4, radius: float = 1.2,
                std: float = 0.08) -> GaussianMixture:
    """Modes on a circle (extra dims zero), mode k in class k mod `classes`: each class has several modes,
    so a mode-seeking (DMD-only) student can visibly drop some of them."""
    angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    means = torch.zeros(modes, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * torch.cos(angles), radius * torch.sin(angles)
    return GaussianMixture(means=means, std=std, weights=torch.full((modes,), 1.0 / modes, dtype=torch.float64),
                           mode_class=torch.arange(modes) % classes)


class ExactGMMVelocity(nn.Module):
    """The analytic rectified-flow teacher of a Gaussian mixture: v(x_raw, 1000·s) = (x_raw − E[x0|x_raw]) / s.

    Same interface as the project's networks (`forward(x, timestep, cond)`, `null_cond`); label
    `num_classes` is the unconditional mixture.
    """

    def __init__(self, gmm: GaussianMixture):
        super().__init__()
        self.gmm = gmm
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s = (timestep.double() / 1000.0).clamp(1e-6, 1.0)
        labels = cond.clone()
        uncond = labels >= self.gmm.num_classes
        x0 = self.gmm.posterior_mean(x.reshape(n, -1), s, labels.clamp_max(self.gmm.num_classes - 1))
        if uncond.any():
            x0_u = self.gmm.posterior_mean(x.reshape(n, -1), s, None)
            x0 = torch.where(uncond[:, None], x0_u, x0)
        v = (x.reshape(n, -1).double() - x0) / s[:, None]
        return v.reshape(x.shape).to(x.dtype)

    def null_cond(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch_size,), self.gmm.num_classes, dtype=torch.long, device=device)


def gmm_batches(gmm: GaussianMixture, batch_size: int, seed: int, start_step: int = 0):
    """An endless, resumable stream of toy batches: batch i depends only on (seed, i)."""
    from rcm_core.data.latents import LatentBatch

    step = start_step
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x, labels = gmm.sample(batch_size, g)
        yield LatentBatch(latent=x, label=labels)
        step += 1
