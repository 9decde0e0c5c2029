"""Linear flow matching on the simplex, the baseline of Stark et al. (Sec. 3.1): Euler on
dx/dt = (x - p(x1 | x)) / t from a flat Dirichlet draw, the state kept on the simplex;
the last evaluation draws the tokens (see `SimplexSampler`)."""

from __future__ import annotations

from flowkit.paths.categorical import project_simplex
from flowkit.registry import SAMPLERS
from flowkit.sampler import SimplexSampler

__all__ = ["SimplexLinear"]


@SAMPLERS.register
class SimplexLinear(SimplexSampler):
    name = "simplex-linear"
    description = "linear flow matching on the simplex: Euler steps of (x - p) / t, tokens drawn at the end"
    path_name = "simplex-linear"

    def sample(self, model, x, ts):
        path = model.ctx.denoiser.path
        n = len(ts) - 1
        for i in range(n):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            if i == n - 1:
                x = self.finish(model, pred.probs, x)
            else:
                x = project_simplex(x.double() + (t_next - t) * path.velocity(pred.probs, x, t)).to(x.dtype)
            x = model.end_step(x, pred)
        return x
