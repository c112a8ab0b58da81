"""Per-step-count evaluation: every metric for every sampler setting, with bootstrap CIs and a teacher noise floor.

Test: `.venv/bin/python -m pytest tests/test_eval.py -q -k report`.
Use:
    rep = evaluate_step_counts({"nfe_1": s1, "nfe_2": s2, "nfe_4": s4}, teacher_a, reference_2=teacher_b,
                               labels=y, extractors=[net, RandomProjection.for_samples(teacher_a)], classifier=net,
                               costs={"nfe_1": {"nfe": 1, "sec_per_sample": 0.01}})
    print(format_table(rep)); mlflow.log_metrics(mlflow_metrics(rep))   # (the mlflow call lives in workflows/)

Conventions (shared/DESIGN.md, MLflow): keys `eval/nfe_<N>/<metric>` and `eval/teacher_nfe_<N>/<metric>`, each with
`_ci_low`/`_ci_high`. All sets share one evaluation bank (same labels, and for the student the same noises as the
reference, so paired MSE is defined); `reference_2` is the teacher on a disjoint seed set and gives the floor row:
a student row is only "worse than the teacher" where it sits outside the floor (§4.1 principle 4).

Cost: every bootstrap resample recomputes each metric (three N×N distance matrices per feature space). Measured:
N = 5000, 4 rows + floor, 2 spaces, 100 resamples in 39 s on one H100 (tests/test_eval_gpu.py, 2026-11-25). On a
CPU, keep N ≤ ~1000 per set or lower `num_resamples` (N = 2000, 1 row, 2 spaces: ~2.5 s per resample, one core).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rcm_core.eval import metrics as M
from rcm_core.eval import video as V
from rcm_core.eval.features import FeatureExtractor, FeatureNet
from rcm_core.eval.gmm import GaussianMixture, gmm_metrics
from rcm_core.eval.metrics import Estimate

_KEY_OK = re.compile(r"^[A-Za-z0-9_./-]+$")
Bank = dict[str, Tensor]  # per-sample quantities of one sample set, all with first dimension N


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    k: int = 5  # k-NN size for precision/recall/density/coverage (Kynkäänniemi 2019 and Naeem 2020 use 3–5)
    num_resamples: int = 100  # bootstrap resamples per row
    level: float = 0.95  # CI level
    seed: int = 0  # bootstrap and KID subset seed
    stratify: bool = True  # resample within each label (the evaluation bank's prompts are fixed, seeds are not)
    standardize: bool = True  # z-score every feature space with the reference set's mean/std (a fixed affine map)
    kid_subset_size: int = 1000
    kid_num_subsets: int = 10
    gmm_k_sigma: float | None = None  # None: radius holding 99% of each mode's mass
    gmm_min_fraction: float = 0.1


@dataclass
class StepCountReport:
    """rows[name][metric] -> Estimate; `floor` is the teacher-vs-teacher row (None without `reference_2`)."""

    rows: dict[str, dict[str, Estimate]]
    floor_name: str = "teacher_floor"
    floor: dict[str, Estimate] | None = None
    cost_metrics: tuple[str, ...] = ()
    extractor_versions: dict[str, str] = field(default_factory=dict)

    def all_rows(self) -> dict[str, dict[str, Estimate]]:
        return {**self.rows, **({self.floor_name: self.floor} if self.floor is not None else {})}


def step_count_name(nfe: int, *, teacher: bool = False) -> str:
    """The row (and MLflow key) name of a sampler with `nfe` network evaluations: nfe_<N> or teacher_nfe_<N>."""
    return f"{'teacher_' if teacher else ''}nfe_{nfe}"


# ----------------------------------------------------------------------------------------------------------------
# Per-set banks: features and per-sample statistics are computed once, then bootstrapped by row


def _classifier_bank(x: Tensor, net: FeatureNet) -> Bank:
    out = net.extract(x)
    bank = {"logits": out.video_logits, "f/" + net.name: out.video_features}
    if x.shape[2] >= 2:  # video: temporal statistics per sample
        bank["label_const"] = V.per_video_label_constant(out.frame_logits)
        bank["label_agree"] = V.per_video_majority_agreement(out.frame_logits)
        bank["frame_cos"] = V.per_video_frame_cosine(out.frame_features)
    return bank


def build_bank(
    x: Tensor,
    *,
    labels: Tensor | None,
    extractors: Sequence[FeatureExtractor],
    classifier: FeatureNet | None,
    keep_raw: bool,
) -> Bank:
    """Features per owned space, classifier logits, temporal statistics, labels (and raw rows for the GMM track).

    Everything lives on `x.device`: pass samples on the GPU to run the bootstrap there.
    """
    bank: Bank = _classifier_bank(x, classifier) if classifier is not None else {}
    for ex in extractors:
        bank.setdefault("f/" + ex.name, ex.features(x).to(torch.float64))
    if x.dim() == 5 and x.shape[2] >= 2:
        bank["motion"] = V.frame_difference_energy(x)
    if labels is not None:
        bank["labels"] = labels.to(x.device)
    if keep_raw:
        bank["raw"] = M.as_rows(x)
    return {key: value.to(x.device) for key, value in bank.items()}


def feature_stats(ref_bank: Bank) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-dimension mean and std of each feature space of the reference set."""
    return {k: (v.mean(dim=0), v.std(dim=0).clamp(min=1e-12)) for k, v in ref_bank.items() if k.startswith("f/")}


