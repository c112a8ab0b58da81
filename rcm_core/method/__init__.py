"""The paper's method: TrigFlow time maths, the denoiser wrapper, the time distributions, the samplers, the sCM /
dCM / DMD / fake-score losses, the power EMA, and one distillation iteration (`distill`).

May import: `rcm_core.config`, `rcm_core.networks`, `rcm_core.parallel`, `rcm_core.data`, `kernels`.
Never imports `rcm_core.eval` or `rcm_core.run` (tests/test_layers.py holds it to that).
"""
