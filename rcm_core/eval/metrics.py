"""Distribution metrics between a candidate sample set and a reference (teacher) set, in any feature space.

Test: `.venv/bin/python -m pytest tests/test_eval.py -q -k "fd or kid or prdc or bootstrap or diversity"`.
Use:  `fd = frechet_distance(feat_student, feat_teacher)`; `est = bootstrap_ci(frechet_distance, a, b, seed=0)`.

Every function takes `[N, ...]` tensors on any device (rows are flattened to `[N, D]`) and computes in float64.
The reference is the teacher's distribution, not real data (see shared/reference/peers_and_users.md §4.1).

Bootstrap resamples (with replacement) repeat rows bit-for-bit. The U-statistics and k-NN radii below treat
bit-identical rows as one draw, so a resample does not shrink k-NN balls or pairwise spreads to zero: KID skips
pairs of identical rows, k-NN radii are computed over distinct rows, and the diversity spread skips identical pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# A sample set: one tensor, or several tensors / a dict of tensors that share their first (row) dimension.
Sample = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


@dataclass(frozen=True)
class Estimate:
    """A point value and a percentile bootstrap confidence interval."""

    value: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return 0.5 * (self.ci_high - self.ci_low)


@dataclass(frozen=True)
class PRDC:
    """Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020)."""

    precision: float
    recall: float
    density: float
    coverage: float


def as_rows(x: Tensor) -> Tensor:
    """[N, ...] -> [N, D] float64."""
    return x.reshape(x.shape[0], -1).to(torch.float64)


def row_ids(x: Tensor) -> Tensor:
    """[N] long: equal for bit-identical rows (bootstrap copies), distinct otherwise.

    An exact integer hash of each row's float64 bit pattern (wrapping int64 arithmetic), then `unique` on [N]:
    much cheaper than `torch.unique(dim=0)`; a false match needs a 64-bit collision.
    """
    bits = as_rows(x).contiguous().view(torch.int64)
    gen = torch.Generator().manual_seed(0x5EED)
    mult = torch.randint(-(2**62), 2**62, (bits.shape[1],), generator=gen).to(bits.device) | 1
    return torch.unique((bits * mult).sum(dim=1), return_inverse=True)[1]


def _distinct_pair_mask(x: Tensor) -> Tensor:
    """[N, N] bool, True where rows i and j are different draws (not bit-identical copies, not i == j)."""
    ids = row_ids(x)
    return ids[:, None] != ids[None, :]


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance (Heusel et al. 2017, arXiv 1706.08500; in owned feature spaces, never comparable to Inception FID)


def gaussian_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of the rows, float64."""
    x = as_rows(x)
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / max(x.shape[0] - 1, 1)


