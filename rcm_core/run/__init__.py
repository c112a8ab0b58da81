"""Running a distillation: the training loop (`loop`), checkpoints (`checkpoint`), the teacher made or loaded
(`teacher`), the memory and time planner (`plan`) and the no-Ray toy pipeline (`pipeline`).

The top of rcm_core: may import every other room; nothing in rcm_core imports it.
Without Ray: `python -m rcm_core.run [--config experiments/debug_cpu.yaml] [key=value ...]`.
"""
