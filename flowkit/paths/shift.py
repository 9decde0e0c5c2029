"""Time shifts of flow-matching grids (SD3's static shift, FLUX's resolution-dependent shift).

Both are the same map on flowkit time, a scaling of the odds t / (1 - t) by a constant c:

    shift(t) = c t^p / (c t^p + (1 - t)^p)

- static (Esser et al., "Scaling Rectified Flow Transformers", SD3 eq. 23):
  c = shift, p = 1, i.e. t' = shift t / (1 + (shift - 1) t);
- dynamic / exponential (FLUX): c = e^mu, p = sigma, i.e. t' = e^mu / (e^mu + (1/t - 1)^sigma),
  with mu from the image's token count (`flux_mu`).

Written in the product form so that t = 0 and t = 1 map to exactly 0 and 1, with no 1/t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from flowkit.paths.base import as_time

__all__ = ["static_shift", "dynamic_shift", "flux_mu"]


def _odds_shift(t: Tensor, c: float, power: float) -> Tensor:
    t = as_time(t)
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError("time shifts are defined for flowkit times in [0, 1]")
    a = c * t**power
    return a / (a + (1.0 - t) ** power)


def static_shift(t: Tensor | float | Sequence[float], shift: float) -> Tensor:
    """t' = shift t / (1 + (shift - 1) t) (float64); shift > 1 moves steps towards noise."""
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return _odds_shift(t, float(shift), 1.0)


def dynamic_shift(t: Tensor | float | Sequence[float], mu: float, sigma: float = 1.0) -> Tensor:
    """t' = e^mu / (e^mu + (1/t - 1)^sigma) (float64), diffusers' "exponential" time shift."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return _odds_shift(t, math.exp(mu), float(sigma))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's mu: linear in the number of image tokens, base_shift at base_seq_len and
    max_shift at max_seq_len (extrapolated beyond them)."""
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len and base_seq_len must differ")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + m * (image_seq_len - base_seq_len)
