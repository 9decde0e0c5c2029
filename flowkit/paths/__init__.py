"""Probability paths and conversions (see `flowkit.paths.base`)."""

from flowkit.paths.base import GaussianPath, Path, PathPoint, as_time
from flowkit.paths.convert import (
    PREDICTION_TYPES,
    convert_prediction,
    convert_state,
    from_x0_eps,
    to_x0_eps,
)
from flowkit.paths.ddpm import DDPMPath, make_alphas_cumprod, sigmas_to_t, t_to_sigma
from flowkit.paths.linear import LinearPath
from flowkit.paths.shift import dynamic_shift, flux_mu, static_shift
from flowkit.paths.vp import VPCosinePath, VPSDEPath

__all__ = [
    "Path",
    "GaussianPath",
    "PathPoint",
    "as_time",
    "LinearPath",
    "VPCosinePath",
    "VPSDEPath",
    "DDPMPath",
    "make_alphas_cumprod",
    "sigmas_to_t",
    "t_to_sigma",
    "static_shift",
    "dynamic_shift",
    "flux_mu",
    "PREDICTION_TYPES",
    "to_x0_eps",
    "from_x0_eps",
    "convert_prediction",
    "convert_state",
]
