"""Tests of rcm_core.eval on synthetic cases with known answers (CPU, well under a minute).

Run: `.venv/bin/python -m pytest tests/test_eval.py -q`.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from rcm_core.eval import features as Fe
from rcm_core.eval import gmm as G
from rcm_core.eval import metrics as M
from rcm_core.eval import report as R
from rcm_core.eval import video as V

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest: one torch thread


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gauss(n: int, d: int, seed: int, *, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return shift + scale * torch.randn(n, d, generator=gen(seed), dtype=torch.float64)


def ring_gmm(k: int = 8, sigma: float = 0.05) -> G.GaussianMixture:
    angle = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return G.GaussianMixture(torch.stack([angle.cos(), angle.sin()], dim=1), sigma)


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_fd_same_distribution_within_noise_floor():
    d, n = 8, 1000
    floor = [M.frechet_distance(gauss(n, d, 2 * s), gauss(n, d, 2 * s + 1)) for s in range(5)]
    assert M.frechet_distance(gauss(n, d, 0), gauss(n, d, 0)) < 1e-9  # a set against itself
    # Same distribution, built differently: an orthogonal rotation of an isotropic Gaussian.
    q, _ = torch.linalg.qr(gauss(d, d, 99))
    fd_rot = M.frechet_distance(gauss(n, d, 20) @ q, gauss(n, d, 21))
    assert fd_rot < 3 * max(floor)
    # A shift of 0.3 in one coordinate (‖Δμ‖² = 0.09) must stand clear of the floor.
    shifted = gauss(n, d, 22)
    shifted[:, 0] += 0.3
    assert M.frechet_distance(shifted, gauss(n, d, 23)) > 2 * max(floor)


def test_fd_mean_shift_adds_squared_norm():
    a, b = gauss(20000, 6, 1), gauss(20000, 6, 2)
    delta = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.0, 0.25], dtype=torch.float64)
    base = M.frechet_distance(a, b)
    expected = base + delta.square().sum() + 2 * delta @ (a.mean(0) - b.mean(0))
    assert M.frechet_distance(a + delta, b) == pytest.approx(float(expected), rel=1e-6)
    assert M.frechet_distance(a + delta, b) == pytest.approx(float(delta.square().sum()), abs=0.05)


def test_fd_from_stats_closed_forms():
    # Commuting covariances: FD = Σ (√a − √b)²; non-commuting: compare with scipy's sqrtm.
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    mu = torch.zeros(3, dtype=torch.float64)
    expected = (a.sqrt() - b.sqrt()).square().sum()
    assert M.frechet_distance_from_stats(mu, a.diag(), mu, b.diag()) == pytest.approx(float(expected), rel=1e-10)
    linalg = pytest.importorskip("scipy.linalg")
    x, y = gauss(5, 5, 3), gauss(5, 5, 4)
    c1, c2 = x @ x.T + 0.1 * torch.eye(5), y @ y.T + 0.1 * torch.eye(5)
    ref = float(torch.from_numpy(linalg.sqrtm((c1 @ c2).numpy()).real).trace())
    assert float(M.trace_sqrt_product(c1, c2)) == pytest.approx(ref, rel=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# KID


def test_kid_unbiased_near_zero_for_same_distribution():
    vals = torch.tensor([M.kid(gauss(60, 16, 2 * s), gauss(60, 16, 2 * s + 1)) for s in range(30)])
    stderr = vals.std() / math.sqrt(len(vals))
    assert abs(float(vals.mean())) < 3 * float(stderr)  # unbiased: mean ≈ 0 ...
    assert bool((vals < 0).any())  # ... so some draws are negative
    # the biased (V-statistic) MMD² would be clearly positive here
    x, y = gauss(60, 16, 0), gauss(60, 16, 1)
    kxx, kyy, kxy = (M.polynomial_kernel(p, q).mean() for p, q in [(x, x), (y, y), (x, y)])
    assert float(kxx + kyy - 2 * kxy) > 5 * float(stderr)


def test_kid_positive_for_different_distributions():
    same = M.kid(gauss(500, 16, 0), gauss(500, 16, 1))
    diff = M.kid(gauss(500, 16, 2, shift=0.3), gauss(500, 16, 3))
    assert diff > 0.05 and diff > 20 * abs(same)


def test_kid_strata_remove_fixed_bank_bias():
    # A fixed evaluation bank: exactly 30/20/10 rows of 3 separated modes. The plain U-statistic is biased low
    # (self-pairs are dropped mostly from same-mode blocks); the stratum-weighted one is not.
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)  # unbalanced: block weights p_c p_c' matter
    centers = 3 * torch.eye(4, dtype=torch.float64)[:3]
    draw = lambda s: centers[labels] + 0.3 * gauss(60, 4, s)
    plain = torch.tensor([M.kid(draw(2 * s), draw(2 * s + 1)) for s in range(20)])
    strat = torch.tensor([M.kid(draw(2 * s), draw(2 * s + 1), cand_strata=labels, ref_strata=labels)
                          for s in range(20)])
    assert abs(float(strat.mean())) < 3 * float(strat.std()) / math.sqrt(20)
    assert float(plain.mean()) < float(strat.mean()) - 5 * float(strat.std()) / math.sqrt(20)


def test_kid_subsets_are_seeded():
    a, b = gauss(300, 8, 0), gauss(200, 8, 1, shift=0.2)
    k1 = M.kid(a, b, subset_size=100, num_subsets=5, generator=gen(7))
    k2 = M.kid(a, b, subset_size=100, num_subsets=5, generator=gen(7))
    assert k1 == k2 and k1 > 0


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage, diversity


def _ring_samples(n: int, seed: int, modes: list[int] | None = None) -> torch.Tensor:
    gmm = ring_gmm(8, 0.1)
    x, comp = gmm.sample(16 * n, generator=gen(seed))
    keep = torch.isin(comp, torch.tensor(modes)) if modes is not None else torch.ones_like(comp, dtype=torch.bool)
    return x[keep][:n]


def test_prdc_exact_small_case():
    # k = 1 in 1-D. Reference radii are all 1; candidate radii: 0.5 -> 9.5 (next candidate is 10), 10 -> 1, 11 -> 1.
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    cand = torch.tensor([[0.5], [10.0], [11.0]])
    p = M.prdc(cand, ref, k=1)
    assert p.precision == pytest.approx(1 / 3)  # only 0.5 lies in a reference ball
    assert p.recall == 1.0  # the ball of 0.5 (radius 9.5) holds every reference point
    assert p.density == pytest.approx(2 / 3)  # 0.5 lies in the balls of 0 and 1: 2 / (k · 3)
    assert p.coverage == 0.5  # balls of 0 and 1 hold a candidate, those of 2 and 3 do not


def test_prdc_same_distribution_is_high():
    p = M.prdc(_ring_samples(1000, 1), _ring_samples(1000, 2), k=5)
    assert min(p.precision, p.recall, p.coverage) > 0.85 and 0.8 < p.density < 1.2


def test_collapsed_set_loses_recall_and_coverage_keeps_precision():
    p = M.prdc(_ring_samples(1000, 1, modes=[0]), _ring_samples(1000, 2), k=5)
    assert p.precision > 0.9
    assert p.recall < 0.3 and p.coverage < 0.3


def test_noised_set_loses_precision():
    ref = _ring_samples(1000, 2)
    clean = M.prdc(_ring_samples(1000, 1), ref)
    noised = M.prdc(_ring_samples(1000, 1) + 0.3 * gauss(1000, 2, 5), ref)
    assert noised.precision < clean.precision - 0.3
    assert noised.density < 0.5 * clean.density


def test_knn_radii_ignore_bootstrap_duplicates():
    x = gauss(200, 4, 0)
    doubled = torch.cat([x, x, x[:50]])  # every row repeated, as a bootstrap resample repeats rows
    assert torch.equal(M.knn_radii(doubled, 5), torch.cat([M.knn_radii(x, 5)] * 2 + [M.knn_radii(x, 5)[:50]]))
    assert float(M.knn_radii(x, 5).min()) > 0
    assert torch.equal(M.knn_radii(x[:1].expand(10, 4), 5), torch.zeros(10, dtype=torch.float64))


def test_diversity_ratio_detects_per_condition_collapse():
    labels = torch.arange(4).repeat_interleave(100)
    centers = 5 * gauss(4, 8, 0)[labels]
    ref, same = centers + gauss(400, 8, 1), centers + gauss(400, 8, 2)
    collapsed = centers + 0.2 * gauss(400, 8, 3)
    assert M.diversity_ratio(same, ref, labels, labels) == pytest.approx(1.0, abs=0.05)
    assert M.diversity_ratio(collapsed, ref, labels, labels) == pytest.approx(0.2, abs=0.03)
    assert M.mean_pairwise_distance(centers[labels == 0]) == 0.0  # identical rows: full collapse


def test_class_accuracy_and_paired_mse():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert M.class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    a = torch.zeros(3, 1, 2, 2, 2)
    b = a.clone()
    b[0] += 2.0  # one of three samples off by 2 everywhere
    assert M.paired_mse(b, a) == pytest.approx(4.0 / 3)


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_ci_covers_truth_in_repeated_draws():
    truth, n, hits, widths = 0.3, 200, 0, []
    stat = lambda c, r: float(c.mean() - r.mean())
    for rep in range(50):
        cand, ref = gauss(n, 1, 1000 + rep, shift=truth), gauss(n, 1, 2000 + rep)
        est = M.bootstrap_ci(stat, cand, ref, num_resamples=200, seed=rep)
        hits += est.ci_low <= truth <= est.ci_high
        widths.append(est.ci_high - est.ci_low)
    assert hits >= 43  # nominal 95%: expect ~47.5 of 50; 43 is ~2.5 binomial sd below
    assert sum(widths) / len(widths) == pytest.approx(2 * 1.96 * math.sqrt(2 / n), rel=0.15)


def test_bootstrap_fd_interval_covers_population_value():
    # FD between N(0, I) and N(δ, I) is ‖δ‖² = 1 in the population; FD's O(D/N) bias is small at this N.
    hits = 0
    for rep in range(20):
        est = M.bootstrap_ci(M.frechet_distance, gauss(3000, 2, 10 + rep, shift=math.sqrt(0.5)),
                             gauss(3000, 2, 50 + rep), num_resamples=100, seed=rep)
        hits += est.ci_low <= 1.0 <= est.ci_high
    assert hits >= 16


def test_bootstrap_paired_and_multi_metric():
    base = gauss(300, 1, 0)
    cand, ref = base + 0.1 + 0.05 * gauss(300, 1, 1), base
    fn = lambda c, r: {"diff": float((c - r).mean()), "mse": M.paired_mse(c, r)}
    paired = M.bootstrap_many(fn, cand, ref, num_resamples=200, paired=True)
    unpaired = M.bootstrap_many(fn, cand, ref, num_resamples=200, paired=False)
    assert paired["diff"].ci_low < 0.1 < paired["diff"].ci_high
    assert paired["diff"].half_width < 0.2 * unpaired["diff"].half_width  # pairing removes the shared noise
    assert paired["mse"].value == pytest.approx(M.paired_mse(cand, ref))


# ----------------------------------------------------------------------------------------------------------------
# Exact GMM metrics


def test_radius_for_mass():
    assert G.radius_for_mass(2, 0.99) == pytest.approx(math.sqrt(-2 * math.log(0.01)), rel=1e-9)
    assert G.chi_mass(G.radius_for_mass(64, 0.99), 64) == pytest.approx(0.99, abs=1e-9)


def test_gmm_true_samples_full_coverage_and_entropy_nll():
    gmm = ring_gmm(8, 0.05)
    x, _ = gmm.sample(8000, generator=gen(0))
    m = G.gmm_metrics(gmm, x)
    assert m.coverage == 1.0 and m.recall_like == 1.0
    assert m.precision_like == pytest.approx(0.99, abs=0.005)
    assert m.mode_tv < 0.03 and m.mode_kl < 0.005
    se = float(gmm.log_prob(x).std()) / math.sqrt(x.shape[0])
    assert abs(m.nll - gmm.entropy_separated()) < 4 * se  # NLL estimates the entropy for true samples


def test_gmm_missing_modes_and_off_mode_samples():
    gmm = ring_gmm(8, 0.05)
    x, comp = gmm.sample(8000, generator=gen(1))
    missing = x[comp < 5]  # only 5 of 8 modes
    m = G.gmm_metrics(gmm, missing)
    assert m.coverage == pytest.approx(5 / 8) and m.num_modes_covered == 5 and m.recall == m.coverage
    assert m.precision_like > 0.98
    assert m.mode_tv == pytest.approx(3 / 8, abs=0.03)
    blurry = G.gmm_metrics(gmm, x + 0.15 * torch.randn(x.shape, generator=gen(2), dtype=torch.float64))
    assert blurry.precision_like < 0.5 and blurry.coverage == 1.0
    assert blurry.nll > G.gmm_metrics(gmm, x).nll + 1.0


def test_gmm_diagonal_and_weighted():
    means = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    gmm = G.GaussianMixture(means, torch.tensor([[1.0, 0.5, 0.1], [0.2, 0.2, 0.2]]), torch.tensor([3.0, 1.0]))
    x, comp = gmm.sample(20000, generator=gen(3))
    assert float((comp == 0).double().mean()) == pytest.approx(0.75, abs=0.02)
    m = G.gmm_metrics(gmm, x)
    assert m.coverage == 1.0 and m.mode_tv < 0.02
    assert m.nll == pytest.approx(gmm.entropy_separated(), abs=0.05)


# ----------------------------------------------------------------------------------------------------------------
# Owned features


def _patterns(labels: torch.Tensor, seed: int, size: int = 16) -> torch.Tensor:
    """One frame per label [N, 1, size, size]: a bright 6×6 square in quadrant `label`, jittered, plus noise."""
    g, n = gen(seed), labels.shape[0]
    img = 0.3 * torch.randn(n, 1, size, size, generator=g)
    jitter = torch.randint(0, 3, (n, 2), generator=g)
    for i, (lab, (dy, dx)) in enumerate(zip(labels.tolist(), jitter.tolist())):
        y0, x0 = (lab // 2) * (size // 2) + dy, (lab % 2) * (size // 2) + dx
        img[i, 0, y0:y0 + 6, x0:x0 + 6] += 1.0
    return img


@pytest.fixture(scope="module")
def trained_net() -> Fe.FeatureNet:
    labels = torch.arange(4).repeat(150)
    latents = _patterns(labels, 0)[:, :, None]  # [N, C, T=1, H, W]
    return Fe.train_feature_classifier(latents, labels, steps=120, seed=0, device=CPU, width=16, feat_dim=32)


def test_feature_classifier_reaches_high_accuracy(trained_net):
    labels = torch.arange(4).repeat(50)
    out = trained_net.extract(_patterns(labels, 123)[:, :, None])
    assert out.frame_features.shape == (200, 1, 32) and out.video_logits.shape == (200, 4)
    assert M.class_accuracy(out.video_logits, labels) > 0.95


def test_feature_net_save_load_hash(trained_net, tmp_path):
    path = tmp_path / "featnet.pt"
    digest = Fe.save_feature_net(trained_net, path)
    loaded = Fe.load_feature_net(path)
    assert loaded.content_hash() == digest and loaded.version == trained_net.version
    x = _patterns(torch.arange(4), 5)[:, :, None]
    assert torch.equal(loaded.features(x), trained_net.features(x))
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["head.bias"] += 1.0
    torch.save(blob, path)
    with pytest.raises(ValueError, match="hash"):
        Fe.load_feature_net(path)


def test_feature_training_is_deterministic():
    labels = torch.arange(4).repeat(10)
    x = _patterns(labels, 0)[:, :, None]
    nets = [Fe.train_feature_classifier(x, labels, steps=3, seed=s, device=CPU, width=8, feat_dim=8) for s in (1, 1, 2)]
    assert nets[0].content_hash() == nets[1].content_hash() != nets[2].content_hash()
    assert torch.allclose(nets[0].in_mean, x.mean().reshape(1)) and torch.allclose(nets[0].in_std, x.std().reshape(1))


def test_random_projection_is_seeded_and_versioned():
    x = torch.randn(10, 2, 3, 4, 4)
    p1, p2, p3 = (Fe.RandomProjection.for_samples(x, 16, seed=s) for s in (0, 0, 1))
    assert torch.equal(p1.features(x), p2.features(x)) and p1.version == p2.version != p3.version
    assert p1.features(x).shape == (10, 16) and p1.name == "rp16"
    # Johnson–Lindenstrauss: distances are roughly preserved up to the 1/D scaling
    d_in = torch.pdist(x.flatten(1).double()) / math.sqrt(x[0].numel())
    d_out = torch.pdist(p1.features(x)) / math.sqrt(16)
    assert float((d_out / d_in).mean()) == pytest.approx(1.0, abs=0.25)


# ----------------------------------------------------------------------------------------------------------------
# Temporal consistency


def _videos(frame_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """frame_labels [N, T] -> videos [N, 1, T, 16, 16]."""
    n, t = frame_labels.shape
    frames = _patterns(frame_labels.reshape(-1), seed)
    return frames.reshape(n, t, 1, 16, 16).permute(0, 2, 1, 3, 4)


def test_temporal_consistency_separates_constant_from_flicker(trained_net):
    base = torch.arange(4).repeat(10)  # 40 videos
    constant = _videos(base[:, None].expand(40, 6), 1)
    flicker = _videos(torch.stack([base, (base + 1) % 4] * 3, dim=1), 2)  # class alternates every frame
    frozen = constant[:, :, :1].expand_as(constant).clone()
    tc_const = V.temporal_consistency(constant, trained_net, reference=constant)
    tc_flick = V.temporal_consistency(flicker, trained_net, reference=constant)
    assert tc_const.label_constant > 0.8 and tc_flick.label_constant < 0.1
    assert tc_const.label_agreement > 0.9 and tc_flick.label_agreement < 0.7
    assert tc_const.frame_cosine > tc_flick.frame_cosine + 0.1
    assert tc_flick.motion_ratio > 1.5 and tc_const.motion_ratio == pytest.approx(1.0)
    assert V.motion_ratio(frozen, constant) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Report, MLflow keys, table


def test_report_keys_table_and_floor():
    n, labels = 300, torch.arange(3).repeat(100)
    gmm = G.GaussianMixture(torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]]), 0.3)
    draw = lambda s: gmm.means[labels] + 0.3 * gauss(n, 2, s)
    teacher_a, teacher_b = draw(0), draw(1)
    shifted = draw(3) + torch.tensor([0.3, 0.0], dtype=torch.float64)
    samples = {"nfe_1": teacher_a + 0.5 * gauss(n, 2, 2), "nfe_2": shifted, R.step_count_name(50, teacher=True): draw(4)}
    costs = {"nfe_1": {"nfe": 1, "sec_per_sample": 0.01}, "nfe_2": {"nfe": 2, "sec_per_sample": 0.02},
             "teacher_floor": {"nfe": 100}}
    proj = Fe.RandomProjection(2, 4, seed=0)
    rep = R.evaluate_step_counts(samples, teacher_a, reference_2=teacher_b, labels=labels, extractors=[proj],
                                 gmm=gmm, costs=costs, cfg=R.EvalConfig(num_resamples=30))
    keys = R.mlflow_metrics(rep)
    for row in ["nfe_1", "nfe_2", "teacher_nfe_50", "teacher_floor"]:
        for metric in ["fd_rp4", "kid_rp4", "precision_rp4", "recall_rp4", "density_rp4", "coverage_rp4",
                       "div_ratio_rp4", "gmm_coverage", "gmm_nll"]:
            assert {f"eval/{row}/{metric}", f"eval/{row}/{metric}_ci_low", f"eval/{row}/{metric}_ci_high"} <= set(keys)
    assert "eval/nfe_1/paired_mse" in keys and "eval/teacher_floor/paired_mse" not in keys
    assert keys["eval/nfe_2/nfe"] == 2 and "eval/nfe_2/nfe_ci_low" not in keys
    assert keys["eval/teacher_floor/nfe"] == 100 and "eval/teacher_nfe_50/nfe" not in keys
    assert all(re.fullmatch(r"[A-Za-z0-9_./-]+", k) for k in keys)
    # shifted / noised sets sit outside the teacher-vs-teacher floor; a fresh teacher draw does not
    rows, floor = rep.rows, rep.floor
    assert rows["nfe_2"]["fd_rp4"].ci_low > floor["fd_rp4"].ci_high
    assert rows["nfe_1"]["precision_rp4"].ci_high < floor["precision_rp4"].ci_low
    assert rows["nfe_1"]["gmm_precision"].value < floor["gmm_precision"].value - 0.1
    assert rows["teacher_nfe_50"]["fd_rp4"].ci_low < floor["fd_rp4"].ci_high
    assert rows["teacher_nfe_50"]["fd_rp4"].ci_high > floor["fd_rp4"].ci_low
    est = rep.rows["nfe_2"]["fd_rp4"]
    assert est.ci_low <= est.ci_high and rep.extractor_versions == {"rp4": proj.version}
    table = R.format_table(rep)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "nfe", "sec_per_sample"] and len(lines) == 2 + 4
    assert lines[-1].startswith("teacher_floor") and "±" in lines[2]


def test_report_with_classifier_on_video(trained_net):
    labels = torch.arange(4).repeat(8)
    teacher = _videos(labels[:, None].expand(32, 4), 10)
    teacher_2 = _videos(labels[:, None].expand(32, 4), 11)
    flicker = _videos(torch.stack([labels, (labels + 1) % 4] * 2, dim=1), 12)
    rep = R.evaluate_step_counts({"nfe@1": flicker}, teacher, reference_2=teacher_2, labels=labels,
                                 extractors=[trained_net], classifier=trained_net, cfg=R.EvalConfig(num_resamples=20))
    row = rep.rows["nfe_1"]  # '@' sanitised to '_'
    assert rep.floor["class_acc"].value > 0.9 and rep.floor["label_const"].value > 0.8
    assert row["label_const"].value < 0.2 and row["motion_ratio"].value > 1.5
    assert rep.extractor_versions["feat"].startswith("featnet-")
    assert R.table_rows(rep)[0]["name"] == "nfe_1"


def test_eval_never_imports_ray_or_mlflow():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['mlflow'] = None\n"
            "import rcm_core.eval, rcm_core.eval.report")
    subprocess.run([sys.executable, "-c", code], check=True)
