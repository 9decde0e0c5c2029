"""The toy simplex task of Dirichlet flow matching (Stark et al., ICML 2024, Sec. 5.1).

Sequences of L = 4 positions over K letters; the positions are independent and position l
follows the target q_l = softmax(u_l) with u_l ~ U[0, 1]^K (drawn once, seeded by
(seed, K)). A sampler is scored by the KL divergence of the empirical distribution of many
samples from the target, per position and averaged: KL(p_hat || q) = sum_j p_hat_j
log(p_hat_j / q_j), where a letter never sampled contributes 0 (0 log 0 = 0), so the score
stays finite for any K and sample size (the paper's K goes up to 512; its expected value
for an exact sampler is about (K - 1) / (2 n)).

`exact_denoiser(path)` is the analytic p(x1 | x_t) of this law on any discrete path, so a
sampler can be checked with no network at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from flowkit.conditioning import Conditioning
from flowkit.denoiser import Denoiser
from flowkit.errors import InputError
from flowkit.paths.categorical import DiscretePath

__all__ = ["ToyTask", "ExactDenoiser", "kl_per_position", "LENGTH"]

LENGTH = 4


def kl_per_position(tokens: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """KL(empirical || target) [L] of token samples [n, L] against targets probs [L, K]."""
    from scipy.special import rel_entr

    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != probs.shape[0]:
        raise InputError(f"expected samples [n, {probs.shape[0]}], got shape {tokens.shape}")
    K = probs.shape[1]
    counts = np.stack([np.bincount(tokens[:, l], minlength=K) for l in range(tokens.shape[1])]).astype(np.float64)
    emp = counts / counts.sum(axis=1, keepdims=True)
    return rel_entr(emp, probs).sum(axis=1)


@dataclass
class ToyTask:
    """The toy task for K letters (targets seeded by (seed, K))."""

    num_categories: int
    length: int = LENGTH
    seed: int = 0
    probs: np.ndarray = field(init=False, repr=False)  # [L, K] float64

    def __post_init__(self) -> None:
        if not isinstance(self.num_categories, int) or self.num_categories < 2:
            raise InputError(f"the toy task needs K >= 2 letters, got {self.num_categories!r}")
        u = np.random.default_rng([self.seed, self.num_categories]).random((self.length, self.num_categories))
        e = np.exp(u - u.max(axis=1, keepdims=True))
        self.probs = e / e.sum(axis=1, keepdims=True)

    @property
    def log_probs(self) -> Tensor:
        return torch.from_numpy(np.log(self.probs))

    def sample(self, n: int, rng: np.random.Generator) -> Tensor:
        """n sequences [n, L] (long) drawn from the target."""
        cdf = np.cumsum(self.probs, axis=1)
        u = rng.random((n, self.length, 1))
        tokens = (u > cdf[None]).sum(axis=2).clip(max=self.num_categories - 1)
        return torch.from_numpy(tokens).long()

    def kl(self, tokens: Tensor | np.ndarray) -> float:
        """Mean over positions of KL(empirical || target)."""
        t = tokens.cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
        return float(kl_per_position(t, self.probs).mean())

    def exact_denoiser(self, path: DiscretePath) -> "ExactDenoiser":
        return ExactDenoiser(path, self.log_probs)


class ExactDenoiser(Denoiser):
    """p(x1 | x_t) of a factorised law with log-probabilities [L, K], on a discrete path."""

    def __init__(self, path: DiscretePath, log_prior: Tensor):
        super().__init__(path, "probs")
        self.log_prior = log_prior.double()

    def forward(self, x_native: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        t = self.path.time_of(timestep.double())
        return self.path.posterior(self.log_prior.to(x_native.device), x_native, t).float()
