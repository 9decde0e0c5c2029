"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance").

D = D_uncond + w (D_cond - D_uncond)  (eq. 6), combined on the raw model output: the rule
is affine, so for Gaussian paths every prediction space gives the same step, and the raw
output is what diffusers combines, bit for bit (and it avoids converting through a space
that is singular at the path's ends, such as noise at t = 1). `guidance_rescale` is the
std-matching rescale of Lin et al., "Common Diffusion Noise Schedules and Sample Steps
are Flawed" (eq. 15-16); it is not affine, so `space` chooses where it is measured
(the model output by default, as diffusers does).

On discrete paths the prediction is categorical probabilities and the combine dispatches on
that space. `space="model_output"` combines the probabilities themselves,
p = p_u + w (p_c - p_u), projected onto the simplex when w > 1 pushes a letter below 0: every
discrete path's velocity is linear in p, so this is CFG on the vector field, and on the
Dirichlet path it is exactly the score-space rule of Stark et al. (Sec. 3.4: the score is
linear in p and invertible on the tangent space). `space="log_probs"` is the
probability-space form: softmax(log p_u + w (log p_c - log p_u)), a geometric tilt that
stays on the simplex. Both give p_u at w = 0 and p_c at w = 1.
Samples whose unconditional branch is absent (dropped by a policy such as Adaptive
Guidance) take the conditional prediction.
"""

from __future__ import annotations

from typing import Literal

import torch

from flowkit.guidance_base import BranchPredictions, BranchRequests, Guidance
from flowkit.paths.categorical import project_simplex
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE

__all__ = ["CFG", "rescale_noise_cfg", "combine_probs"]

GAUSSIAN_SPACES = ("model_output", "x0", "epsilon", "velocity")
DISCRETE_SPACES = ("model_output", "log_probs")


def combine_probs(uncond: torch.Tensor, cond: torch.Tensor, scale: float, space: str = "model_output") -> torch.Tensor:
    """CFG on categorical probabilities [..., K]: affine then projected ("model_output"), or
    geometric in log space ("log_probs"); float64 inside, the input dtype out."""
    u, c = uncond.double(), cond.double()
    if space == "log_probs":
        lu, lc = u.clamp_min(1e-300).log(), c.clamp_min(1e-300).log()
        out = torch.softmax(lu + scale * (lc - lu), dim=-1)
    else:
        out = project_simplex(u + scale * (c - u))
    return out.to(cond.dtype)


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
                 space: Literal["model_output", "x0", "epsilon", "velocity", "log_probs"] = "model_output",
                 batched: bool = True, start: float = 0.0, stop: float = 1.0):
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        if space not in GAUSSIAN_SPACES + DISCRETE_SPACES:
            raise ValueError(f"space must be model_output, x0, epsilon, velocity (Gaussian paths) or "
                             f"log_probs (discrete paths), got {space!r}")
        self.scale = float(scale)
        self.guidance_rescale = float(guidance_rescale)
        self.space = space
        self.batched = bool(batched)

    @property
    def extra_branches(self) -> int:
        return 0 if self.scale == 1.0 else 1

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason is not None:
            return reason
        discrete = ctx.denoiser.path.kind == "discrete"
        allowed = DISCRETE_SPACES if discrete else GAUSSIAN_SPACES
        if self.space not in allowed:
            kind = "discrete" if discrete else "Gaussian"
            return f"cfg space {self.space!r} does not exist on {kind} paths; use one of {', '.join(allowed)}"
        if discrete and self.guidance_rescale > 0:
            return "cfg guidance_rescale matches noise statistics and has no meaning on discrete paths; set it to 0"
        return None

    def branches(self, ctx, requests: BranchRequests) -> None:
        if self.scale != 1.0:
            requests.need("uncond")

    def combine(self, ctx, preds: BranchPredictions) -> Prediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        uncond = preds["uncond"]
        if cond.is_discrete:
            guided = combine_probs(uncond.probs, cond.probs, self.scale, self.space)
            return cond.replace(preds.where("uncond", guided, cond.probs))
        c, u = cond.value, uncond.value
        guided = u + self.scale * (c - u)
        if self.guidance_rescale > 0:
            kind = cond.kind if self.space == "model_output" else self.space
            g = cond.replace(guided)
            rescaled = rescale_noise_cfg(g.as_kind(kind), cond.as_kind(kind), self.guidance_rescale)
            guided = g.replace(rescaled, kind).as_kind(cond.kind)
        return cond.replace(preds.where("uncond", guided, c))
