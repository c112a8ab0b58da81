"""Loading a file of `@triton.jit` functions in one mode: compiled for the GPU, or under Triton's interpreter.

`triton.jit` fixes a function's mode when it decorates, and tests switch `TRITON_INTERPRET=1` on at call time, so
each kernel file is loaded once per mode as its own module object (`kernels._triton_attention_gpu`, `…_interp`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def interpret() -> bool:
    """Whether Triton's interpreter is on (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def triton_module(filename: str, interpret: bool) -> ModuleType:
    """kernels/`filename` loaded with the interpreter on or off."""
    import triton
    path = Path(__file__).with_name(filename)
    name = f"kernels.{path.stem}_{'interp' if interpret else 'gpu'}"
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod
