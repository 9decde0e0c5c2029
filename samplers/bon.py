"""Best-of-N: N full runs per image, the one the reward scores highest kept (the baseline of
Kim et al., "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover
Budget Forcing", sec. 5; the official code's `filtering_method: bon`).

Particle 0 of an image starts from the image's own noise, the others from noise drawn from
its generator; every particle runs the whole grid (`base="sde"`: the flow's SDE, frame and
coefficient as `sde`; `base="euler"`: the ODE, so particles differ by their start only). The
reward scores each particle's final image once. NFE per image: n x steps x the cost of one
evaluation; memory: n rows per image.
"""

from __future__ import annotations

from typing import Any, Literal

from flowkit.errors import InputError
from flowkit.registry import SAMPLERS
from flowkit.sampler_base import euler_step
from flowkit.samplers._particles import ParticleSampler, check_count, keep_best, spawn

__all__ = ["BestOfN"]


@SAMPLERS.register
class BestOfN(ParticleSampler):
    name = "bon"
    description = "best-of-N: n full runs (SDE or ODE) per image, the reward's best final image kept"

    def __init__(self, *, n: int = 4, reward: Any = "count", base: Literal["sde", "euler"] = "sde",
                 frame: Literal["linear", "vp"] = "vp", c: float | None = None, power: float = 2.0,
                 grid: str | None = None):
        super().__init__(reward=reward, frame=frame, c=c, power=power, grid=grid)
        if base not in ("sde", "euler"):
            raise InputError(f"base must be 'sde' or 'euler', got {base!r}")
        self.n, self.base = check_count("n", n), base

    def evaluations(self, steps: int) -> int:
        return self.n * steps

    def sample(self, model, x, ts):
        ctx = model.ctx
        x = spawn(self, ctx, x, ts, self.n)
        for i in range(len(ts) - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            if self.base == "euler" or t_next == 0.0:
                x_next = euler_step(x, t, t_next, pred)
            else:
                x_next = self.move(x, t, t_next, pred, ctx.randn_like(x))
            x = model.end_step(x_next, pred)
        return keep_best(ctx, x, self.score(ctx, x), self.n)
