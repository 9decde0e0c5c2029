"""An analytic Gaussian world for exact sampler and guidance tests.

Data x0 ~ N(mu + shift, s^2) per dimension, where `shift` comes from the branch's
conditioning; on the linear path the exact velocity is known in closed form, and the ODE
maps noise z to mu + shift + s z exactly.
"""

from __future__ import annotations

import torch

from flowkit.conditioning import Conditioning
from flowkit.context import Context
from flowkit.denoiser import FunctionDenoiser
from flowkit.guidance_base import GuidanceStack
from flowkit.paths import LinearPath
from flowkit.seeding import generators_for

MU, S = 0.7, 0.5


def gaussian_velocity(x, timestep, cond, mu=MU, s=S):
    t = (timestep / 1000).to(x.device).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    m = mu + cond["shift"].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    x0 = m + (1 - t) * s * s / ((1 - t) ** 2 * s * s + t * t) * (x - (1 - t) * m)
    eps = (x - (1 - t) * x0) / t
    return eps - x0


def denoiser():
    return FunctionDenoiser(gaussian_velocity, LinearPath(), "velocity")


def conds(batch: int, cond_shift: float = 0.0, uncond_shift: float = 1.0):
    return {
        "cond": Conditioning({"shift": torch.full((batch,), cond_shift, dtype=torch.float64)}),
        "uncond": Conditioning({"shift": torch.full((batch,), uncond_shift, dtype=torch.float64)}),
    }


def context(batch: int, steps: int, modules=(), seed: int = 0, den=None, **cond_kw) -> Context:
    return Context(den or denoiser(), GuidanceStack(list(modules)), conds(batch, **cond_kw),
                   generators_for(seed, range(batch)), steps)
