"""DDIM (Song et al., "Denoising Diffusion Implicit Models", eq. 12 and 16).

x_{t'} = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z with
s = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a'), written with the variance-preserving
coefficients that share flowkit time's signal-to-noise ratio and moved to the flow frame.
eta = 0 is deterministic DDIM, which equals Euler in the flow frame; eta = 1 is DDPM's
ancestral sampling.
"""

from __future__ import annotations

import math

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler

__all__ = ["DDIM"]


def _vp(t: float) -> tuple[float, float]:
    """Variance-preserving (alpha, sigma) with alpha / sigma = (1 - t) / t."""
    n = math.hypot(1 - t, t)
    return (1 - t) / n, t / n


@SAMPLERS.register
class DDIM(Sampler):
    name = "ddim"
    description = "DDIM steps; eta=0 deterministic (= Euler), eta=1 ancestral (DDPM)"

    def __init__(self, *, eta: float = 0.0, grid: str | None = None):
        super().__init__(grid=grid)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = float(eta)

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            x0, eps = pred.x0.to(x.dtype), pred.eps.to(x.dtype)
            a, s = _vp(t)
            a2, s2 = _vp(t_next)
            abar, abar2 = a * a, a2 * a2
            noise_sd = 0.0
            if self.eta > 0 and t_next > 0:
                noise_sd = self.eta * math.sqrt((1 - abar2) / (1 - abar)) * math.sqrt(max(1 - abar / abar2, 0.0))
            dir_sd = math.sqrt(max(1 - abar2 - noise_sd**2, 0.0))
            x_vp = a2 * x0 + dir_sd * eps
            if noise_sd > 0:
                x_vp = x_vp + noise_sd * model.ctx.randn_like(x)
            x = x_vp / (a2 + s2)
            x = model.end_step(x, pred)
        return x
