"""The explicit midpoint method (second-order Runge-Kutta) on the flow ODE.

x_{i+1} = x_i + h v(x_i + h/2 v(x_i, t_i), t_i + h/2): two evaluations per step.
"""

from __future__ import annotations

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler

__all__ = ["Midpoint"]


@SAMPLERS.register
class Midpoint(Sampler):
    name = "midpoint"
    description = "explicit midpoint (RK2) ODE steps (2 evaluations per step)"

    def evaluations(self, steps: int) -> int:
        return 2 * steps

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            h = t_next - t
            pred = model(x, t)
            x_mid = x + (h / 2) * pred.velocity.to(x.dtype)
            pred_mid = model(x_mid, t + h / 2)
            x = x + h * pred_mid.velocity.to(x.dtype)
            x = model.end_step(x, pred)
        return x
