"""The marginal-preserving SDE of a flow, integrated by Euler-Maruyama.

For marginals p_t with probability-flow velocity v, every diffusion coefficient g gives a
reverse-time SDE with the same marginals (Song et al., "Score-Based Generative Modeling
through SDEs", eq. 6 and 13, written for a flow):

    dx = [v(x, t) - g(t)^2 / 2 * score(x, t)] dt + g(t) dW,    t from 1 to 0,

and on the linear path score = -noise / t, so the drift is v + g^2 noise / (2 t).
`frame="linear"` integrates it on the linear path with g(t) = c t^power (default c = 1);
`frame="vp"` converts the path to the VP-SDE interpolant first, with its time warp, and
integrates in its time r with g(r) = c r^power (default c = 3: Kim et al., "Inference-Time
Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing", sec. 4;
see `flowkit.sampler_base.sde_step`). Noise injection fades near the data; the last step
into t = 0 is deterministic.
"""

from __future__ import annotations

from typing import Literal

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_step, sde_scale, sde_step

__all__ = ["FlowSDE"]


@SAMPLERS.register
class FlowSDE(Sampler):
    name = "sde"
    description = "Euler-Maruyama on the flow's marginal-preserving SDE, g = c * t^power (frame=vp: the VP-SDE's time)"

    def __init__(self, *, c: float | None = None, power: float = 2.0, frame: Literal["linear", "vp"] = "linear",
                 grid: str | None = None):
        super().__init__(grid=grid)
        self._c = sde_scale(c, power, frame)
        self.c, self.power, self.frame = c, float(power), frame

    def g(self, t: float) -> float:
        """g in the linear frame (the vp frame's is c r^power at r(t))."""
        return self._c * t**self.power

    def sample(self, model, x, ts):
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            if t_next == 0.0:  # the last step is deterministic
                x = euler_step(x, t, t_next, pred)
            else:
                x = sde_step(x, t, t_next, pred, model.ctx.randn_like(x), c=self._c, power=self.power,
                             frame=self.frame)
            x = model.end_step(x, pred)
        return x
