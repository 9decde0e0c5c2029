"""Conversions between prediction types, and between paths.

Prediction types, for a native state x = alpha * x0 + sigma * noise:
- "epsilon":  the noise
- "x0":       the clean sample (diffusers' "sample")
- "v":        v-prediction, v = alpha * noise - sigma * x0 (Salimans & Ho)
- "velocity": flow velocity of the linear path, noise - x0 (diffusers' flow matching)

Every conversion is affine in the prediction for a fixed (x, alpha, sigma); they are
computed in float64 (the divisions by alpha or sigma amplify error near the path's ends)
and returned in the dtype of the prediction.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PREDICTION_TYPES", "to_x0_eps", "from_x0_eps", "convert_prediction", "convert_state"]

PREDICTION_TYPES = ("epsilon", "x0", "v", "velocity")
_ALIASES = {"sample": "x0", "v_prediction": "v", "flow": "velocity", "eps": "epsilon"}


def _b(c: Tensor, x: Tensor) -> Tensor:
    c = torch.as_tensor(c, dtype=torch.float64, device=x.device)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def canonical(kind: str) -> str:
    kind = _ALIASES.get(kind, kind)
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; use one of {PREDICTION_TYPES}")
    return kind


def to_x0_eps(kind: str, value: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, noise) implied by a prediction `value` of type `kind` at native state x."""
    kind = canonical(kind)
    v, xx = value.double(), x.double()
    a, s = _b(alpha, xx), _b(sigma, xx)
    if kind == "epsilon":
        eps = v
        x0 = (xx - s * eps) / a
    elif kind == "x0":
        x0 = v
        eps = (xx - a * x0) / s
    elif kind == "v":  # x = a x0 + s eps, v = a eps - s x0
        n = a * a + s * s
        x0 = (a * xx - s * v) / n
        eps = (s * xx + a * v) / n
    else:  # velocity = eps - x0
        x0 = (xx - s * v) / (a + s)
        eps = x0 + v
    return x0.to(value.dtype), eps.to(value.dtype)


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The prediction of type `kind` for given (x0, noise)."""
    kind = canonical(kind)
    if kind == "epsilon":
        return eps
    if kind == "x0":
        return x0
    a, s = _b(alpha, x0).to(x0.dtype), _b(sigma, x0).to(x0.dtype)
    if kind == "v":
        return a * eps - s * x0
    return eps - x0


def convert_prediction(value: Tensor, src: str, dst: str, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Convert a prediction from type `src` to type `dst` at native state x."""
    if canonical(src) == canonical(dst):
        return value
    x0, eps = to_x0_eps(src, value, x, alpha, sigma)
    return from_x0_eps(dst, x0, eps, alpha, sigma)


def convert_state(x: Tensor, t: Tensor, src, dst) -> tuple[Tensor, Tensor]:
    """Move a native state of path `src` at flowkit time t to path `dst` (SNR matching).

    Both paths share flowkit time (it is defined by the signal-to-noise ratio), so only
    the frame scale changes: x_dst = x_src * (alpha_d + sigma_d) / (alpha_s + sigma_s).
    Returns (x_dst, dst native timestep).
    """
    ps, pd = src.at(t), dst.at(t)
    return (x.double() * _b(pd.scale / ps.scale, x)).to(x.dtype), pd.timestep
