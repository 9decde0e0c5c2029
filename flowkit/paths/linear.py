"""The linear (rectified flow) path, the convention of diffusers' flow-matching models.

x_t = (1 - t) x0 + t noise with t = 1 pure noise (SD3, FLUX, the shapes model). Native
time is flowkit time; the network sees timestep = num_train_timesteps * t.
"""

from __future__ import annotations

from torch import Tensor

from flowkit.paths.base import GaussianPath, PathPoint, as_time

__all__ = ["LinearPath"]


class LinearPath(GaussianPath):
    name = "linear"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        return PathPoint(t=t, alpha=1.0 - t, sigma=t, timestep=t * self.num_train_timesteps)

    def __repr__(self) -> str:
        return f"LinearPath(num_train_timesteps={self.num_train_timesteps})"