def standardize(bank: Bank, stats: dict[str, tuple[Tensor, Tensor]]) -> Bank:
    """z-score feature spaces with the reference's statistics: scale-free numbers, unit-scale inputs for KID's
    cubic kernel (which assumes features of order one), and one fixed map for every row and bootstrap resample."""
    return {k: (v - stats[k][0]) / stats[k][1] if k in stats else v for k, v in bank.items()}


# ----------------------------------------------------------------------------------------------------------------
# One row of metrics from two banks (called on the full sets and on every bootstrap resample)


def _space_metrics(name: str, c: Tensor, r: Tensor, cb: Bank, rb: Bank, cfg: EvalConfig) -> dict[str, float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    p = M.prdc(c, r, k=cfg.k)
    out = {f"fd_{name}": M.frechet_distance(c, r),
           f"kid_{name}": M.kid(c, r, subset_size=cfg.kid_subset_size, num_subsets=cfg.kid_num_subsets,
                                generator=gen, cand_strata=cb.get("labels"), ref_strata=rb.get("labels")),
           f"precision_{name}": p.precision, f"recall_{name}": p.recall,
           f"density_{name}": p.density, f"coverage_{name}": p.coverage}
    if "labels" in cb and "labels" in rb:
        out[f"div_ratio_{name}"] = M.diversity_ratio(c, r, cb["labels"], rb["labels"])
    return out


def _gmm_row(gmm: GaussianMixture, raw: Tensor, cfg: EvalConfig) -> dict[str, float]:
    g = gmm_metrics(gmm, raw, k_sigma=cfg.gmm_k_sigma, min_fraction=cfg.gmm_min_fraction)
    return {"gmm_coverage": g.coverage, "gmm_precision": g.precision_like, "gmm_mode_kl": g.mode_kl,
            "gmm_mode_tv": g.mode_tv, "gmm_nll": g.nll}


def row_metrics(cb: Bank, rb: Bank, cfg: EvalConfig, gmm: GaussianMixture | None = None) -> dict[str, float]:
    """Every metric the two banks support, as plain floats."""
    out: dict[str, float] = {}
    for key in (k for k in cb if k.startswith("f/") and k in rb):
        out.update(_space_metrics(key[2:], cb[key], rb[key], cb, rb, cfg))
    if "logits" in cb and "labels" in cb:
        out["class_acc"] = M.class_accuracy(cb["logits"], cb["labels"])
    for key in ("label_const", "label_agree", "frame_cos"):
        if key in cb:
            out[key] = float(cb[key].mean())
    if "motion" in cb and "motion" in rb:
        out["motion_ratio"] = float(cb["motion"].mean() / rb["motion"].mean())
    if "pair_se" in cb:
        out["paired_mse"] = float(cb["pair_se"].mean())
    if gmm is not None:
        out.update(_gmm_row(gmm, cb["raw"], cfg))
    return out


def _evaluate_row(cb: Bank, rb: Bank, cfg: EvalConfig, gmm: GaussianMixture | None) -> dict[str, Estimate]:
    fn = lambda c, r: row_metrics(c, r, cfg, gmm)
    strata = lambda b: b.get("labels") if cfg.stratify else None
    return M.bootstrap_many(fn, cb, rb, num_resamples=cfg.num_resamples, level=cfg.level, seed=cfg.seed,
                            cand_strata=strata(cb), ref_strata=strata(rb))


# ----------------------------------------------------------------------------------------------------------------


def evaluate_step_counts(
    samples: Mapping[str, Tensor],
    reference: Tensor,
    *,
    reference_2: Tensor | None = None,
    labels: Tensor | None = None,
    reference_labels: Tensor | None = None,
    extractors: Sequence[FeatureExtractor] = (),
    classifier: FeatureNet | None = None,
    gmm: GaussianMixture | None = None,
    costs: Mapping[str, Mapping[str, float]] | None = None,
    floor_name: str = "teacher_floor",
    cfg: EvalConfig | None = None,
) -> StepCountReport:
    """Metrics of each sample set (name -> [N, ...]) against the reference teacher set, with bootstrap CIs.

    `labels` condition the sample sets (the shared evaluation bank); `reference_labels` those of both teacher sets
    (default: `labels`). Paired MSE is reported for sets with the reference's shape (same noise, same order).
    `costs[name]` (e.g. {"nfe": 1, "sec_per_sample": 0.01}) become columns without a CI; `costs[floor_name]`
    fills the floor row (name it e.g. `teacher_nfe_50` to key the teacher's numbers `eval/teacher_nfe_50/...`).
    """
    cfg = cfg if cfg is not None else EvalConfig()
    ref_labels = reference_labels if reference_labels is not None else labels
    banker = _Banker(extractors, classifier, keep_raw=gmm is not None)
    ref_bank = banker(reference, ref_labels)
    if cfg.standardize:
        banker.stats = feature_stats(ref_bank)
        ref_bank = standardize(ref_bank, banker.stats)
    rows = {_safe_name(name): _evaluate_row(banker.candidate(x, labels, reference), ref_bank, cfg, gmm)
            for name, x in samples.items()}
    floor = _evaluate_row(banker(reference_2, ref_labels), ref_bank, cfg, gmm) if reference_2 is not None else None
    cost_names = _add_costs(rows, floor, _safe_name(floor_name), costs or {})
    versions = {ex.name: ex.version for ex in [*extractors, *([classifier] if classifier is not None else [])]}
    return StepCountReport(rows, _safe_name(floor_name), floor, cost_names, versions)


@dataclass
class _Banker:
    """Builds every set's bank the same way (and z-scores it with the reference's statistics once they are set)."""

    extractors: Sequence[FeatureExtractor]
    classifier: FeatureNet | None
    keep_raw: bool
    stats: dict[str, tuple[Tensor, Tensor]] | None = None

    def __call__(self, x: Tensor, labels: Tensor | None) -> Bank:
        bank = build_bank(x, labels=labels, extractors=self.extractors, classifier=self.classifier,
                          keep_raw=self.keep_raw)
        return standardize(bank, self.stats) if self.stats is not None else bank

    def candidate(self, x: Tensor, labels: Tensor | None, reference: Tensor) -> Bank:
        """A candidate's bank, with per-sample squared error to the reference when the two are same-noise pairs."""
        bank = self(x, labels)
        if x.shape == reference.shape:
            bank["pair_se"] = M.per_sample_sq_error(x, reference)
        return bank


def _add_costs(rows: dict[str, dict[str, Estimate]], floor: dict[str, Estimate] | None, floor_name: str,
               costs: Mapping[str, Mapping[str, float]]) -> tuple[str, ...]:
    """Cost columns (no CI); `costs[floor_name]` goes to the floor row (the teacher's own NFE and latency)."""
    names: dict[str, None] = {}
    for row, values in costs.items():
        name = _safe_name(row)
        target = floor if name == floor_name and floor is not None else rows.setdefault(name, {})
        for metric, v in values.items():
            target[_safe_name(metric)] = Estimate(float(v), float(v), float(v))
            names[_safe_name(metric)] = None
    return tuple(names)


def _safe_name(name: str) -> str:
    """Characters outside [A-Za-z0-9_./-] become '_' (MLflow rejects '@', '=' and others; mlflow #9425)."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", str(name))


# ----------------------------------------------------------------------------------------------------------------
# Output: MLflow keys, table rows, terminal table


def mlflow_metrics(report: StepCountReport, *, prefix: str = "eval") -> dict[str, float]:
    """Flatten to `{prefix}/{row}/{metric}` (+ `_ci_low`, `_ci_high`; costs have no CI keys)."""
    flat: dict[str, float] = {}
    for row, metrics in report.all_rows().items():
        for metric, est in metrics.items():
            key = f"{prefix}/{row}/{metric}"
            if not _KEY_OK.match(key):
                raise ValueError(f"invalid MLflow metric key {key!r} (allowed: A-Za-z0-9_./-)")
            flat[key] = est.value
            if metric not in report.cost_metrics:
                flat[key + "_ci_low"], flat[key + "_ci_high"] = est.ci_low, est.ci_high
    return flat


def table_rows(report: StepCountReport) -> list[dict[str, object]]:
    """One dict per row (`name`, then metric, metric_ci_low, metric_ci_high), e.g. for `mlflow.log_table`."""
    out = []
    for row, metrics in report.all_rows().items():
        entry: dict[str, object] = {"name": row}
        for metric, est in metrics.items():
            entry.update({metric: est.value, f"{metric}_ci_low": est.ci_low, f"{metric}_ci_high": est.ci_high})
        out.append(entry)
    return out


def _cell(est: Estimate | None, with_ci: bool) -> str:
    if est is None:
        return "-"
    if not math.isfinite(est.value) or not with_ci:
        return f"{est.value:.4g}"
    return f"{est.value:.4g} ± {est.half_width:.2g}"


COST_METRICS = ("nfe", "sec_per_sample")
# The short table's metrics, first match wins: (quality, diversity, distance to the teacher), read left to right.
# The first of each is the headline (the comparison figure's title, the one line per evaluation).
SHORT_METRICS = (
    ("gmm_precision", "gmm_mode_tv", "fd_rp2"),             # the toy mixture: exact metrics against the true modes
    ("fd_feat", "precision_feat", "recall_feat"),           # a data set with its own classifier (features.py)
)


def short_metrics(names: Sequence[str] | set[str]) -> list[str]:
    """The 2–3 metrics of the short table among `names`: a SHORT_METRICS group, else the first feature space's
    Fréchet distance, precision and recall."""
    present = set(names)
    for group in SHORT_METRICS:
        if group[0] in present:
            return [m for m in group if m in present]
    spaces = sorted(m[3:] for m in present if m.startswith("fd_"))
    if spaces:
        return [m for m in (f"{p}_{spaces[0]}" for p in ("fd", "precision", "recall")) if m in present]
    return sorted(m for m in present if not m.endswith(("_ci_low", "_ci_high")) and m not in COST_METRICS)[:3]


def headline_metric(names: Sequence[str] | set[str]) -> str | None:
    """The metric that stands for a run: the first of its short_metrics."""
    chosen = short_metrics(names)
    return chosen[0] if chosen else None


def short_columns(report: StepCountReport) -> list[str]:
    """The cost columns and the short_metrics: a table of them fits 100 columns for every SHORT_METRICS group."""
    seen = {m for metrics in report.all_rows().values() for m in metrics}
    costs = [c for c in report.cost_metrics if c in seen]
    return [*costs, *short_metrics(seen - set(report.cost_metrics))]


def short_table(report: StepCountReport) -> str:
    """format_table of the short_columns (the teacher's floor row stays last)."""
    return format_table(report, columns=short_columns(report))


def table_cells(report: StepCountReport, *, columns: Sequence[str] | None = None) -> list[list[str]]:
    """Header and rows of the table as strings: rows = step counts (floor last), columns = costs then metrics,
    cells "value ± half-width"."""
    rows = report.all_rows()
    seen = dict.fromkeys(m for metrics in rows.values() for m in metrics)
    cols = list(columns) if columns is not None else [
        *[c for c in report.cost_metrics if c in seen], *[m for m in seen if m not in report.cost_metrics]]
    body = [[name, *(_cell(rows[name].get(c), c not in report.cost_metrics) for c in cols)] for name in rows]
    return [["name", *cols], *body]


def format_table(report: StepCountReport, *, columns: Sequence[str] | None = None) -> str:
    """Plain-text table of `table_cells`."""
    header, *body = table_cells(report, columns=columns)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])
