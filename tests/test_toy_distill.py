"""End to end on the toy mixture: a teacher is trained here, then rCM, sCM, DMD and dCM each distil it on CPU,
and the 2-step student's samples land on the data's modes (exact metrics, rcm_core/eval/gmm.py).

Metrics (exact, rcm_core/eval/gmm.py): `gmm_precision` = share of samples within the radius holding 99% of
their nearest mode's mass; `gmm_coverage` = share of modes that receive their share of samples; `gmm_nll` =
negative log-likelihood under the true mixture. The undistilled teacher used as a 2-step sampler scores precision
below 0.05 and NLL above 50 (`test_undistilled_two_step_is_poor`). Every distilled 2-step student must reach
coverage ≥ 0.75 and precision / NLL within a stated margin of the values measured at these settings (`MEASURED`:
rCM 0.723 / 5.61, sCM 0.81 / 3.60, DMD 0.475 / 12.8, dCM on a 16-step grid 0.215 / 16.2; the margin, and how it
was placed, beside `MEASURED`). The toy teacher takes its time input as 10·s (model.time_scale):
with Wan's 1000·s its F(t) kept ripples that sCM's JVP amplified, and sCM alone needed a bar of 0.5 that it still
missed at random (issue 18). Determinism: one torch thread, a seeded teacher init, seeded data, sampling and
bootstrap; `pytest -s` prints the metrics, which two runs of one commit repeat exactly.
"""
from pathlib import Path

import pytest
import torch

from rcm_core.config import load_config
from rcm_core.eval.gmm import gmm_metrics
from rcm_core.run.pipeline import eval_gmm, run_toy, toy_gmm, toy_teacher, toy_teacher_check
from rcm_core.method.samplers import consistency_sample
from rcm_core.data.toy import gmm_batches

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "losses" / "debug_cpu.txt"
FAST = ["teacher.train_steps=800", "teacher.train_batch_size=256", "model.hidden=64", "model.depth=2",
        "optim.lr=1e-3", "optim.fake_lr=1e-3",
        "eval.num_samples=600", "eval.bootstrap=2", "train.log_every=10", "train.checkpoint_every=0",
        "sampler.teacher_steps=30"]
# eval.bootstrap only sets how many resamples the confidence intervals get: every value asserted here is the metric
# on the full sample set (rcm_core/eval/metrics.py bootstrap_many, `value`), drawn from no shared generator, so 2
# resamples give the same values to the last bit as 20 or 100 (checked 2026-12-03) and save the resampled KID and
# PRDC: the demo test below spent 55 s of its 140 s in 100 of them.
FEW_RESAMPLES = "eval.bootstrap=2"
# 2-step precision and NLL measured at these settings, one torch thread, every seed fixed (2026-12-02: the same to
# the last digit in pytest and in a separate script). The runs repeat bit for bit, so the bars sit at the measured
# values minus a tolerance for float rounding elsewhere (another CPU, another op order): the largest change seen when
# only the float order changed (this commit's values against the 2026-11-28 ones of the same maths: precision
# 0.0016 / 0.0017 / 0.0067 / 0.015, NLL 0.5 % / 3.6 % / 3.1 % / 4.8 % for rCM / sCM / DMD / dCM), doubled and
# applied to every mode: precision > measured − 0.03, NLL < 1.10 × measured. For scale, train.seed=1 instead of 0
# moves precision by +0.027 / +0.008 / −0.003 / +0.008 and NLL by +5 % / +19 % / −20 % / −11 %: the bars sit below a
# seed's spread. Coverage ≥ 0.75: at most one of the four modes short of its share (dCM measured 0.75).
MEASURED = {"rcm": (0.7233, 5.612), "scm": (0.81, 3.596), "dmd": (0.475, 12.79), "dcm": (0.215, 16.20)}
PRECISION_TOL, NLL_TOL = 0.03, 0.10


def _cfg(tmp_path, *extra):
    return load_config(ROOT / "experiments" / "debug_cpu.yaml",
                       [*FAST, f"train.run_dir={tmp_path}/run", *extra])


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest: one torch thread


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


def _two_step(evaluator):
    row = evaluator.last_report.rows["nfe_2"]
    return row["gmm_precision"].value, row["gmm_coverage"].value, row["gmm_nll"].value


@pytest.mark.slow
@pytest.mark.parametrize("mode,steps,extra", [
    ("rcm", 400, ["distill.tangent_warmup=50"]),
    ("scm", 400, ["distill.tangent_warmup=50"]),
    ("dmd", 400, []),
    # discrete-time CM (issue 21), on a 16-step grid. With this (10·s) teacher, one thread, 400 iterations, 2-step
    # precision / coverage / NLL: N = 48 (official) 0.163 / 0.625 / 13.8 (misses the coverage bar: consistency
    # propagates one grid step per update), N = 16 0.215 / 0.75 / 16.2, N = 8 0.20 / 0.75 / 20.7. Coverage meets
    # sCM's bar; precision stays below sCM's (0.81) at this budget, so its own measured value sets its bar.
    ("dcm", 400, ["distill.dcm_total_steps=16"]),
])
def test_each_mode_distils_the_toy_teacher(tmp_path, monkeypatch, teacher_cache, mode, steps, extra):
    monkeypatch.chdir(teacher_cache)   # one cached teacher (.cache/teachers) for every test of this module
    cfg = _cfg(tmp_path, f"distill.mode={mode}", f"train.steps={steps}", *extra)
    _, evaluator = run_toy(cfg, reporter=lambda *a: None)
    precision, coverage, nll = _two_step(evaluator)
    print(f"\n{mode} 2-step: precision {precision!r} coverage {coverage!r} nll {nll!r}")   # compare two runs: -s
    want_precision, want_nll = MEASURED[mode]
    assert precision > want_precision - PRECISION_TOL and coverage >= 0.75 and nll < (1 + NLL_TOL) * want_nll, \
        (mode, precision, coverage, nll)


