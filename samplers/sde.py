"""The marginal-preserving SDE of a flow, integrated by Euler-Maruyama.

For marginals p_t with probability-flow velocity v, every diffusion coefficient g(t)
gives a reverse-time SDE with the same marginals (Song et al., "Score-Based Generative
Modeling through SDEs", eq. 6 and 13, written for a flow):

    dx = [v(x, t) - g(t)^2 / 2 * score(x, t)] dt + g(t) dW,    t from 1 to 0,

and on the linear path score = -noise / t, so the drift is v + g^2 noise / (2 t).
Default g(t) = c t^2 (noise injection fades near the data); the last step into t = 0 is
deterministic.
"""

from __future__ import annotations

import math

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_step

__all__ = ["FlowSDE"]


@SAMPLERS.register
class FlowSDE(Sampler):
    name = "sde"
    description = "Euler-Maruyama on the flow's marginal-preserving SDE, g(t) = c * t^power"

    def __init__(self, *, c: float = 1.0, power: float = 2.0, grid: str | None = None):
        super().__init__(grid=grid)
        if not c >= 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if not power >= 0:
            raise ValueError(f"power must be >= 0, got {power}")
        self.c = float(c)
        self.power = float(power)

    def g(self, t: float) -> float:
        return self.c * t**self.power

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            h = t_next - t  # < 0
            pred = model(x, t)
            v = pred.velocity.to(x.dtype)
            if t_next == 0.0:  # the last step is deterministic
                x = euler_step(x, t, t_next, pred)
            else:
                g = self.g(t)
                drift = v + (g * g / (2 * t)) * pred.eps.to(x.dtype)
                x = x + h * drift + g * math.sqrt(-h) * model.ctx.randn_like(x)
            x = model.end_step(x, pred)
        return x
