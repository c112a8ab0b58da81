"""Exact metrics on a known Gaussian mixture: the toy track's ground truth (no features, no networks).

Test: `.venv/bin/python -m pytest tests/test_eval.py -q -k gmm`.
Use:  `gmm = GaussianMixture(means, stds, weights)`; `m = gmm_metrics(gmm, samples)` -> GMMMetrics.

A sample is "on a mode" when its σ-normalised distance ‖(x − μ_k)/σ_k‖ to its nearest mode is at most `k_sigma`.
In D dimensions that distance of a true sample is χ_D-distributed, so a fixed "3σ" (the 2-D rings of Metz et al.
2017 and Srivastava et al. 2017, VEEGAN) holds almost no mass at D = 64. By default the radius therefore holds
`mass` = 0.99 of each Gaussian (≈ 3.03σ in 2-D); `expected_on_mode` reports what the true mixture itself attains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianMixture:
    """means [K, D]; stds scalar, [K] (isotropic) or [K, D] (diagonal); weights [K] (uniform if None); float64."""

    means: Tensor
    stds: Tensor | float
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        k, d = self.means.shape
        stds = torch.as_tensor(self.stds, dtype=torch.float64, device=self.means.device)
        self.stds = (stds.reshape(-1, 1) if stds.dim() == 1 else stds).expand(k, d).clone()
        w = torch.ones(k, dtype=torch.float64) if self.weights is None else torch.as_tensor(self.weights)
        self.weights = (w / w.sum()).to(self.means)

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = logsumexp_k [log w_k + log N(x; μ_k, diag σ_k²)], [N] float64."""
        z = normalized_offsets(self, x)  # [N, K, D]
        stds, weights = self.stds.to(z.device), self.weights.to(z.device)
        log_norm = -0.5 * self.dim * math.log(2 * math.pi) - stds.log().sum(dim=1)  # [K]
        return torch.logsumexp(weights.log() + log_norm - 0.5 * z.square().sum(dim=2), dim=1)

    def sample(self, n: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n samples [n, D] and their components [n]; the generator's device decides where they are drawn."""
        dev = generator.device
        comp = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=dev)
        return self.means.to(dev)[comp] + self.stds.to(dev)[comp] * eps, comp

    def entropy_separated(self) -> float:
        """H(w) + Σ_k w_k H(N_k): the mixture entropy when modes do not overlap (an upper bound otherwise)."""
        h_comp = 0.5 * self.dim * (1 + math.log(2 * math.pi)) + self.stds.log().sum(dim=1)
        return float(-(self.weights * self.weights.log()).sum() + (self.weights * h_comp).sum())


@dataclass(frozen=True)
class GMMMetrics:
    coverage: float  # share of modes with ≥ min_fraction of their expected on-mode count
    recall_like: float  # = coverage
    precision_like: float  # share of samples within k_sigma of their nearest mode
    expected_on_mode: float  # true mixture's precision_like for that radius (exact if modes are apart, else a lower bound)
    mode_kl: float  # KL(assigned mode histogram ‖ true weights), nats; inf if nothing is on a mode
    mode_tv: float  # total variation between the two
    nll: float  # −mean log p(x) under the true density, nats
    num_modes_covered: int
    k_sigma: float

    @property
    def precision(self) -> float:  # alias: the "precision-like" number of the toy track
        return self.precision_like

    @property
    def recall(self) -> float:  # alias: the "recall-like" number (= mode coverage)
        return self.recall_like


def normalized_offsets(gmm: GaussianMixture, x: Tensor) -> Tensor:
    """(x − μ_k) / σ_k for every sample and mode, [N, K, D] float64."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    return (x[:, None, :] - gmm.means.to(x.device)) / gmm.stds.to(x.device)


def nearest_mode(gmm: GaussianMixture, x: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest mode in σ-normalised distance, and that distance: ([N] long, [N] float64)."""
    dist = normalized_offsets(gmm, x).square().sum(dim=2).sqrt()
    d_min, idx = dist.min(dim=1)
    return idx, d_min


def chi_mass(k_sigma: float, dim: int) -> float:
    """P(‖z‖ ≤ k) for z ~ N(0, I_dim) = P(χ²_dim ≤ k²) = regularised lower gamma γ(dim/2, k²/2)."""
    a = torch.tensor(dim / 2, dtype=torch.float64)
    return float(torch.special.gammainc(a, torch.tensor(k_sigma**2 / 2, dtype=torch.float64)))


def radius_for_mass(dim: int, mass: float = 0.99) -> float:
    """The σ-normalised radius holding `mass` of a dim-dimensional standard Gaussian (bisection on `chi_mass`)."""
    lo, hi = 0.0, math.sqrt(dim) + 20.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chi_mass(mid, dim) < mass else (lo, mid)
    return 0.5 * (lo + hi)


def mode_histogram(gmm: GaussianMixture, x: Tensor, k_sigma: float) -> tuple[Tensor, Tensor]:
    """Counts of on-mode samples per mode [K] and the per-sample on-mode flag [N]."""
    idx, d_min = nearest_mode(gmm, x)
    on_mode = d_min <= k_sigma
    counts = torch.bincount(idx[on_mode], minlength=gmm.num_modes).to(torch.float64)
    return counts.cpu(), on_mode


def _kl_tv(counts: Tensor, weights: Tensor) -> tuple[float, float]:
    if counts.sum() == 0:
        return math.inf, 1.0
    p = counts / counts.sum()
    kl = torch.where(p > 0, p * (p / weights).log(), torch.zeros_like(p)).sum()
    return float(kl), float(0.5 * (p - weights).abs().sum())


def gmm_metrics(
    gmm: GaussianMixture,
    x: Tensor,
    *,
    k_sigma: float | None = None,
    mass: float = 0.99,
    min_fraction: float = 0.1,
) -> GMMMetrics:
    """Exact quality/diversity metrics of samples `x [N, D]` against the true mixture.

    Mode coverage, off-mode rate and mode-weight divergence follow the GAN mode-collapse protocol (Metz et al.
    2017, arXiv 1611.02163; Srivastava et al. 2017, arXiv 1705.07761); NLL is exact (logsumexp in float64).
    """
    k_sigma = radius_for_mass(gmm.dim, mass) if k_sigma is None else k_sigma
    counts, on_mode = mode_histogram(gmm, x, k_sigma)
    weights = gmm.weights.cpu()
    covered = counts >= min_fraction * x.shape[0] * weights * chi_mass(k_sigma, gmm.dim)
    kl, tv = _kl_tv(counts, weights)
    coverage = float(covered.double().mean())
    return GMMMetrics(
        coverage=coverage, recall_like=coverage, precision_like=float(on_mode.double().mean()),
        expected_on_mode=chi_mass(k_sigma, gmm.dim), mode_kl=kl, mode_tv=tv,
        nll=float(-gmm.log_prob(x).mean()), num_modes_covered=int(covered.sum()), k_sigma=k_sigma,
    )
