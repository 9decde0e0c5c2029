"""Discrete paths: the base of paths on the probability simplex, and their shared helpers.

A discrete path moves a sequence of L tokens over a vocabulary of K letters. Its state is
a point of the simplex per position, `x` [B, L, V] (V = K, or K + 1 where a path adds a
mask letter): a distribution for Dirichlet and linear flow matching, a one-hot vertex for
the mixture (jump) path. Predictions are categorical probabilities of the clean token,
[B, L, K] (`Prediction` kind "probs"). Like every path it maps its native parameter onto
flowkit time t in [0, 1], with t = 1 the source (noise) and t = 0 the data.

Randomness stays the core's: the loop hands out unit Gaussian noise, one generator per
sample, and the helpers here turn it into uniforms (`uniform_from_normal`), flat Dirichlet
draws (`dirichlet_from_normal`) and categorical draws (`categorical_from_normal`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from flowkit.errors import InputError, UnsupportedError
from flowkit.paths.base import Path, PathPoint, as_time

__all__ = [
    "DiscretePath",
    "uniform_from_normal",
    "dirichlet_from_normal",
    "categorical_from_normal",
    "one_hot",
    "project_simplex",
    "check_tokens",
]


def uniform_from_normal(z: Tensor) -> Tensor:
    """U(0, 1) draws from unit Gaussian draws (the normal CDF), float64, strictly inside (0, 1)."""
    u = torch.special.ndtr(z.double())
    tiny = torch.finfo(torch.float64).tiny
    return u.clamp(tiny, 1.0 - torch.finfo(torch.float64).eps / 2)


def dirichlet_from_normal(z: Tensor) -> Tensor:
    """Flat Dirichlet Dir(1, ..., 1) draws over the last dimension from unit Gaussian draws.

    E_k = -log(1 - Phi(z_k)) is Exp(1) (computed as -log Phi(-z_k), exact in both tails), and
    E / sum(E) is uniform on the simplex. float64; a coordinate may be exactly 0 (a face)
    only for z below -38.
    """
    e = -torch.special.log_ndtr(-z.double())
    return e / e.sum(dim=-1, keepdim=True)


def categorical_from_normal(probs: Tensor, z: Tensor) -> Tensor:
    """Token indices [...] drawn from `probs` [..., K] by inverting the CDF at Phi(z) [...]."""
    p = probs.double().clamp_min(0.0)
    cdf = p.cumsum(dim=-1)
    u = uniform_from_normal(z) * cdf[..., -1]
    idx = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def one_hot(tokens: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[...] long -> [..., size] one-hot."""
    return torch.nn.functional.one_hot(tokens.long(), size).to(dtype)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row v [..., K] onto the probability simplex (identity on it).

    Wang & Carreira-Perpinan, "Projection onto the probability simplex" (2013), Algorithm 1:
    sort, find the largest rho with u_rho + (1 - sum_{j<=rho} u_j) / rho > 0, shift and clip.
    """
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / k) > 0).to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0.0)


def check_tokens(tokens: Tensor, num_categories: int) -> Tensor:
    """`tokens` as a long tensor [B, L] of letters in [0, K), else InputError."""
    if tokens.ndim != 2:
        raise InputError(f"token sequences must be a [batch, length] tensor, got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise InputError("token sequences must be integer letter indices")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= num_categories):
        raise InputError(f"token indices must lie in [0, {num_categories}), got [{int(tokens.min())}, "
                         f"{int(tokens.max())}]")
    return tokens.long()


class DiscretePath(Path):
    """Base of the paths on the simplex; state [B, L, V], predictions [B, L, K] probabilities.

    Subclasses give `at` (flowkit time -> native parameter, in `PathPoint.alpha`, and the
    network's `timestep`), `source` (a source draw from unit noise), `sample` (the
    conditional path x_t given clean tokens) and `posterior` (the exact denoiser for a
    factorised prior, used by the toy task and the tests).
    """

    kind = "discrete"
    # the letter a mask path adds (index K), or None
    mask_index: ClassVar[int | None] = None

    def __init__(self, num_categories: int):
        if not isinstance(num_categories, int) or num_categories < 2:
            raise InputError(f"a discrete path needs at least 2 categories, got {num_categories!r}")
        self.num_categories = num_categories

    @property
    def state_size(self) -> int:
        """V: the size of the state's last dimension."""
        return self.num_categories

    @abstractmethod
    def at(self, t: Tensor) -> PathPoint: ...

    @abstractmethod
    def time_of(self, timestep: Tensor) -> Tensor:
        """flowkit time of the network's timesteps (the inverse of `at(t).timestep`)."""

    @abstractmethod
    def source(self, noise: Tensor) -> Tensor:
        """A draw of the source x [..., V] (float32) from unit Gaussian `noise` of the same shape."""

    @abstractmethod
    def sample(self, tokens: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t [B, L, V] of the conditional path given clean tokens [B, L] at flowkit times t [B],
        from unit Gaussian `noise` [B, L, V]."""

    @abstractmethod
    def posterior(self, log_prior: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """p(x1 = e_j | x_t = x) [B, L, K] for independent positions with prior
        softmax(log_prior) [L, K] (or [B, L, K]); the exact denoiser of a factorised law."""

    def classifier_tilt(self, probs: Tensor, x: Tensor, point: PathPoint, grad: Tensor) -> Tensor:
        """The denoiser's probabilities tilted by a classifier's grad_x log p(y | x); paths
        without a score refuse."""
        raise UnsupportedError(f"classifier guidance needs a path with a score; the {self.name} path has none")

    def _t(self, t: Tensor | float, batch: int) -> Tensor:
        return as_time(t, batch).reshape(batch)
