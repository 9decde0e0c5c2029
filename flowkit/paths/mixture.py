"""The mixture path of discrete flow matching (Gat et al., "Discrete Flow Matching", NeurIPS
2024, Sec. 2.2-2.3), with a masked or a uniform source.

Each position independently: x_t = x1 with probability kappa, else a source letter x0
(eq. 5 with one mixture component), where x0 is the mask letter M (index K, so the state
has V = K + 1 letters) or uniform over the K letters. The scheduler is
kappa(t) = (1 - t)^power in flowkit time (t = 1 the source, kappa(0) = 1 the data).

Its generating probability velocity (eq. 13 for this path) is
u_t(y | z) = kappa' / (1 - kappa) (p_{1|t}(y | z) - delta_z(y)), so a step from kappa to
kappa_next jumps with probability lambda = (kappa_next - kappa) / (1 - kappa) to a letter
drawn from the denoiser p_{1|t} (Algorithm 1; see samplers/discrete.py). The state is a
one-hot vertex of the simplex [B, L, V]; the network is fed kappa.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flowkit.errors import InputError
from flowkit.paths.base import PathPoint, as_time
from flowkit.paths.categorical import (
    DiscretePath,
    check_tokens,
    one_hot,
    uniform_from_normal,
)

__all__ = ["MixturePath"]


class MixturePath(DiscretePath):
    name = "mixture"

    def __init__(self, num_categories: int = 4, source: Literal["mask", "uniform"] = "mask", power: float = 1.0):
        super().__init__(num_categories)
        if source not in ("mask", "uniform"):
            raise InputError(f"source must be 'mask' or 'uniform', got {source!r}")
        if not (math.isfinite(power) and power > 0):
            raise InputError(f"power must be a finite number > 0, got {power!r}")
        self.source_kind = source
        self.power = float(power)

    @property
    def mask_index(self) -> int | None:  # type: ignore[override]
        return self.num_categories if self.source_kind == "mask" else None

    @property
    def state_size(self) -> int:
        return self.num_categories + (self.source_kind == "mask")

    def kappa(self, t: Tensor | float) -> Tensor:
        """kappa(t) = (1 - t)^power, float64."""
        return (1.0 - as_time(t)).clamp(0.0, 1.0) ** self.power

    def time_of(self, timestep: Tensor) -> Tensor:
        return 1.0 - as_time(timestep).clamp(0.0, 1.0) ** (1.0 / self.power)

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        k = self.kappa(t)
        return PathPoint(t=t, alpha=k, sigma=1.0 - k, timestep=k)

    def source_tokens(self, noise: Tensor) -> Tensor:
        """Source letters [...] from unit noise [..., V] (its first channel)."""
        if self.source_kind == "mask":
            return torch.full(noise.shape[:-1], self.num_categories, dtype=torch.long, device=noise.device)
        u = uniform_from_normal(noise[..., 0])
        return (u * self.num_categories).long().clamp(max=self.num_categories - 1)

    def source(self, noise: Tensor) -> Tensor:
        return one_hot(self.source_tokens(noise), self.state_size)

    def sample(self, tokens: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t: the clean letter with probability kappa(t) (decided by noise[..., 1]), else the source."""
        tokens = check_tokens(tokens, self.num_categories).to(noise.device)
        k = self.kappa(self._t(t, tokens.shape[0])).to(noise.device).reshape(-1, 1)
        keep = uniform_from_normal(noise[..., 1]) < k
        return one_hot(torch.where(keep, tokens, self.source_tokens(noise)), self.state_size)

    def posterior(self, log_prior: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """mask: the prior at a mask, the letter itself elsewhere; uniform:
        q_j (kappa delta_{j, x} + (1 - kappa) / K)."""
        K = self.num_categories
        q = torch.softmax(log_prior.double(), dim=-1).expand(x.shape[:-1] + (K,))
        letter = x.argmax(dim=-1)
        if self.source_kind == "mask":
            seen = one_hot(letter.clamp(max=K - 1), K, torch.float64)
            return torch.where((letter == K).unsqueeze(-1), q, seen)
        k = self.kappa(self._t(t, x.shape[0])).to(x.device).reshape(-1, 1, 1)
        w = q * (k * one_hot(letter, K, torch.float64) + (1.0 - k) / K)
        return w / w.sum(dim=-1, keepdim=True)

    def jump_probability(self, t: float, t_next: float) -> float:
        """lambda = (kappa(t_next) - kappa(t)) / (1 - kappa(t)): the chance a position jumps."""
        k, k_next = float(self.kappa(t)), float(self.kappa(t_next))
        return 1.0 if k >= 1.0 else min(max((k_next - k) / (1.0 - k), 0.0), 1.0)

    def __repr__(self) -> str:
        return f"MixturePath(num_categories={self.num_categories}, source={self.source_kind!r}, power={self.power:g})"
