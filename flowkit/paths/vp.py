"""The variance-preserving cosine path (Nichol & Dhariwal, "Improved DDPM", continuous form).

In native time s in [0, 1]: alpha = cos(pi/2 * s), sigma = sin(pi/2 * s), so
alpha^2 + sigma^2 = 1 and s = 1 is pure noise. SNR matching with the linear path,
alpha / sigma = (1 - t) / t, gives

    s = (2 / pi) * atan2(t, 1 - t),        t = sin(pi/2 s) / (sin(pi/2 s) + cos(pi/2 s)).

The coefficients are computed from t as (1 - t, t) / hypot(1 - t, t): equal to the cos/sin
form, but SNR-matched to rounding and exact at both ends (alpha(1) = 0, not cos(pi/2)).
The network sees timestep = s * num_train_timesteps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowkit.paths.base import GaussianPath, PathPoint, as_time

__all__ = ["VPCosinePath", "VPSDEPath", "vp_coefficients"]


def vp_coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) of the variance-preserving path SNR-matched to flowkit time t.

    alpha = (1 - t) / n, sigma = t / n with n = hypot(1 - t, t) >= 1/sqrt(2), so there is no
    division by zero anywhere on [0, 1]; t = 0 gives (1, 0) and t = 1 gives (0, 1) exactly.
    """
    t = as_time(t)
    n = torch.hypot(1.0 - t, t)
    return (1.0 - t) / n, t / n


class VPCosinePath(GaussianPath):
    """alpha = cos(pi/2 s), sigma = sin(pi/2 s) in native time s in [0, 1]."""

    name = "vp_cosine"

    def __init__(self, num_train_timesteps: int = 1000):
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps

    def native_time(self, t: Tensor) -> Tensor:
        """s = (2/pi) atan2(t, 1 - t) in [0, 1] for flowkit times t (float64)."""
        t = as_time(t).clamp(0.0, 1.0)
        return torch.atan2(t, 1.0 - t) * (2.0 / math.pi)

    def time_from_native(self, s: Tensor) -> Tensor:
        """flowkit time of native times s: sin / (sin + cos) of pi/2 s, clamped to [0, 1]."""
        s = as_time(s).clamp(0.0, 1.0)
        a, b = torch.cos(s * (math.pi / 2)), torch.sin(s * (math.pi / 2))
        # cos(pi/2) is 6e-17, not 0: clamp so s = 1 maps to t = 1 exactly, s = 0 to t = 0.
        t = b / (a + b)
        return torch.where(s >= 1.0, torch.ones_like(t), t).clamp(0.0, 1.0)

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        alpha, sigma = vp_coefficients(t)
        return PathPoint(t=t, alpha=alpha, sigma=sigma, timestep=self.native_time(t) * self.num_train_timesteps)

    def uniform_grid(self, steps: int) -> Tensor:
        """`steps + 1` flowkit times from 1 down to 0, uniform in s."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return self.time_from_native(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))

    def __repr__(self) -> str:
        return f"VPCosinePath(num_train_timesteps={self.num_train_timesteps})"


class VPSDEPath(GaussianPath):
    """The variance-preserving SDE's path (Song et al., "Score-Based Generative Modeling through
    SDEs", eq. 29; the official RBF code's `VPScheduler`, rbf/prior/denoise_schedulers/
    scheduler.py), a frame for stochastic sampling of a flow (Kim et al., "Inference-Time
    Scaling for Flow Models via Stochastic Generation and Rollover Budget Forcing", sec. 4.2).

    In native time r (r = 1 noise): T(r) = beta_min r + (beta_max - beta_min) r^2 / 2,
    alpha = exp(-T / 2), sigma = sqrt(1 - exp(-T)). SNR matching with the linear path gives the
    time warp t(r) = sigma / (alpha + sigma) and its inverse r(t) (`native_time`); at r = 1,
    t = 0.99347 (beta_max = 20), and flowkit times above that lie beyond r = 1.
    """

    name = "vp_sde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def integral(self, r: Tensor) -> Tensor:
        """T(r) = int_0^r beta(u) du."""
        r = as_time(r)
        return self.beta_min * r + 0.5 * (self.beta_max - self.beta_min) * r * r

    def coefficients(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, d alpha / dr, d sigma / dr) at native times r (float64)."""
        r = as_time(r)
        T = self.integral(r)
        dT = self.beta_min + (self.beta_max - self.beta_min) * r  # beta(r)
        alpha = torch.exp(-0.5 * T)
        sigma = torch.sqrt(-torch.expm1(-T))
        return alpha, sigma, -0.5 * dT * alpha, 0.5 * dT * torch.exp(-T) / sigma

    def native_time(self, t: Tensor) -> Tensor:
        """r(t): T = log(1 + 1 / snr^2) with snr = (1 - t) / t, solved for r (inf at t = 1)."""
        t = as_time(t)
        T = torch.log1p((t / (1.0 - t)) ** 2)
        b, d = self.beta_min, self.beta_max - self.beta_min
        return (torch.sqrt(b * b + 2.0 * d * T) - b) / d

    def time_from_native(self, r: Tensor) -> Tensor:
        """t(r) = sigma / (alpha + sigma), SNR-matched flowkit time."""
        alpha, sigma, _, _ = self.coefficients(r)
        return sigma / (alpha + sigma)

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        alpha, sigma = vp_coefficients(t)
        return PathPoint(t=t, alpha=alpha, sigma=sigma, timestep=self.native_time(t))

    def __repr__(self) -> str:
        return f"VPSDEPath(beta_min={self.beta_min}, beta_max={self.beta_max})"
