"""One rCM distillation run on Ray Train, fed by Ray Data, tracked in MLflow.

    python workflows/distill.py                                   # the embedded default (local Ray, toy data)
    python workflows/distill.py --config experiments/X.yaml key=value ...
    ray job submit --working-dir . -- python workflows/distill.py --config experiments/smoke.yaml

What happens: the data set is written if the config names a built-in source and it is not there yet; storage
is checked before any worker starts; the teacher is loaded or trained once on the driver (cached by config
hash); for a labelled video/image data set, the evaluation classifier (`rcm_core.eval.features.FeatureNet`) is
trained once on the driver too (cached by the data set's manifest); a `TorchTrainer` runs
`rcm_core.run.loop.run_training` on every worker with its Ray Data shard; rank 0 logs to MLflow and evaluates
1/2/4 steps against the teacher. Running the same command again resumes from
the run's latest checkpoint and continues the same MLflow run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:            # `python workflows/distill.py` from a checkout or a job working dir
    sys.path.insert(0, str(ROOT))

from rcm_core.config import ExperimentCfg, load_config, redact_url  # noqa: E402
from workflows.cli import add_debug_flag, run_cli  # noqa: E402
from workflows.console import setup_output  # noqa: E402
from workflows.driver import absolute_paths, check_device, driver_feature_net, driver_teacher, prepare_data  # noqa: E402
from workflows.plan import preflight  # noqa: E402
from workflows.ray_session import init_ray, shutdown_local_ray  # noqa: E402
from workflows.tracking import check_tracking_access  # noqa: E402
from workflows.storage import FORCED_TAG, check_resume, finished_checkpoint  # noqa: E402
from workflows.trainer import build_trainer  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="rCM distillation on Ray Train (Ray Data input, MLflow tracking).")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: %(default)s)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)")
    ap.add_argument("--resume-changed", action="store_true",
                    help="continue the run's checkpoint although keys that shape training differ from the config it "
                         f"was trained with (recorded as the MLflow tag {FORCED_TAG}); default: refuse and name them")
    ap.add_argument("--full-table", action="store_true", help="print every metric of the step-count table (wide; "
                    "the default table fits 100 columns)")
    ap.add_argument("--verbose", action="store_true", help="show Ray's own logs and Ray Data's progress bars")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.reg_weight=0.1")
    args = ap.parse_args(argv)
    setup_output(args.verbose)
    cfg = absolute_paths(load_config(args.config, args.overrides))
    check_device(cfg)
    check_tracking_access(cfg)                           # a refused MLflow account stops here, in one line
    cfg = prepare_data(cfg)                              # before the comparison: it resolves data.url
    resume_tags = check_resume(cfg, allow_changed=args.resume_changed)
    checkpoint = finished_checkpoint(cfg)
    if checkpoint is not None:
        print(f"run '{cfg.name}' finished its {cfg.train.steps} steps before: nothing to train", flush=True)
    else:
        teacher_path = driver_teacher(cfg)
        feature_net_path = driver_feature_net(cfg)
        started = init_ray(args.address)
        try:
            preflight(cfg)      # a mesh that cannot fit on the GPUs stops here, not in an OOM on the workers
            result = build_trainer(cfg, teacher_path, feature_net_path=feature_net_path, tags=resume_tags).fit()
        finally:
            if started:
                shutdown_local_ray()
        checkpoint = result.checkpoint.path if result.checkpoint else None
    print(summary(cfg, checkpoint or "(none)", full_table=args.full_table))
    return 0

def summary(cfg: ExperimentCfg, checkpoint: str, *, full_table: bool = False) -> str:
    """The printout after a run: the step-count table (short, or every metric), then where everything is."""
    from workflows.console import final_printout, run_info
    from workflows.tracking import tracking_uri

    run_dir = Path(cfg.train.run_dir).resolve()
    table_file = run_dir / ("eval_table_full.txt" if full_table else "eval_table.txt")
    table = table_file.read_text().rstrip() if table_file.is_file() else "(no evaluation table written)"
    figure = run_dir / "comparison" / "samples.png"
    ids = run_info(run_dir)
    return final_printout(table=table, run_dir=run_dir, uri=redact_url(tracking_uri(cfg)),  # printed: no credentials
                          experiment=cfg.tracking.experiment, checkpoint=checkpoint,
                          experiment_id=ids.get("experiment_id"), run_id=ids.get("run_id"),
                          figure=str(figure) if figure.is_file() else None,
                          full_table=None if full_table else run_dir / "eval_table_full.txt")


if __name__ == "__main__":
    sys.exit(run_cli(main))
