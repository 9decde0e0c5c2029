"""Linear flow matching on the simplex, the baseline of Stark et al. (Sec. 3.1): Euler on
dx/dt = (x - p(x1 | x)) / t from a flat Dirichlet draw, the state kept on the simplex;
the last evaluation draws the tokens (see `SimplexSampler`)."""

from __future__ import annotations

from flowkit.paths.categorical import project_simplex
from flowkit.registry import SAMPLERS
from flowkit.sampler_base import SimplexSampler

__all__ = ["SimplexLinear"]


@SAMPLERS.register
class SimplexLinear(SimplexSampler):
    name = "simplex-linear"
    description = "linear flow matching on the simplex: Euler steps of (x - p) / t, tokens drawn at the end"
    path_name = "simplex-linear"

    def update(self, model, x, probs, t, t_next):
        path = model.ctx.denoiser.path
        return project_simplex(x.double() + (t_next - t) * path.velocity(probs, x, t)).to(x.dtype)
