"""Euler's method on the flow ODE dx/dt = noise - x0 (in the flow frame).

In the flow frame an Euler step is exactly a deterministic DDIM step and exactly
diffusers' EulerDiscreteScheduler / FlowMatchEulerDiscreteScheduler step, for every
Gaussian path (x0 and noise predictions held constant over the step).
"""

from __future__ import annotations

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_walk

__all__ = ["Euler"]


@SAMPLERS.register
class Euler(Sampler):
    name = "euler"
    description = "Euler ODE steps (first order; equals DDIM and diffusers' Euler schedulers)"

    def sample(self, model, x, ts):
        return euler_walk(model, x, ts)[0]
