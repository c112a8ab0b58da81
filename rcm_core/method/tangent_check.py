"""Before distilling: is the teacher's exact time derivative the slope of its F(t), or ripples? (issue 18)

sCM's tangent differentiates the student (a copy of the teacher) in t exactly, by JVP. A network whose time input
is a sinusoid of a large multiple of the time (Wan's 1000·s) can, after a short training, keep small high-frequency
ripples in F(t): harmless for an ODE sampler, which only ever evaluates F, but the JVP differentiates them and the
tangent g is then dominated by them (‖g‖ rises steadily, `train/scm_g_norm`, and more iterations make the student
worse). This check compares, on a grid of t, the JVP's cos t·sin t·∂F/∂t with a central difference of step h:

    ratio(t) = rms(cos t·sin t·∂F/∂t by JVP) / rms(cos t·sin t·(F(t+h) − F(t−h)) / 2h)

A smooth teacher gives ratio ≈ 1 (the difference's error is O(h²)); a rippled one gives ratio ≫ 1. It costs one
JVP and two forwards per grid time on a handful of samples.

Threshold (RATIO_WARN = 1.5), from the toy teachers of experiments/bench/time_scale_study.py (debug_cpu, 1,500
flow-matching steps; 2026-11-28, docs/RESULTS.md §1a): the analytic mixture 1.00; trained with the time input 1·s
1.00, 10·s 1.00, 100·s 1.14 (their sCM students reach 2-step precision 0.82–0.86); with Wan's 1000·s 5.35 (per grid
time 1.15–5.35; its sCM student 0.16, ‖g‖ rising 2.1 → 6.4). 1.5 sits between with room on both sides: above it
more than a third of the exact slope is structure finer than h = 0.01, which no sampler step sees and the sCM
tangent should not follow. A narrow network dtype (bf16) adds rounding noise to the difference, which lowers the
ratio: there the check can miss roughness, not invent it.

    pytest tests/test_tangent_check.py
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from rcm_core.method.denoiser import TrigFlowDenoiser
from rcm_core.method.losses import jvp
from rcm_core.method.trigflow import add_noise

TIME_GRID = (0.05, 0.3, 0.7, 1.0, 1.3, 1.5)    # TrigFlow t; covers sCM's p_G (log tan t ~ N(−0.8, 1.6²))
FD_STEP = 1.0e-2                                # h: well above float32 round-off, below any sampler step
RATIO_WARN = 1.5


@dataclass
class TangentCheck:
    t: list[float]
    jvp: list[float]        # rms of cos t·sin t·∂F/∂t by JVP, per grid time
    fd: list[float]         # the same by central difference
    threshold: float = RATIO_WARN

    @property
    def ratio(self) -> list[float]:
        return [j / max(f, 1e-12) for j, f in zip(self.jvp, self.fd)]

    @property
    def max_ratio(self) -> float:
        return max(self.ratio)

    @property
    def worst_t(self) -> float:
        return self.t[self.ratio.index(self.max_ratio)]

    @property
    def ok(self) -> bool:
        return self.max_ratio <= self.threshold

    def metrics(self, prefix: str = "teacher_check/") -> dict[str, float]:
        """Flat metrics for MLflow: the worst ratio, where it is, and each grid time's ratio."""
        out = {f"{prefix}jvp_fd_ratio_max": self.max_ratio, f"{prefix}jvp_fd_ratio_worst_t": self.worst_t,
               f"{prefix}ok": float(self.ok)}
        for t, r, j, f in zip(self.t, self.ratio, self.jvp, self.fd):
            out[f"{prefix}jvp_fd_ratio_t{t:g}"] = r
            out[f"{prefix}dFdt_jvp_t{t:g}"] = j
            out[f"{prefix}dFdt_fd_t{t:g}"] = f
        return out

    def tags(self) -> dict[str, str]:
        """The verdict as MLflow tags."""
        return {"teacher_check": "smooth" if self.ok else "ROUGH", "teacher_check.max_ratio": f"{self.max_ratio:.3f}",
                "teacher_check.worst_t": f"{self.worst_t:g}", "teacher_check.threshold": f"{self.threshold:g}"}

    def table(self) -> str:
        rows = [f"{'t':>6} {'JVP':>10} {'central diff':>13} {'ratio':>7}"]
        rows += [f"{t:6.2f} {j:10.4g} {f:13.4g} {r:7.2f}" for t, j, f, r in zip(self.t, self.jvp, self.fd, self.ratio)]
        return "\n".join(rows)

    def report(self) -> str:
        """A one-line verdict, or a loud multi-line warning when the ratio is above the threshold."""
        head = (f"teacher time-derivative check: max JVP/central-difference ratio {self.max_ratio:.2f} at "
                f"t={self.worst_t:g} (threshold {self.threshold:g})")
        if self.ok:
            return head + ": smooth"
        bar = "!" * 100
        return (f"{bar}\n{head}: ROUGH\n{self.table()}\n"
                "The teacher's exact ∂F/∂t is dominated by ripples in t, which sCM's JVP tangent differentiates: "
                "expect train/scm_g_norm to rise and the sCM term to degrade the student. Teachers trained here: "
                "retrain with a smaller model.time_scale (10). Loaded teachers: consider "
                f"distill.tangent=finite_difference distill.fd_step={FD_STEP:g}.\n{bar}")


