"""Samplers (installed as `flowkit.samplers`); one registered sampler per file.

`available()` lists every registered sampler, built-in or from a plugin.
"""

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler
from flowkit.samplers.boss import Boss
from flowkit.samplers.bottleneck import Bottleneck
from flowkit.samplers.ddim import DDIM
from flowkit.samplers.dirichlet import DirichletEuler, DirichletOneStep
from flowkit.samplers.discrete import DiscreteEuler
from flowkit.samplers.euler import Euler
from flowkit.samplers.heun import Heun
from flowkit.samplers.midpoint import Midpoint
from flowkit.samplers.pipeline import PipelineSampler
from flowkit.samplers.sde import FlowSDE
from flowkit.samplers.simplex_linear import SimplexLinear

__all__ = ["Sampler", "Boss", "Bottleneck", "Euler", "Heun", "Midpoint", "FlowSDE", "DDIM", "PipelineSampler", "DirichletEuler", "DirichletOneStep",
           "DiscreteEuler", "SimplexLinear", "available", "get"]


def available() -> dict[str, str]:
    """Registered sampler names with their one-line descriptions."""
    return SAMPLERS.describe()


def get(name: str) -> type:
    return SAMPLERS.get(name)
