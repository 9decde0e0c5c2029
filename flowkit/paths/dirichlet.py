"""The Dirichlet probability path (Stark et al., "Dirichlet Flow Matching with Applications
to DNA Sequence Design", ICML 2024, Sec. 3.2-3.3).

Conditional path (eq. 12): p_alpha(x | x1 = e_i) = Dir(x; 1 + (alpha - 1) e_i), from the flat
Dirichlet at alpha = 1 towards the vertex e_i as alpha grows. Its conditional vector field
(eq. 14) is

    u_alpha(x | e_i) = C(x_i, alpha) (e_i - x),
    C(x_i, alpha) = -d/dalpha I_{x_i}(alpha, K - 1) * B(alpha, K - 1) / ((1 - x_i)^(K-1) x_i^(alpha-1)),

with I the regularised incomplete beta function (the CDF of x_i ~ Beta(alpha, K - 1)); the
flow moves x_i along its own quantile while the other coordinates shrink in proportion.
The marginal field is v(x) = sum_j p(e_j | x) C(x_j, alpha) (e_j - x): linear in the
denoiser's probabilities, so the network is trained with cross-entropy (eq. 15).

Numerics. torch has no incomplete beta, so C is tabulated in float64 with scipy, as the
paper's code does, but row by row at the exact alphas asked for (the sampler asks for a
handful) on a fixed grid of x that is dense near both faces, and interpolated linearly in
x. The alpha-derivative is a central difference, taken on I_x(alpha, b) below the median of
Beta(alpha, b) and on the complement I_{1-x}(b, alpha) above it (the small side each time,
so no cancellation), and
divided by the Beta density in log space. The faces are the exact limits:
C(0, alpha) = 0 and C(1, alpha) = (psi(alpha + K - 1) - psi(alpha)) / (K - 1); where the
density underflows near x = 0 the asymptote C ~ -x (ln x - 1/alpha - psi(alpha) + psi(alpha + b)) / alpha
is used (near x = 1, where (1 - x)^(K-1) underflows for large K, the limit C(1)). No NaN
anywhere on the closed simplex.

flowkit time: alpha(t) = 1 + (alpha_max - 1)(1 - t): t = 1 is the flat Dirichlet (source),
t = 0 is alpha_max, where the paper stops integrating (alpha -> infinity is the data).
The network is fed alpha.

Guidance (Sec. 3.4). The conditional scores are grad_x log Dir(x; 1 + (alpha-1) e_j) =
(alpha - 1) e_j / x_j (on the simplex's tangent space), so the marginal score is
s = (alpha - 1) (p / x - mean(p / x)) and it maps back to probabilities in closed form
(eq. 19-20 solved): p = x * (1 + (s - <x, s>) / (alpha - 1)). Classifier guidance adds
gamma * grad_x log p(y | x) to the score, which in probability space is
p + gamma / (alpha - 1) * x * (g - <x, g>): no division by x, finite on the faces. At
alpha = 1 this is 0/0 with the finite limit gamma * x * (h - <x, h>), h = dg/dalpha at 1 (on
an exact two-class world it gives the class's prior exactly): the guidance takes it from the
classifier at two alphas.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from flowkit.errors import InputError
from flowkit.paths.base import PathPoint, as_time
from flowkit.paths.categorical import (
    DiscretePath,
    check_tokens,
    dirichlet_from_normal,
    one_hot,
)

__all__ = ["DirichletPath", "c_factor_row", "X_GRID"]


def _x_grid() -> np.ndarray:
    """The x grid of the C table: uniform plus geometric refinement near both faces, 0 and 1 included."""
    near = np.geomspace(1e-12, 5e-2, 400)
    grid = np.concatenate([[0.0], near, np.linspace(0.0, 1.0, 2049), 1.0 - near, [1.0]])
    return np.unique(np.clip(grid, 0.0, 1.0))


X_GRID = _x_grid()


@lru_cache(maxsize=256)
def c_factor_row(alpha: float, num_categories: int) -> np.ndarray:
    """C(x, alpha) of eq. 14 on `X_GRID` (float64), for K = num_categories."""
    from scipy import special as sp

    a, b, x = float(alpha), float(num_categories - 1), X_GRID
    h = 1e-5 * max(1.0, a)
    with np.errstate(all="ignore"):
        low = sp.betainc(a, b, x) < 0.5  # below the median: I_x is the small side
        # d/dalpha I_x(alpha, b): on I below the median, on the complement I_{1-x}(b, alpha) above
        d_low = (sp.betainc(a + h, b, x) - sp.betainc(a - h, b, x)) / (2 * h)
        d_high = -(sp.betainc(b, a + h, 1.0 - x) - sp.betainc(b, a - h, 1.0 - x)) / (2 * h)
        d = np.where(low, d_low, d_high)
        log_dens = (a - 1.0) * np.log(x) + b * np.log1p(-x) - sp.betaln(a, b)  # x^(a-1)(1-x)^b / B
        c = -d * np.exp(-log_dens)
        m = sp.digamma(a) - sp.digamma(a + b)
        asymptote = -x * (np.log(x) - 1.0 / a - m) / a  # x -> 0
        at_one = (sp.digamma(a + b) - sp.digamma(a)) / b  # x -> 1
    bad = ~np.isfinite(c) | (np.abs(d) < 1e-250)  # the density underflowed
    c = np.where(bad, np.where(low, asymptote, at_one), c)
    c[0], c[-1] = 0.0, at_one
    if not np.isfinite(c).all():  # pragma: no cover - guarded above; an invariant
        raise FloatingPointError(f"non-finite Dirichlet C table at alpha={a}, K={num_categories}")
    return c


class DirichletPath(DiscretePath):
    """Dir(1 + (alpha - 1) e_i) over K letters, alpha from 1 (t = 1) to alpha_max (t = 0)."""

    name = "dirichlet"

    def __init__(self, num_categories: int = 4, alpha_max: float = 8.0):
        super().__init__(num_categories)
        if not (math.isfinite(alpha_max) and alpha_max > 1.0):
            raise InputError(f"alpha_max must be a finite number > 1, got {alpha_max!r}")
        self.alpha_max = float(alpha_max)
        self._grid = torch.from_numpy(X_GRID)

    # -- time ---------------------------------------------------------------------
    def alpha(self, t: Tensor | float) -> Tensor:
        """alpha(t) = 1 + (alpha_max - 1)(1 - t), float64."""
        return 1.0 + (self.alpha_max - 1.0) * (1.0 - as_time(t))

    def time_from_alpha(self, alpha: Tensor | float) -> Tensor:
        return 1.0 - (as_time(alpha) - 1.0) / (self.alpha_max - 1.0)

    def time_of(self, timestep: Tensor) -> Tensor:
        return self.time_from_alpha(timestep)

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        a = self.alpha(t)
        return PathPoint(t=t, alpha=a, sigma=t, timestep=a)

    # -- draws ----------------------------------------------------------------------
    def source(self, noise: Tensor) -> Tensor:
        return dirichlet_from_normal(noise).float()

    def sample(self, tokens: Tensor, t: Tensor, noise: Tensor | None = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        """x ~ Dir(1 + (alpha(t) - 1) e_token) per position (torch's Dirichlet sampler, float32).
        `noise` is unused (Dirichlet draws need gamma variates): pass a `generator`."""
        tokens = check_tokens(tokens, self.num_categories)
        a = self.alpha(self._t(t, tokens.shape[0])).float()
        conc = 1.0 + one_hot(tokens, self.num_categories) * (a[:, None, None] - 1.0)
        g = torch._standard_gamma(conc.double(), generator=generator) if generator is not None \
            else torch._standard_gamma(conc.double())
        g = g.clamp_min(torch.finfo(torch.float64).tiny)
        return (g / g.sum(dim=-1, keepdim=True)).float()

    # -- the vector field -------------------------------------------------------------
    def c_factor(self, x: Tensor, alpha: float) -> Tensor:
        """C(x, alpha) elementwise for x in [0, 1] (float64), interpolated from the scipy table."""
        row = torch.from_numpy(c_factor_row(float(alpha), self.num_categories)).to(x.device)
        grid = self._grid.to(x.device)
        xx = x.double().clamp(0.0, 1.0)
        hi = torch.searchsorted(grid, xx.contiguous()).clamp(1, len(grid) - 1)
        lo = hi - 1
        w = (xx - grid[lo]) / (grid[hi] - grid[lo])
        return row[lo] + w * (row[hi] - row[lo])

    def velocity(self, probs: Tensor, x: Tensor, alpha: Tensor | float) -> Tensor:
        """dx/dalpha = sum_j p_j C(x_j, alpha) (e_j - x) [B, L, K] (float64); alpha per row [B] or one value."""
        alpha = as_time(alpha, x.shape[0]).reshape(-1)
        out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        for a in torch.unique(alpha).tolist():
            rows = (alpha == a).nonzero().flatten().to(x.device)
            xr, pr = x[rows].double(), probs[rows].double()
            pc = pr * self.c_factor(xr, a)  # [b, L, K]
            out[rows] = pc - xr * pc.sum(dim=-1, keepdim=True)
        return out

    # -- the exact denoiser of a factorised law ----------------------------------------
    def posterior(self, log_prior: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """p(e_j | x) proportional to q_j x_j^(alpha - 1) (the Dirichlet normaliser is shared)."""
        a = self.alpha(self._t(t, x.shape[0])).to(x.device)
        logits = log_prior.double() + torch.xlogy((a - 1.0)[:, None, None].expand_as(x), x.double())
        return torch.softmax(logits, dim=-1)

    # -- scores and guidance (Sec. 3.4) -------------------------------------------------
    def score(self, probs: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
        """s = (alpha - 1)(p / x - mean(p / x)): the marginal score implied by probabilities
        (infinite on a face where p_j > 0 = x_j; used by tests, not by the samplers)."""
        r = probs.double() / x.double()
        return (alpha.double().reshape(-1, 1, 1) - 1.0) * (r - r.mean(dim=-1, keepdim=True))

    def probs_from_score(self, score: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
        """The inverse of `score` on the tangent space: p = x (1 + (s - <x, s>) / (alpha - 1))."""
        s = score.double() / (alpha.double().reshape(-1, 1, 1) - 1.0)
        xx = x.double()
        return xx * (1.0 + s - (xx * s).sum(dim=-1, keepdim=True))

    def classifier_tilt(self, probs: Tensor, x: Tensor, point: PathPoint, grad: Tensor) -> Tensor:
        """p + x (g - <x, g>) / (alpha - 1): probabilities of the score s(p) + g, for alpha > 1.

        At alpha = 1 the quotient is 0/0 (x carries no class information, so a true classifier's
        g vanishes) and its limit is d g / d alpha at 1, which g alone cannot give: the caller
        evaluates the classifier above 1 (`DirichletClassifierGuidance` takes the forward
        difference) and passes that point. A point at alpha <= 1 is refused, never treated as 0.
        """
        a = point.alpha.double().to(x.device).reshape(-1, 1, 1)
        if not bool((a > 1.0).all()):
            raise InputError("the Dirichlet classifier tilt is g / (alpha - 1), 0/0 at alpha = 1: evaluate the "
                             "classifier at alpha > 1 and pass that point (the limit is dg/dalpha at 1)")
        xx, g = x.double(), grad.double()
        step = xx * (g - (xx * g).sum(dim=-1, keepdim=True))
        return probs.double() + step / (a - 1.0)

    def __repr__(self) -> str:
        return f"DirichletPath(num_categories={self.num_categories}, alpha_max={self.alpha_max:g})"
