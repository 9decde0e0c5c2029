"""Adaptive Projected Guidance (Sadat et al., "Eliminating Oversaturation and Artifacts of
High Guidance Scales in Diffusion Models", Algorithm 1).

On denoised predictions D (x0 space by default), with dD = D_cond - D_uncond:
  reverse momentum   avg <- dD + beta * avg, dD <- avg            (beta < 0; Sec. 4.3)
  rescaling          dD <- dD * min(1, r / ||dD||)                (eq. 9)
  projection         dD = dD_par + dD_orth w.r.t. D_cond, float64 (eq. 7)
  update             D = D_cond + (w - 1) (dD_orth + eta * dD_par) (eq. 8)
Paper defaults: eta = 0, r = 15, beta = -0.5. Norms and projections are per sample over
all non-batch dimensions. `norm_threshold=0` (or None) turns rescaling off, `momentum=0`
turns momentum off; with eta = 1 and both off the rule is exactly CFG. At w = 1 the result
is D_cond, the unconditional branch is not evaluated and momentum is not updated (as in
diffusers' guider, which is off at that scale).

The threshold. The paper's r = 15 is an absolute L2 norm (`norm="l2"`, the default, as in
diffusers), so what it means depends on the number of elements n per sample: on SD's
4x64x64 latent (n = 16384) it is a per-element RMS of 15 / 128 = 0.117, on a 3x32x32 image
an RMS of 0.27. `norm="rms"` compares the per-element RMS ||dD|| / sqrt(n) with r instead,
so one threshold carries across latent sizes and resolution stages (r = 0.117 is the
paper's setting on SD 1.x/2.x latents).

Differences from diffusers' `AdaptiveProjectedGuidance`, which (1) works on the raw
model output (noise or velocity) rather than x0, (2) defaults to eta = 1 (no projection)
and (3) defaults to the form D_uncond + w * update (the paper's form needs its
`use_original_formulation=True` with scale w - 1). `space="model_output"` and
`formulation="uncond"` reproduce those choices; the paper's x0 form is our default.
Momentum state is per sample and resets at a resolution change (bottleneck sampling).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE

__all__ = ["APG", "project", "rescale_factor"]


def project(v0: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of v0 w.r.t. v1, per sample, in float64 (eq. 7)."""
    dims = list(range(1, v0.ndim))
    a, b = v0.double(), v1.double()
    b = torch.nn.functional.normalize(b, dim=dims)
    par = (a * b).sum(dim=dims, keepdim=True) * b
    return par.to(v0.dtype), (a - par).to(v0.dtype)


def rescale_factor(diff: Tensor, threshold: float, norm: str = "l2") -> Tensor:
    """min(1, r / ||dD||) per sample [B] (eq. 9); with norm="rms", ||dD|| / sqrt(n) in place of ||dD||."""
    size = diff.flatten(1).norm(dim=1)
    if norm == "rms":
        size = size / math.sqrt(diff[0].numel())
    return torch.clamp(threshold / size, max=1.0)


@GUIDANCE.register
class APG(Guidance):
    name = "apg"
    description = "adaptive projected guidance: momentum, norm rescaling, projection onto the conditional"
    role = "combiner"

    def __init__(self, *, scale: float = 10.0, eta: float = 0.0, momentum: float = -0.5,
                 norm_threshold: float | None = 15.0, norm: Literal["l2", "rms"] = "l2",
                 space: Literal["x0", "model_output"] = "x0",
                 formulation: Literal["paper", "uncond"] = "paper", start: float = 0.0, stop: float = 1.0):
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if not -1.0 < momentum <= 0.0:
            raise ValueError(f"momentum must be in (-1, 0] (reverse momentum), got {momentum}")
        if norm_threshold is not None and not norm_threshold >= 0:
            raise ValueError(f"norm_threshold must be >= 0 or None, got {norm_threshold}")
        if norm not in ("l2", "rms"):
            raise ValueError(f"norm must be l2 (the threshold is an absolute norm, the paper's) or rms "
                             f"(a per-element RMS), got {norm!r}")
        if space not in ("x0", "model_output"):
            raise ValueError(f"space must be x0 or model_output, got {space!r}")
        if formulation not in ("paper", "uncond"):
            raise ValueError(f"formulation must be paper or uncond, got {formulation!r}")
        self.scale = float(scale)
        self.eta = float(eta)
        self.momentum = float(momentum)
        self.norm_threshold = None if norm_threshold is None else float(norm_threshold)
        self.norm = norm
        self.space = space
        self.formulation = formulation

    @property
    def enabled_at_scale(self) -> bool:
        """False at w = 1, where the result is D_cond (diffusers' `_is_apg_enabled`)."""
        return not math.isclose(self.scale, 1.0)

    @property
    def extra_branches(self) -> int:
        return 1 if self.enabled_at_scale else 0

    def branches(self, ctx, requests: BranchRequests) -> None:
        if self.enabled_at_scale:
            requests.need("uncond")

    def guide(self, cond: Tensor, uncond: Tensor, avg: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(guided, new momentum average, per-sample rescale factor) for tensors [B, ...]."""
        diff = cond - uncond
        if self.momentum != 0.0:
            diff = diff + self.momentum * avg if avg is not None else diff
            avg = diff
        factor = torch.ones(diff.shape[0], dtype=diff.dtype, device=diff.device)
        if self.norm_threshold:
            factor = rescale_factor(diff, self.norm_threshold, self.norm)
            diff = diff * factor.view(-1, *([1] * (diff.ndim - 1)))
        par, orth = project(diff, cond)
        update = orth + self.eta * par
        if self.formulation == "paper":
            return cond + (self.scale - 1.0) * update, avg, factor
        return uncond + self.scale * update, avg, factor

    def combine(self, ctx, preds: BranchPredictions) -> Prediction:
        cond = preds["cond"]
        if "uncond" not in preds or not self.enabled_at_scale:
            return cond
        uncond = preds["uncond"]
        present = preds.present("uncond")
        if self.space == "x0":
            c, u = cond.x0, uncond.x0
        else:
            c, u = cond.value, uncond.value
        state = self.state(ctx)
        guided, avg, factor = self.guide(c, u, state.get("avg"))
        rows = present.view(-1, *([1] * (c.ndim - 1)))
        if avg is not None:
            old = state.get("avg")
            state["avg"] = torch.where(rows, avg, old if old is not None else torch.zeros_like(avg))
        state["rescaled"] = (factor < 1) & present  # for inspection and tests
        guided = torch.where(rows, guided, c)
        if self.space == "x0":
            return cond.with_x0(guided)
        return cond.replace(guided)
