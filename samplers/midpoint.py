"""The explicit midpoint method (second-order Runge-Kutta) on the flow ODE.

x_{i+1} = x_i + h v(x_i + h/2 v(x_i, t_i), t_i + h/2): two evaluations per step.
"""

from __future__ import annotations

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_step

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
            t_mid = t + (t_next - t) / 2
            pred = model(x, t)
            pred_mid = model(euler_step(x, t, t_mid, pred), t_mid)
            x = euler_step(x, t, t_next, pred_mid)
            x = model.end_step(x, pred)
        return x
