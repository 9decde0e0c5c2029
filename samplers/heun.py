"""Heun's method (Karras et al., "Elucidating the Design Space...", Algorithm 1 without churn).

Second order: an Euler predictor to t_{i+1}, then the trapezoidal corrector with the
velocity there (lines 5-8); the last step into t = 0 is a plain Euler step (line 9).
"""

from __future__ import annotations

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_step

__all__ = ["Heun"]


@SAMPLERS.register
class Heun(Sampler):
    name = "heun"
    description = "Heun's second-order ODE steps (2 evaluations per step, 1 on the last)"

    def evaluations(self, steps: int) -> int:
        return 2 * steps - 1

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            h = t_next - t
            pred = model(x, t)
            d = pred.velocity.to(x.dtype)
            x_euler = euler_step(x, t, t_next, pred)  # Euler predictor
            if t_next == 0.0:
                x = x_euler
            else:
                pred_next = model(x_euler, t_next)
                d_prime = pred_next.velocity.to(x.dtype)
                x = x + h * (d + d_prime) / 2
            x = model.end_step(x, pred)
        return x
