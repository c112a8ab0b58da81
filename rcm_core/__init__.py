"""rcm_core: the rCM / sCM / DMD distillation engine in pure PyTorch (no Ray, no MLflow).

Layers (DESIGN.md): trigflow (time maths) → denoiser (teacher/student wrappers) → losses → distill (one
iteration) → loop (run_training). Run the embedded toy without Ray: `python -m rcm_core.loop`.
"""