def time_derivative_check(model: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor | None, *,
                          generator: torch.Generator, t_grid: tuple[float, ...] = TIME_GRID,
                          h: float = FD_STEP, threshold: float = RATIO_WARN) -> TangentCheck:
    """Compare the teacher's JVP time derivative with a central difference at x_t = cos t·x0 + sin t·ε.

    x0 [B, C, T, H, W]: a few data rows (the distillation's own coordinates); cond: their condition (labels or
    context); `generator` seeds ε, so the result is a pure function of its inputs."""
    if not all(h < t < math.pi / 2 - h for t in t_grid):
        raise ValueError(f"every grid time must lie in (h, π/2 − h) with h={h}: got {t_grid}")
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    jvps, fds = [], []
    rms = lambda y: float(y.double().pow(2).mean().sqrt())  # noqa: E731
    with torch.no_grad():
        for t in t_grid:
            tv = torch.full((x0.shape[0],), t, dtype=torch.float64, device=x0.device)
            x_t = add_noise(x0, eps, tv).to(x0.dtype)
            F = lambda tt: model.F(x_t, tt, cond)  # noqa: E731
            _, dF = jvp(F, (tv,), (torch.ones_like(tv),))      # the sCM tangent's own forward-mode AD
            fd = (F(tv + h) - F(tv - h)) / (2 * h)
            cs = math.cos(t) * math.sin(t)
            jvps.append(cs * rms(dF))
            fds.append(cs * rms(fd))
    return TangentCheck(t=list(t_grid), jvp=jvps, fd=fds, threshold=threshold)


def check_rows(row_elements: int) -> int:
    """How many data rows the check reads: about 65k latent values in all (256 toy points, 8 Fashion videos, 2 Wan
    clips), so its cost stays a handful of forwards whatever the data."""
    return max(2, min(256, 2 ** 16 // max(row_elements, 1)))


def warn_if_rough(check: TangentCheck) -> None:
    """Print the verdict; raise a Python warning (RuntimeWarning) too when the teacher is rough."""
    print(check.report(), flush=True)
    if not check.ok:
        warnings.warn(f"teacher time derivative is rough: JVP/central-difference ratio {check.max_ratio:.2f} > "
                      f"{check.threshold:g} at t={check.worst_t:g} (see the table above)", RuntimeWarning,
                      stacklevel=2)


__all__ = ["FD_STEP", "RATIO_WARN", "TIME_GRID", "TangentCheck", "check_rows", "time_derivative_check",
           "warn_if_rough"]
