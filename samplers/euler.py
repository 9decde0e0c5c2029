"""Euler's method on the flow ODE dx/dt = noise - x0 (in the flow frame).

In the flow frame an Euler step is exactly a deterministic DDIM step and exactly
diffusers' EulerDiscreteScheduler / FlowMatchEulerDiscreteScheduler step, for every
Gaussian path (x0 and noise predictions held constant over the step).
"""

from __future__ import annotations

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler

__all__ = ["Euler"]


@SAMPLERS.register
class Euler(Sampler):
    name = "euler"
    description = "Euler ODE steps (first order; equals DDIM and diffusers' Euler schedulers)"

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            d = pred.velocity
            x = x + (t_next - t) * d.to(x.dtype)
            x = model.end_step(x, pred)
        return x