def sqrtm_psd(c: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (negative round-off clipped)."""
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def trace_sqrt_product(c1: Tensor, c2: Tensor) -> Tensor:
    """tr sqrt(C1 C2) = tr sqrt(C1^½ C2 C1^½): the product is symmetric PSD, so `eigh` is stable (unlike `sqrtm`)."""
    s1 = sqrtm_psd(c1)
    m = s1 @ c2 @ s1
    return torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()


def frechet_distance_from_stats(mu1: Tensor, c1: Tensor, mu2: Tensor, c2: Tensor) -> float:
    """FD = ‖μ1 − μ2‖² + tr C1 + tr C2 − 2 tr (C1 C2)^½ (Fréchet 1957; Dowson & Landau 1982)."""
    fd = (mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * trace_sqrt_product(c1, c2)
    return float(fd.clamp(min=0))


def frechet_distance(candidate: Tensor, reference: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (biased in N: compare at a fixed N)."""
    return frechet_distance_from_stats(*gaussian_stats(candidate), *gaussian_stats(reference))


# ----------------------------------------------------------------------------------------------------------------
# Kernel inception distance (Bińkowski et al. 2018, arXiv 1801.01401)


def polynomial_kernel(a: Tensor, b: Tensor, *, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """k(a, b) = (a·b / D + coef0)^degree, the cubic kernel of KID."""
    return (a @ b.T / a.shape[1] + coef0) ** degree


def _strata_onehots(x_strata: Tensor | None, y_strata: Tensor | None, n_x: int, n_y: int,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    """One-hot stratum matrices [N_x, S], [N_y, S] over the union of labels (one stratum without labels)."""
    if x_strata is None or y_strata is None:
        return (torch.ones(n_x, 1, dtype=torch.float64, device=device),
                torch.ones(n_y, 1, dtype=torch.float64, device=device))
    ids = torch.unique(torch.cat([x_strata.cpu(), y_strata.cpu()]), return_inverse=True)[1]
    onehot = torch.nn.functional.one_hot(ids).to(device, torch.float64)
    return onehot[:n_x], onehot[n_x:]


def _block_mean(k: Tensor, mask: Tensor, oa: Tensor, ob: Tensor, w: Tensor) -> Tensor:
    """Σ_cc' w_c w_c' · mean of k over the allowed pairs of block (c, c'), renormalised over non-empty blocks."""
    mask = mask.to(k)
    block_sum, block_cnt = oa.T @ (k * mask) @ ob, oa.T @ mask @ ob
    ww = w[:, None] * w[None, :] * (block_cnt > 0)
    return (ww * block_sum / block_cnt.clamp(min=1)).sum() / ww.sum()


def mmd2_unbiased(
    x: Tensor, y: Tensor, *, x_strata: Tensor | None = None, y_strata: Tensor | None = None
) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (a U-statistic; can be slightly negative).

    With strata (labels of a fixed evaluation bank) every term is a block mean weighted by the reference's label
    shares w_c w_c'. The plain U-statistic assumes i.i.d. rows: with exactly n_c rows per label it drops the
    self-pairs mostly from same-label blocks and is biased low by O(1/n_c); subsets with unequal label shares
    would bias it high. The weighted form compares the label-conditional distributions at the same label mix.
    """
    x, y = as_rows(x), as_rows(y)
    ox, oy = _strata_onehots(x_strata, y_strata, x.shape[0], y.shape[0], x.device)
    w = oy.mean(dim=0)
    kxx = _block_mean(polynomial_kernel(x, x), _distinct_pair_mask(x), ox, ox, w)
    kyy = _block_mean(polynomial_kernel(y, y), _distinct_pair_mask(y), oy, oy, w)
    kxy_all = polynomial_kernel(x, y)
    kxy = _block_mean(kxy_all, torch.ones_like(kxy_all, dtype=torch.bool), ox, oy, w)
    return float(kxx + kyy - 2 * kxy)


def _rows_or_none(strata: Tensor | None, idx: Tensor) -> Tensor | None:
    return strata[idx.to(strata.device)] if strata is not None else None


def kid(
    candidate: Tensor,
    reference: Tensor,
    *,
    subset_size: int = 1000,
    num_subsets: int = 20,
    generator: torch.Generator | None = None,
    cand_strata: Tensor | None = None,
    ref_strata: Tensor | None = None,
) -> float:
    """KID: unbiased MMD² averaged over random subsets (Bińkowski et al. 2018 §4; KID is unbiased in N)."""
    n_c, n_r = candidate.shape[0], reference.shape[0]
    m = min(subset_size, n_c, n_r)
    if m == n_c == n_r:  # every subset is the whole set
        return mmd2_unbiased(candidate, reference, x_strata=cand_strata, y_strata=ref_strata)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(num_subsets):
        ic, ir = torch.randperm(n_c, generator=gen)[:m], torch.randperm(n_r, generator=gen)[:m]
        total += mmd2_unbiased(candidate[ic.to(candidate.device)], reference[ir.to(reference.device)],
                               x_strata=_rows_or_none(cand_strata, ic), y_strata=_rows_or_none(ref_strata, ir))
    return total / num_subsets


# ----------------------------------------------------------------------------------------------------------------
# k-NN manifolds: improved precision/recall (Kynkäänniemi et al. 2019, arXiv 1904.06991)
# and density/coverage (Naeem et al. 2020, arXiv 2002.09797). Same definitions as the `prdc` package.


def _distinct_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows [U, D] and, for every row, the index of its distinct row [N]."""
    ids = row_ids(x)
    n_u = int(ids.max()) + 1
    first = torch.full((n_u,), x.shape[0], dtype=torch.long, device=x.device)
    first = first.scatter_reduce(0, ids, torch.arange(x.shape[0], device=x.device), reduce="amin")
    return x[first], ids


def knn_radii(x: Tensor, k: int = 5, *, chunk: int = 2048) -> Tensor:
    """Distance from each row to its k-th nearest other distinct row, [N] float64 (0 if all rows are equal)."""
    uniq, inverse = _distinct_rows(as_rows(x))
    n_u = uniq.shape[0]
    if n_u == 1:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    kk = min(k, n_u - 1)
    radii = []
    for start in range(0, n_u, chunk):
        d = torch.cdist(uniq[start:start + chunk], uniq)
        d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = math.inf  # skip self
        radii.append(d.topk(kk, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)[inverse]


def prdc(candidate: Tensor, reference: Tensor, *, k: int = 5, chunk: int = 2048) -> PRDC:
    """Precision, recall (Kynkäänniemi 2019) and density, coverage (Naeem 2020) with k-NN radii (k = 5 by default).

    One pass over candidate-reference distances: candidate i is in reference ball j when d_ij ≤ r_ref[j];
    reference j is in candidate ball i when d_ij ≤ r_cand[i].
    """
    cand, ref = as_rows(candidate), as_rows(reference)
    r_ref, r_cand = knn_radii(ref, k), knn_radii(cand, k)
    balls_holding_cand = torch.zeros(cand.shape[0], dtype=torch.float64, device=cand.device)
    ref_ball_hit = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    ref_in_cand_ball = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    for start in range(0, cand.shape[0], chunk):
        d = torch.cdist(cand[start:start + chunk], ref)
        in_ref_ball = d <= r_ref[None, :]
        balls_holding_cand[start:start + chunk] = in_ref_ball.sum(dim=1).to(torch.float64)
        ref_ball_hit |= in_ref_ball.any(dim=0)
        ref_in_cand_ball |= (d <= r_cand[start:start + chunk, None]).any(dim=0)
    return PRDC(
        precision=float((balls_holding_cand > 0).double().mean()),  # candidates on the reference manifold
        recall=float(ref_in_cand_ball.double().mean()),  # references on the candidate manifold
        density=float(balls_holding_cand.sum() / (k * cand.shape[0])),  # Naeem 2020 eq. (1)
        coverage=float(ref_ball_hit.double().mean()),  # reference balls holding ≥ 1 candidate, eq. (2)
    )


# ----------------------------------------------------------------------------------------------------------------
# Conditional diversity, class accuracy, paired fidelity


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean Euclidean distance over pairs of distinct rows (0 when all rows are identical: full collapse)."""
    x = as_rows(x)
    mask = _distinct_pair_mask(x)
    if not bool(mask.any()):
        return 0.0
    return float(torch.cdist(x, x)[mask].mean())


def per_condition_spread(x: Tensor, labels: Tensor) -> dict[int, float]:
    """Mean pairwise feature distance within each condition with ≥ 2 samples."""
    spread = {}
    for c in torch.unique(labels).tolist():
        rows = x[labels == c]
        if rows.shape[0] >= 2:
            spread[int(c)] = mean_pairwise_distance(rows)
    return spread


def diversity_ratio(candidate: Tensor, reference: Tensor, cand_labels: Tensor, ref_labels: Tensor) -> float:
    """Mean over conditions of spread(candidate) / spread(reference); < 1 means per-condition mode collapse.

    The conditional diversity ratio of the rCM-vs-DMD claim (Zheng et al. 2025, arXiv 2510.08431).
    """
    s_c = per_condition_spread(candidate, cand_labels)
    s_r = per_condition_spread(reference, ref_labels)
    ratios = [s_c[c] / s_r[c] for c in s_c.keys() & s_r.keys() if s_r[c] > 0]
    return float(sum(ratios) / len(ratios)) if ratios else math.nan


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of samples the owned classifier assigns to their conditioning label."""
    return float((logits.argmax(dim=-1) == labels.to(logits.device)).double().mean())


def per_sample_sq_error(candidate: Tensor, reference: Tensor) -> Tensor:
    """Per-row mean squared difference [N], float64; rows of the two sets come from the same noise."""
    return (as_rows(candidate) - as_rows(reference)).square().mean(dim=1)


def paired_mse(candidate: Tensor, reference: Tensor) -> float:
    """Same-noise latent MSE to the teacher (as rCM logs it): reported, not ranked by (DMD is not trajectory-true)."""
    return float(per_sample_sq_error(candidate, reference).mean())


# ----------------------------------------------------------------------------------------------------------------
# Percentile bootstrap (Efron & Tibshirani 1993, ch. 13)


def num_rows(sample: Sample) -> int:
    if isinstance(sample, Tensor):
        return sample.shape[0]
    first = next(iter(sample.values())) if isinstance(sample, Mapping) else sample[0]
    return first.shape[0]


def take_rows(sample: Sample, idx: Tensor) -> Sample:
    """Rows `idx` of every tensor in the sample (same indices for all, so features and labels stay aligned)."""
    if isinstance(sample, Tensor):
        return sample[idx.to(sample.device)]
    if isinstance(sample, Mapping):
        return {key: value[idx.to(value.device)] for key, value in sample.items()}
    return type(sample)(value[idx.to(value.device)] for value in sample)


def _strata_groups(n: int, strata: Tensor | None) -> list[Tensor]:
    """Row indices of each stratum (one group of all rows when there are no strata)."""
    if strata is None:
        return [torch.arange(n)]
    strata = strata.cpu()
    return [torch.nonzero(strata == s).flatten() for s in torch.unique(strata)]


def _resample(groups: list[Tensor], gen: torch.Generator) -> Tensor:
    """Draw each stratum's rows with replacement, keeping its size (a stratified bootstrap)."""
    return torch.cat([g[torch.randint(len(g), (len(g),), generator=gen)] for g in groups])


def _percentile_estimates(point: Mapping[str, float], draws: list[Mapping[str, float]], level: float) -> dict:
    alpha = (1.0 - level) / 2
    out = {}
    for key, value in point.items():
        vals = torch.tensor([d[key] for d in draws], dtype=torch.float64)
        lo, hi = torch.nanquantile(vals, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
        out[key] = Estimate(value=float(value), ci_low=lo, ci_high=hi)
    return out


def bootstrap_many(
    fn: Callable[[Sample, Sample | None], Mapping[str, float]],
    candidate: Sample,
    reference: Sample | None = None,
    *,
    num_resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    paired: bool = False,
    cand_strata: Tensor | None = None,
    ref_strata: Tensor | None = None,
) -> dict[str, Estimate]:
    """Percentile bootstrap CIs for every metric `fn(candidate, reference)` returns (value: on the full sets).

    Candidate and reference are resampled independently (two-sample bootstrap), or with the same indices when
    `paired` (same-noise pairs). `reference` may be None for one-sample metrics (e.g. exact GMM metrics).
    With strata (e.g. the conditioning labels of a fixed evaluation bank) rows are resampled within each stratum,
    so the resamples keep the bank's label balance and the interval reflects the seeds, not the prompt mix.
    Percentile intervals of a biased statistic (FD; Chong & Forsyth 2020) sit above its full-set value.
    """
    gen = torch.Generator().manual_seed(seed)
    g_cand = _strata_groups(num_rows(candidate), cand_strata)
    g_ref = _strata_groups(num_rows(reference), ref_strata) if reference is not None else []
    draws = []
    for _ in range(num_resamples):
        ic = _resample(g_cand, gen)
        ir = ic if paired else _resample(g_ref, gen)
        ref_b = take_rows(reference, ir) if reference is not None else None
        draws.append(fn(take_rows(candidate, ic), ref_b))
    return _percentile_estimates(fn(candidate, reference), draws, level)


def bootstrap_ci(
    fn: Callable[[Sample, Sample | None], float],
    candidate: Sample,
    reference: Sample | None = None,
    *,
    num_resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    paired: bool = False,
    cand_strata: Tensor | None = None,
    ref_strata: Tensor | None = None,
) -> Estimate:
    """Percentile bootstrap CI of one scalar metric `fn(candidate, reference)`; see `bootstrap_many`."""
    wrapped = lambda c, r: {"m": fn(c, r)}
    return bootstrap_many(wrapped, candidate, reference, num_resamples=num_resamples, level=level, seed=seed,
                          paired=paired, cand_strata=cand_strata, ref_strata=ref_strata)["m"]
