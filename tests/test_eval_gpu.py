"""rcm_core.eval on CUDA: same numbers as on the CPU, every tensor where it belongs, and the report's cost at scale.

Run (on the lent GPU machine): `python3 -m pytest -q -s -m gpu tests/test_eval_gpu.py`.
"""

from __future__ import annotations

import time

import pytest
import torch

from rcm_core.eval import features as Fe
from rcm_core.eval import gmm as G
from rcm_core.eval import metrics as M
from rcm_core.eval import report as R

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _data(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return shift + torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_metrics_match_cpu():
    a, b, labels = _data(1500, 32, 0), _data(1500, 32, 1, 0.1), torch.arange(5).repeat(300)
    ga, gb, gl = a.to(CUDA), b.to(CUDA), labels.to(CUDA)
    assert M.frechet_distance(ga, gb) == pytest.approx(M.frechet_distance(a, b), rel=1e-6)
    kid_kw = {"subset_size": 500, "num_subsets": 4}
    assert M.kid(ga, gb, generator=torch.Generator().manual_seed(0), cand_strata=gl, ref_strata=gl, **kid_kw) \
        == pytest.approx(M.kid(a, b, generator=torch.Generator().manual_seed(0), cand_strata=labels,
                               ref_strata=labels, **kid_kw), rel=1e-6, abs=1e-9)
    for got, want in zip(vars(M.prdc(ga, gb)).values(), vars(M.prdc(a, b)).values()):
        assert got == pytest.approx(want, abs=2e-3)  # a rounding difference may flip a point on a ball's edge
    assert M.diversity_ratio(ga, gb, gl, gl) == pytest.approx(M.diversity_ratio(a, b, labels, labels), rel=1e-9)
    est_gpu = M.bootstrap_ci(M.frechet_distance, ga, gb, num_resamples=20, cand_strata=gl, ref_strata=gl)
    est_cpu = M.bootstrap_ci(M.frechet_distance, a, b, num_resamples=20, cand_strata=labels, ref_strata=labels)
    assert est_gpu.ci_high == pytest.approx(est_cpu.ci_high, rel=1e-6)  # same resample indices on both


def test_gmm_on_cuda():
    gmm = G.GaussianMixture(torch.eye(4, dtype=torch.float64) * 5, 0.2)
    x, _ = gmm.sample(4000, generator=torch.Generator(device=CUDA).manual_seed(0))
    assert x.device.type == "cuda"
    m = G.gmm_metrics(gmm, x)
    assert m.coverage == 1.0 and m.nll == pytest.approx(gmm.entropy_separated(), abs=0.1)


def test_report_on_cuda_and_its_cost():
    n, labels = 5000, torch.arange(10).repeat(500)
    protos = torch.randn(10, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    draw = lambda s, scale=1.0: (protos[labels] + scale * torch.randn(
        n, 4, 1, 16, 16, generator=torch.Generator().manual_seed(s))).to(CUDA)
    net = Fe.train_feature_classifier(draw(1), labels, steps=200, seed=0, device=CUDA)
    teacher, teacher_2 = draw(2), draw(3)
    samples = {"nfe_1": draw(4, 1.5), "nfe_2": draw(5, 1.2), "nfe_4": draw(6), "teacher_nfe_50": draw(7)}
    t = time.perf_counter()
    rep = R.evaluate_step_counts(samples, teacher, reference_2=teacher_2, labels=labels.to(CUDA),
                                 extractors=[net, Fe.RandomProjection.for_samples(teacher, 64)], classifier=net)
    seconds = time.perf_counter() - t
    print(f"\nreport: 4 rows + floor, 2 spaces, N={n}, 100 resamples on {torch.cuda.get_device_name()}: "
          f"{seconds:.1f} s")
    print(R.format_table(rep, columns=["fd_feat", "kid_feat", "precision_feat", "recall_feat", "fd_rp64",
                                       "class_acc", "div_ratio_feat"]))
    assert rep.floor["class_acc"].value > 0.9
    assert rep.rows["nfe_1"]["precision_feat"].value < rep.floor["precision_feat"].ci_low
