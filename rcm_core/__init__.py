"""rcm_core: the rCM / sCM / DMD distillation engine in pure PyTorch (no Ray, no MLflow).

Rooms, from the bottom up (each may import only the rooms below it; tests/test_layers.py checks it):
`config` (the run's dataclasses) → `networks` (the DiT and MLP), `parallel` (mesh, FSDP2, CP, DCP) and `data`
(latent data sets, encoders) → `method` (TrigFlow, losses, samplers, one iteration) → `eval` (step-count
metrics, sample pictures) → `run` (loop, checkpoints, teacher, planner). Without Ray: `python -m rcm_core.run`.
"""
