"""BOSS: Euler steps on Bellman optimal step sizes (Nguyen et al., "Bellman Optimal Step-size
Straightening of Flow-Matching Models", ICLR 2024, Algorithm 1).

The grid of K steps is the cheapest K-step path through a fine grid under a cost matrix of
one-step Euler errors (see flowkit.boss). The table comes from `table` (a file written by
`flowkit tune boss`, or a shipped name), else from the model's own stored tables (found by
the network's fingerprint, the latent shape and the guidance stack it was tuned under), else,
with `auto`, it is tuned on the fly once (`samples` trajectories of `k_max` fine steps under
the run's own guidance, on a fixed prompt set and fixed seeds, so no image depends on its
batch) and cached under $FLOWKIT_CACHE/boss.
The update rule is Euler's (samplers/euler.py); any other ODE sampler walks the same grid
with `grid="boss:TABLE"`.
"""

from __future__ import annotations

import logging
from typing import Literal

from flowkit.errors import InputError
from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, euler_walk

__all__ = ["Boss"]

log = logging.getLogger(__name__)


@SAMPLERS.register
class Boss(Sampler):
    name = "boss"
    description = "Euler on Bellman-optimal (BOSS) step sizes, tuned per model (flowkit tune boss)"

    def __init__(self, *, table: str | None = None, cost: Literal["local", "endpoint"] = "local",
                 auto: bool = True, k_max: int = 24, samples: int = 8):
        if not isinstance(k_max, int) or k_max < 2:
            raise InputError(f"k_max must be an integer >= 2, got {k_max!r}")
        if not isinstance(samples, int) or samples < 1:
            raise InputError(f"samples must be an integer >= 1, got {samples!r}")
        super().__init__(grid="uniform")  # the nominal grid; the walked one is BOSS's (model.walk)
        self.table, self.cost, self.auto, self.k_max, self.samples = table, cost, auto, k_max, samples

    def boss_table(self, ctx, shape: tuple[int, ...], steps: int):
        """The table this run uses (see the module docstring); tunes and caches it if allowed."""
        from flowkit.boss import (
            auto_problem,
            find_table,
            model_fingerprint,
            resolve_table,
            tune_table,
        )

        fp = model_fingerprint(ctx.denoiser)
        if self.table is not None:
            table = resolve_table(self.table)
            if fp is not None and table.fingerprint != fp:
                raise InputError(f"BOSS table {self.table!r} was tuned for another model (fingerprint "
                                 f"{table.fingerprint}, this one is {fp}): tune it with `flowkit tune boss`, or "
                                 f"use it anyway as grid='boss:{self.table}'")
            return table
        guidance = ctx.stack.describe()
        found = find_table(fp, shape, self.cost, min_steps=steps, guidance=guidance) if fp is not None else None
        if found is not None:
            return found
        if not self.auto:
            raise InputError(f"no BOSS table for this model ({fp}) at latent shape {list(shape)}: run "
                             f"`flowkit tune boss --model MODEL`, give table=FILE, or allow auto=true")
        k_max = max(self.k_max, steps)
        log.info("boss: tuning step sizes for this model on the fly (%d samples x %d steps)", self.samples, k_max)
        table = tune_table(auto_problem(ctx, self.samples), shape, k_max=k_max, cost=self.cost,
                           key="auto", prompts=[], guidance=guidance, model="auto")
        if fp is not None:
            table.save_to_cache()
        ctx.denoiser.reset_counters()  # the run's forward seconds exclude the tuning
        return table

    def sample(self, model, x, ts):
        steps = len(ts) - 1
        table = self.boss_table(model.ctx, tuple(x.shape[1:]), steps)
        ts = table.times(steps)
        model.walk(ts)
        return euler_walk(model, x, ts)[0]
