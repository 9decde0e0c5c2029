"""Linear flow matching on the simplex: the baseline of Stark et al. (Sec. 3.1, "linear FM").

x_t = (1 - t) e_i + t z with z ~ Dir(1, ..., 1) (flowkit time, t = 1 the flat Dirichlet):
the conditional density is flat on the shrunk simplex {x : x_i >= 1 - t}, so the posterior
is p(e_j | x) proportional to q_j 1{x_j >= 1 - t} and its support shrinks to one vertex
well before t = 0 (Stark et al., Prop. 1: the reason linear FM degrades as K grows). The
velocity in flowkit time is dx/dt = (x - E[e | x]) / t. The network is fed 1 - t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowkit.paths.base import PathPoint, as_time
from flowkit.paths.categorical import (
    DiscretePath,
    check_tokens,
    dirichlet_from_normal,
    one_hot,
)

__all__ = ["SimplexLinearPath"]


class SimplexLinearPath(DiscretePath):
    name = "simplex-linear"

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        return PathPoint(t=t, alpha=1.0 - t, sigma=t, timestep=1.0 - t)

    def time_of(self, timestep: Tensor) -> Tensor:
        return 1.0 - as_time(timestep)

    def source(self, noise: Tensor) -> Tensor:
        return dirichlet_from_normal(noise).float()

    def sample(self, tokens: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        tokens = check_tokens(tokens, self.num_categories)
        tt = self._t(t, tokens.shape[0]).to(noise.device).reshape(-1, 1, 1)
        x = (1.0 - tt) * one_hot(tokens, self.num_categories, torch.float64).to(noise.device) \
            + tt * dirichlet_from_normal(noise)
        return x.float()

    def velocity(self, probs: Tensor, x: Tensor, t: float) -> Tensor:
        """dx/dt = (x - p) / t (float64), for t > 0."""
        return (x.double() - probs.double()) / t

    def posterior(self, log_prior: Tensor, x: Tensor, t: Tensor, tol: float = 1e-9) -> Tensor:
        """q_j 1{x_j >= 1 - t}; a state no region holds (an Euler step can leave them all)
        goes to the nearest region."""
        tt = self._t(t, x.shape[0]).to(x.device).reshape(-1, 1, 1)
        margin = x.double() - (1.0 - tt)  # >= 0 inside region j
        inside = margin >= -tol
        nearest = one_hot(margin.argmax(dim=-1), x.shape[-1], torch.bool)
        inside = torch.where(inside.any(dim=-1, keepdim=True), inside, nearest)
        logits = log_prior.double().expand_as(margin).masked_fill(~inside, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def __repr__(self) -> str:
        return f"SimplexLinearPath(num_categories={self.num_categories})"
