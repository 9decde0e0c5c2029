"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance").

D = D_uncond + w (D_cond - D_uncond)  (eq. 6), combined on the raw model output: the rule
is affine, so for Gaussian paths every prediction space gives the same step, and the raw
output is what diffusers combines, bit for bit (and it avoids converting through a space
that is singular at the path's ends, such as noise at t = 1). `guidance_rescale` is the
std-matching rescale of Lin et al., "Common Diffusion Noise Schedules and Sample Steps
are Flawed" (eq. 15-16); it is not affine, so `space` chooses where it is measured
(the model output by default, as diffusers does). On
discrete paths the rule combines categorical probabilities in log space and renormalises.
Samples whose unconditional branch is absent (dropped by a policy such as Adaptive
Guidance) take the conditional prediction.
"""

from __future__ import annotations

from typing import Literal

import torch

from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE

from flowkit.guidance.base import BranchPredictions, BranchRequests, Guidance

__all__ = ["CFG", "rescale_noise_cfg"]


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Match the per-sample std of `guided` to that of `cond`, mixed by phi (Lin et al. eq. 15-16)."""
    dims = list(range(1, guided.ndim))
    std_c = cond.std(dim=dims, keepdim=True)
    std_g = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_c / std_g)
    return phi * rescaled + (1 - phi) * guided


@GUIDANCE.register
class CFG(Guidance):
    name = "cfg"
    description = "classifier-free guidance: uncond + scale * (cond - uncond)"
    role = "combiner"
    path_kinds = ("gaussian", "discrete")

    def __init__(self, *, scale: float = 7.5, guidance_rescale: float = 0.0,
                 space: Literal["model_output", "x0", "epsilon", "velocity"] = "model_output",
                 batched: bool = True, start: float = 0.0, stop: float = 1.0):
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if space not in ("model_output", "x0", "epsilon", "velocity"):
            raise ValueError(f"space must be model_output, x0, epsilon or velocity, got {space!r}")
        self.scale = float(scale)
        self.guidance_rescale = float(guidance_rescale)
        self.space = space
        self.batched = bool(batched)

    @property
    def extra_branches(self) -> int:
        return 0 if self.scale == 1.0 else 1

    def branches(self, ctx, requests: BranchRequests) -> None:
        if self.scale != 1.0:
            requests.need("uncond")

    def combine(self, ctx, preds: BranchPredictions) -> Prediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        uncond = preds["uncond"]
        if cond.is_discrete:
            logp = uncond.probs.clamp_min(1e-12).log()
            logp = logp + self.scale * (cond.probs.clamp_min(1e-12).log() - logp)
            guided = torch.softmax(logp, dim=-1)
            return cond.replace(preds.where("uncond", guided, cond.probs))
        c, u = cond.value, uncond.value
        guided = u + self.scale * (c - u)
        if self.guidance_rescale > 0:
            kind = cond.kind if self.space == "model_output" else self.space
            g = cond.replace(guided)
            rescaled = rescale_noise_cfg(g.as_kind(kind), cond.as_kind(kind), self.guidance_rescale)
            guided = g.replace(rescaled, kind).as_kind(cond.kind)
        return cond.replace(preds.where("uncond", guided, c))
