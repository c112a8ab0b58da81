"""Step-count quality without downloaded networks: metrics, owned feature spaces, exact GMM metrics, video checks.

Test: `.venv/bin/python -m pytest tests/test_eval.py -q` (CPU, under a minute).
Modules: `metrics` (FD, KID, PRDC, diversity, accuracy, paired MSE, bootstrap), `features` (random projections,
owned classifier), `gmm` (exact toy-track metrics), `video` (temporal consistency), `report` (per-step-count table,
MLflow keys). Pure PyTorch: never imports ray or mlflow.
"""

from rcm_core.eval.features import (
    FeatureExtractor,
    FeatureNet,
    FeatureNetConfig,
    FeatureOut,
    RandomProjection,
    load_feature_net,
    save_feature_net,
    train_feature_classifier,
)
from rcm_core.eval.gmm import GaussianMixture, GMMMetrics, gmm_metrics, radius_for_mass
from rcm_core.eval.metrics import (
    PRDC,
    Estimate,
    bootstrap_ci,
    bootstrap_many,
    class_accuracy,
    diversity_ratio,
    frechet_distance,
    kid,
    mean_pairwise_distance,
    paired_mse,
    prdc,
)
from rcm_core.eval.report import (
    EvalConfig,
    StepCountReport,
    evaluate_step_counts,
    format_table,
    mlflow_metrics,
    step_count_name,
    table_rows,
)
from rcm_core.eval.video import TemporalConsistency, motion_ratio, temporal_consistency

__all__ = [
    "PRDC",
    "Estimate",
    "EvalConfig",
    "FeatureExtractor",
    "FeatureNet",
    "FeatureNetConfig",
    "FeatureOut",
    "GMMMetrics",
    "GaussianMixture",
    "RandomProjection",
    "StepCountReport",
    "TemporalConsistency",
    "bootstrap_ci",
    "bootstrap_many",
    "class_accuracy",
    "diversity_ratio",
    "evaluate_step_counts",
    "format_table",
    "frechet_distance",
    "gmm_metrics",
    "kid",
    "load_feature_net",
    "mean_pairwise_distance",
    "mlflow_metrics",
    "motion_ratio",
    "paired_mse",
    "prdc",
    "radius_for_mass",
    "save_feature_net",
    "step_count_name",
    "table_rows",
    "temporal_consistency",
    "train_feature_classifier",
]
