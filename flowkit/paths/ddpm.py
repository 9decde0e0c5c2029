"""The discrete DDPM schedules of SD 1.x / 2.x / SDXL (Ho et al., "Denoising Diffusion
Probabilistic Models"), on flowkit time.

A table of T betas gives the cumulative products abar_k (k = 0 .. T-1, the network's
timestep index). Three equivalent views of one noise level:

    VE sigma   s_k = sqrt((1 - abar_k) / abar_k)       (what diffusers' Euler/DPM schedulers step in)
    native     alpha = 1 / sqrt(1 + s^2), sigma = s / sqrt(1 + s^2)   (variance preserving)
    flowkit    t = s / (1 + s),  s = t / (1 - t)        (SNR matching: alpha / sigma = (1 - t) / t)

The table is built with diffusers' float32 arithmetic (betas and cumulative product in
float32, as `DDPMScheduler`, `EulerDiscreteScheduler` and the training scripts do), so it is
the table the model was trained on, bit for bit; everything after that is float64.

Continuous timesteps, as diffusers' `EulerDiscreteScheduler._sigma_to_t`: log s is linear
between neighbouring indices. Time grids, as `EulerDiscreteScheduler.set_timesteps`: the
index schedule of the chosen spacing, s linear between neighbouring indices, a terminal 0.
The two interpolations differ (log-linear vs linear), as they do in diffusers: at a
fractional grid index, `at(t).timestep` can differ from diffusers' fed timestep by up to
about 1e-2 (it agrees exactly at integer indices).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from flowkit.paths.base import GaussianPath, PathPoint, as_time
from flowkit.paths.vp import vp_coefficients

__all__ = [
    "DDPMPath",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "make_alphas_cumprod",
    "sigmas_to_t",
    "t_to_sigma",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# diffusers' Euler scheduler replaces a zero terminal abar (zero-SNR rescaling) by the
# smallest fp16 subnormal so the first sigma is finite (4096); we keep that convention.
_ZERO_SNR_ABAR = 2.0**-24


def sigmas_to_t(sigmas: Tensor | float | Sequence[float]) -> Tensor:
    """flowkit time t = s / (1 + s) of VE sigmas s (float64; s = inf gives t = 1)."""
    s = as_time(sigmas)
    if bool((s < 0).any()):
        raise ValueError("VE sigmas must be >= 0")
    return torch.where(torch.isinf(s), torch.ones_like(s), s / (1.0 + s))


def t_to_sigma(t: Tensor | float | Sequence[float]) -> Tensor:
    """VE sigma s = t / (1 - t) of flowkit times t (float64; t = 1 gives inf)."""
    t = as_time(t)
    return t / (1.0 - t)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """Betas of the "squaredcos_cap_v2" (GLIDE / improved DDPM) schedule, in float64.

    abar(u) = cos((u + 0.008) / 1.008 * pi/2)^2 and beta_i = 1 - abar((i+1)/T) / abar(i/T),
    capped at max_beta (Nichol & Dhariwal, eq. 17).
    """

    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return [min(1.0 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): sqrt(abar) shifted so the last is 0 and scaled so
    the first is unchanged."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    *,
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> Tensor:
    """abar_k, k = 0 .. T-1, as a float64 tensor [T] holding diffusers' float32 values.

    beta_schedule: "linear" (betas = linspace(b0, b1, T)), "scaled_linear" (Stable Diffusion:
    betas = linspace(sqrt b0, sqrt b1, T)^2) or "squaredcos_cap_v2" (cosine; b0, b1 unused).
    trained_betas, when given, replaces the schedule.
    """
    T = int(num_train_timesteps)
    if T < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float32).reshape(-1)
        if betas.numel() != T:
            raise ValueError(
                f"trained_betas has {betas.numel()} entries but num_train_timesteps is {T}; make them agree"
            )
    elif beta_schedule in ("linear", "scaled_linear"):
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = torch.tensor(_cosine_betas(T), dtype=torch.float32)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use one of {BETA_SCHEDULES} or pass trained_betas")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("every beta must lie in (0, 1)")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
    if rescale_betas_zero_snr:
        abar[-1] = _ZERO_SNR_ABAR
    return abar.to(torch.float64)


class DDPMPath(GaussianPath):
    """The discrete variance-preserving schedule of a DDPM-trained model (SD 1.x/2.x, SDXL).

    Defaults are Stable Diffusion's: scaled_linear, beta 0.00085 .. 0.012, T = 1000.
    Attributes (float64, indexed by the timestep k = 0 .. T-1): `alphas_cumprod` [T],
    `sigmas` [T] (VE, increasing), `log_sigmas` [T].
    """

    name = "ddpm"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        *,
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.beta_schedule = beta_schedule
        self.trained_betas = None if trained_betas is None else [float(b) for b in trained_betas]
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.alphas_cumprod = make_alphas_cumprod(
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            beta_schedule,
            trained_betas=self.trained_betas,
            rescale_betas_zero_snr=self.rescale_betas_zero_snr,
        )
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # VE s_k [T]
        self.log_sigmas = self.sigmas.log()
        self._log_sigma_range = (float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        if not bool((self.log_sigmas[1:] > self.log_sigmas[:-1]).all()):
            raise ValueError("the schedule's noise levels must increase strictly with the timestep")

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any] | Any) -> DDPMPath:
        """The path of a diffusers DDPM-family scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...).

        `config` is the scheduler's config (a dict or FrozenDict) or the scheduler itself.
        Keys missing from it take diffusers' defaults, as the scheduler would.
        """
        if not isinstance(config, Mapping) and isinstance(getattr(config, "config", None), Mapping):
            config = config.config
        if not isinstance(config, Mapping):
            raise ValueError(
                f"expected a diffusers scheduler config (a dict or FrozenDict), got {type(config).__name__}"
            )
        if config.get("beta_schedule") is None and config.get("trained_betas") is None:
            name = config.get("_class_name", "this scheduler")
            raise ValueError(
                f"{name}'s config has no beta_schedule or trained_betas, so it is not a DDPM-family schedule; "
                "flow-matching schedulers (FlowMatchEulerDiscreteScheduler) use LinearPath"
            )
        return cls(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            beta_schedule=config.get("beta_schedule", "linear"),
            trained_betas=config.get("trained_betas"),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )

    # -- the path ----------------------------------------------------------------------

    @property
    def t_max(self) -> float:
        """flowkit time of the last trained index T-1 (about 0.936 for Stable Diffusion)."""
        return float(sigmas_to_t(self.sigmas[-1]))

    def at(self, t: Tensor) -> PathPoint:
        t = as_time(t)
        alpha, sigma = vp_coefficients(t)
        return PathPoint(t=t, alpha=alpha, sigma=sigma, timestep=self.timestep_of(t))

    def timestep_of(self, t: Tensor) -> Tensor:
        """Continuous timestep index of flowkit times t, as diffusers' `_sigma_to_t`.

        log s is interpolated linearly between neighbouring indices; times beyond the table
        clamp to 0 and T-1 (t = 0 gives 0, t = 1 gives T-1).
        """
        t = as_time(t)
        log_s = torch.log(t) - torch.log1p(-t)  # log(t / (1 - t)); -inf at t = 0, +inf at t = 1
        x = log_s.clamp(self._log_sigma_range[0], self._log_sigma_range[1])
        ls = self.log_sigmas.to(t.device)
        low = (torch.searchsorted(ls, x, right=True) - 1).clamp(0, ls.numel() - 2)
        w = (x - ls[low]) / (ls[low + 1] - ls[low])
        return low.to(torch.float64) + w

    def index_to_t(self, k: Tensor | float | Sequence[float]) -> Tensor:
        """flowkit time of (fractional) timestep indices k: s linear between neighbouring
        indices, as `EulerDiscreteScheduler.set_timesteps` (np.interp; k clamps to [0, T-1])."""
        k = as_time(k).clamp(0.0, float(self.num_train_timesteps - 1))
        s = self.sigmas.to(k.device)
        low = k.floor().long().clamp(0, s.numel() - 2)
        w = k - low.to(torch.float64)
        return sigmas_to_t(s[low] * (1.0 - w) + s[low + 1] * w)

    # -- time grids --------------------------------------------------------------------

    def train_timesteps(self, steps: int, spacing: str = "linspace", steps_offset: int = 0) -> Tensor:
        """The `steps` timestep indices (float64, decreasing) of diffusers' `timestep_spacing`.

        "linspace": linspace(0, T-1, steps) reversed (fractional); "leading": multiples of
        T // steps, plus steps_offset; "trailing": round(T - i T/steps) - 1. (One "linspace"
        step starts at T-1 here; diffusers would start at index 0, the least noisy level.)
        """
        T = self.num_train_timesteps
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if spacing == "linspace":
            if steps == 1:
                return torch.tensor([T - 1.0], dtype=torch.float64)
            return torch.linspace(0.0, T - 1.0, steps, dtype=torch.float64).flip(0)
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}")
        if steps > T:
            raise ValueError(f"{spacing!r} spacing needs steps <= num_train_timesteps ({T}), got {steps}")
        i = torch.arange(steps, dtype=torch.float64)
        if spacing == "leading":
            return (i * (T // steps)).flip(0) + steps_offset
        # trailing: numpy's arange(T, 0, -T/steps) fills T + i * ((T - T/steps) - T); the same
        # rounding here keeps ties (x.5) on diffusers' side. For some steps (61, 103, ... at T=1000)
        # that arange has one element too many (a trailing -1); we return `steps` indices.
        delta = (T - T / steps) - T
        return torch.round(T + i * delta) - 1.0

    def grid(self, steps: int, spacing: str = "linspace", steps_offset: int = 0) -> Tensor:
        """`steps + 1` flowkit times as `EulerDiscreteScheduler.set_timesteps(steps)` with this
        `timestep_spacing` and `steps_offset`: its sigmas, mapped to flowkit time, then 0."""
        k = self.train_timesteps(steps, spacing, steps_offset)
        return torch.cat([self.index_to_t(k), torch.zeros(1, dtype=torch.float64)])

    def uniform_grid(self, steps: int) -> Tensor:
        """diffusers' default ("linspace") grid: uniform in the timestep index, from t_max to 0."""
        return self.grid(steps, "linspace")

    def __repr__(self) -> str:
        extra = ", trained_betas=[...]" if self.trained_betas is not None else ""
        extra += ", rescale_betas_zero_snr=True" if self.rescale_betas_zero_snr else ""
        return (
            f"DDPMPath(num_train_timesteps={self.num_train_timesteps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, beta_schedule={self.beta_schedule!r}{extra})"
        )
