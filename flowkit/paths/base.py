"""Probability paths: how clean data and noise mix over flowkit time.

flowkit time t runs over [0, 1] with t = 1 pure noise. Every Gaussian path mixes
`x_t = alpha * x0 + sigma * noise` in its own *native* parametrisation; all of them are
mapped onto flowkit time by signal-to-noise matching with the linear path:

    alpha / sigma = (1 - t) / t        (so t = sigma / (alpha + sigma))

The sampling loop integrates in the *flow frame*, the state of the linear path,
`x_flow = x_native / (alpha + sigma)`, whatever the model's path: an Euler step there is
exactly a DDIM step (both are exact when x0 and noise predictions stay constant), so one
update rule serves flow, VP and DDPM models. A path converts between the frames and gives
the model's native timestep.

Discrete paths (Dirichlet, mixture) live on the simplex and map their native parameter
onto flowkit time; for them the frame conversion is the identity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["Path", "GaussianPath", "PathPoint", "as_time"]


def as_time(t: Tensor | float, batch: int | None = None, device: torch.device | None = None) -> Tensor:
    """flowkit time as a float64 tensor of shape [batch] (or the given shape)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=device)
    if batch is not None and t.ndim == 0:
        t = t.expand(batch)
    return t


@dataclass(frozen=True)
class PathPoint:
    """A path evaluated at flowkit times t [B] (float64 tensors of shape [B]).

    alpha, sigma: the native mixing coefficients; timestep: what the network is given.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    timestep: Tensor

    @property
    def scale(self) -> Tensor:
        """x_native = scale * x_flow."""
        return self.alpha + self.sigma


class Path(ABC):
    """Base of every path."""

    kind: ClassVar[str]  # "gaussian" or "discrete"
    name: ClassVar[str]

    @abstractmethod
    def at(self, t: Tensor) -> PathPoint:
        """The path at flowkit times t [B]."""

    def to_native(self, x: Tensor, point: PathPoint) -> Tensor:
        return x

    def from_native(self, x: Tensor, point: PathPoint) -> Tensor:
        return x

    @property
    def t_max(self) -> float:
        """The largest flowkit time the model was trained on (where sampling starts)."""
        return 1.0

    def uniform_grid(self, steps: int) -> Tensor:
        """`steps + 1` flowkit times from t_max down to 0, uniform in the native time."""
        return torch.linspace(self.t_max, 0.0, steps + 1, dtype=torch.float64)


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


class GaussianPath(Path):
    """x_t = alpha * x0 + sigma * noise, with native coefficients alpha(t), sigma(t)."""

    kind = "gaussian"

    def to_native(self, x: Tensor, point: PathPoint) -> Tensor:
        return x * _bcast(point.scale, x).to(x.dtype)

    def from_native(self, x: Tensor, point: PathPoint) -> Tensor:
        return x / _bcast(point.scale, x).to(x.dtype)

    def flow_time(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """flowkit time of native coefficients: sigma / (alpha + sigma)."""
        return sigma / (alpha + sigma)

    def initial_scale(self) -> float:
        """x_flow at t_max is `initial_scale * noise` (signal ignored, as diffusers starts)."""
        return self.t_max