# The demo as shipped (experiments/demo.yaml, seed 0, 400 iterations, without Ray), gmm_precision at 1 / 2 / 4 steps
# (2026-12-02, one torch thread, experiments/bench/demo_mid_t.py on the run's checkpoint repeats them to the digit).
DEMO_MEASURED = {1: 0.667, 2: 0.944, 4: 0.969}


@pytest.mark.slow
def test_demo_more_steps_are_not_worse(tmp_path, monkeypatch, teacher_cache):
    """Issue 29: the demo printed its 2-step student below its 1-step one (0.713 vs 0.762) because its sampler
    re-noised to the paper's video time t = 1.3, where the second step starts over. With the demo's own times
    [0.6, 0.4, 0.2] the 2-step student must beat the 1-step one clearly and the 4-step one must not fall behind.

    Bars from measurements (docs/RESULTS.md §1c, seeds 0-2, 400 iterations): the 2-step lead over 1 step is 0.277 /
    0.290 / 0.362 at these times and 0.118 / 0.152 / 0.163 at [1.3, 1.0, 0.6], so a lead ≥ 0.2 tells the two
    apart; 4 steps lead 2 by 0.025 / 0.048 / 0.047, so 4 ≥ 2 − 0.01 leaves room for float order only. Each value
    must also stay within 0.03 of DEMO_MEASURED (this module's tolerance for float order, see MEASURED); at the old
    times this seed gives 2-step 0.785, far under 0.944 − 0.03. The demo's eval.bootstrap=100 is lowered to 2
    (FEW_RESAMPLES): the values are the same, only their intervals, which nothing here reads, get fewer draws."""
    monkeypatch.chdir(teacher_cache)
    cfg = load_config(ROOT / "experiments" / "demo.yaml", [f"train.run_dir={tmp_path}/run", "train.checkpoint_every=0",
                                                           "train.seed=0", FEW_RESAMPLES])
    _, evaluator = run_toy(cfg, reporter=lambda *a: None)
    p = {n: evaluator.last_report.rows[f"nfe_{n}"]["gmm_precision"].value for n in (1, 2, 4)}
    print(f"\ndemo gmm_precision by steps: {p}")
    assert p[2] >= p[1] + 0.2 and p[4] >= p[2] - 0.01, p
    assert all(p[n] > DEMO_MEASURED[n] - PRECISION_TOL for n in p), (p, DEMO_MEASURED)


def test_undistilled_two_step_is_poor(tmp_path, monkeypatch, teacher_cache):
    """The baseline the thresholds above are measured against: the teacher itself as a 2-step 'student'."""
    monkeypatch.chdir(teacher_cache)
    cfg = _cfg(tmp_path)
    gmm = toy_gmm(cfg)
    teacher = toy_teacher(cfg, gmm, torch.device("cpu"))
    assert toy_teacher_check(cfg, teacher, gmm, torch.device("cpu")).ok      # its time derivative is smooth
    z = torch.randn(600, 2, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = consistency_sample(teacher, z, torch.arange(600) % 4, steps=2, sigma_max=80.0, mid_t=[1.3])
    m = gmm_metrics(eval_gmm(gmm), x.reshape(600, 2))
    assert m.precision < 0.05 and m.nll > 50, (m.precision, m.nll)


def test_golden_loss_curve(tmp_path, monkeypatch):
    """A change to the maths shows up here: the tiny config's first 30 losses against a stored curve.

    Regenerate (and review the diff) with `UPDATE_GOLDEN=1 pytest tests/test_toy_distill.py -k golden`."""
    import os

    from rcm_core.method.distill import build_state, distill_step
    from rcm_core.method.denoiser import TrigFlowDenoiser
    from rcm_core.run.loop import step_generator
    from rcm_core.networks import build_network

    cfg = _cfg(tmp_path, "distill.tangent_warmup=10", "distill.student_update_freq=3", "data.batch_size=64")
    torch.manual_seed(0)
    teacher = TrigFlowDenoiser(build_network(cfg.model), "rf_velocity")
    for p in teacher.parameters():          # a fixed, non-trivial teacher without training it
        torch.nn.init.normal_(p, std=0.2)
    state = build_state(cfg, teacher)
    batches = gmm_batches(toy_gmm(cfg), 64, seed=0)
    losses = [distill_step(state, next(batches), cfg, step_generator(0, 0, i, torch.device("cpu")))["loss"]
              for i in range(30)]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("".join(f"{v:.8e}\n" for v in losses))
    golden = [float(v) for v in GOLDEN.read_text().split()]
    assert losses == pytest.approx(golden, rel=1e-4, abs=1e-6)
