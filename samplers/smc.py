"""Sequential Monte Carlo with a reward's potential (the SMC baseline of Kim et al.,
"Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover Budget
Forcing", sec. 5; the official rbf/corrector/rgrp_sampler.py, `filtering_method: smc`).

n particles per image move by the flow's SDE. At each stochastic step the reward of every
particle's clean-image prediction r_i multiplies its weight by exp((r_i - r_{i-1}) / lam)
(r_{-1} = 0); when an image's effective sample size (sum w)^2 / sum w^2 falls below
`ess` x n, its particles are resampled multinomially from their weights (drawn from the
image's generator) and the weights reset. The image's final particle of the highest reward
is kept. lam=None is lam = infinity: uniform weights, no resampling, which is best-of-N on
the same particles. NFE per image: n x steps x the cost of one evaluation; memory: n rows
per image; one reward call per stochastic step and one at the end.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from flowkit.errors import InputError
from flowkit.registry import SAMPLERS
from flowkit.samplers._particles import ParticleSampler, check_count, keep_best, spawn

__all__ = ["SMC"]


@SAMPLERS.register
class SMC(ParticleSampler):
    name = "smc"
    description = "sequential Monte Carlo: n SDE particles per image, weights exp(delta reward / lam), ESS resampling"

    def __init__(self, *, n: int = 4, reward: Any = "count", lam: float | None = 1.0, ess: float = 0.5,
                 frame: Literal["linear", "vp"] = "vp", c: float | None = None, power: float = 2.0,
                 grid: str | None = None):
        super().__init__(reward=reward, frame=frame, c=c, power=power, grid=grid)
        if lam is not None and math.isinf(lam) and lam > 0:
            lam = None
        if lam is not None and not lam > 0:
            raise InputError(f"lam must be > 0 (None: infinity, no weighting), got {lam}")
        if not 0 <= ess <= 1:
            raise InputError(f"ess is a fraction of n in [0, 1], got {ess}")
        self.n, self.lam, self.ess = check_count("n", n), lam, float(ess)

    def evaluations(self, steps: int) -> int:
        return self.n * steps

    def resample(self, ctx, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, rows resampled): every image whose ESS fell below ess x n draws its n
        particles multinomially from their weights (from the image's generator); the others keep theirs."""
        n = self.n
        w = torch.softmax(log_w.view(-1, n), dim=1)
        low = 1.0 / (w * w).sum(dim=1) < self.ess * n
        index = torch.arange(log_w.numel())
        for b in low.nonzero().flatten().tolist():
            drawn = torch.multinomial(w[b].float(), n, replacement=True, generator=ctx.generators[b * n])
            index[b * n:(b + 1) * n] = b * n + drawn
        return index, low.repeat_interleave(n)

    def sample(self, model, x, ts):
        ctx = model.ctx
        x = spawn(self, ctx, x, ts, self.n)
        log_w = torch.zeros(x.shape[0], dtype=torch.float64)
        r_prev = torch.zeros(x.shape[0], dtype=torch.float64)
        n_steps = len(ts) - 1
        for i in range(n_steps):
            t, t_next = float(ts[i]), float(ts[i + 1])
            pred = model(x, t)
            if self.lam is not None and i < n_steps - 1 and t_next > 0:
                # Weight by the potential's increment; resample the images whose ESS is low (the
                # batch is reindexed every such step, so no image depends on its partners' draws).
                r = self.score(ctx, pred.x0)
                log_w = log_w + (r - r_prev) / self.lam
                index, resampled = self.resample(ctx, log_w)
                ctx.reindex(index)
                x, pred = x[index.to(x.device)], model.select(pred, index)
                log_w = torch.where(resampled, torch.zeros_like(log_w), log_w[index])
                r_prev = r[index]
            noise = ctx.randn_like(x) if t_next > 0 else None
            x = model.end_step(self.move(x, t, t_next, pred, noise), pred)
        return keep_best(ctx, x, self.score(ctx, x), self.n)
