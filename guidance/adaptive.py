"""Adaptive Guidance (Castillo et al., "Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models", Sec. 4, the cosine-similarity policy).

A policy on top of a combiner (`cfg:scale=7+adaptive:gamma=0.999`): after each step it
measures, per sample, the cosine similarity of the conditional and unconditional
predictions; once it exceeds gamma (after at least `min_guided_steps` guided steps) the
sample stops evaluating the unconditional branch for the rest of the run, so its NFEs
drop. The similarity is computed on x0 predictions: on noise predictions it is about 1
from the first step and the policy degenerates into conditional-only sampling.

gamma is a cosine threshold, so it lies in [-1, 1]: -1 fires right after
`min_guided_steps`, 1 only where the two predictions coincide (to rounding). A value
outside [-1, 1] is refused (it would mean "never" or "always" in a way no cosine can):
for plain CFG, leave the module out.

LinearAG, the paper's replacement of unconditional evaluations by a fitted affine map of
past outputs, is the companion policy `linear-ag` (guidance/linear_ag.py), a module of its
own so that it also runs without AG: `cfg:scale=7+adaptive:gamma=0.999+linear-ag`.
"""

from __future__ import annotations

from typing import Literal

import torch

from flowkit.guidance_base import BranchRequests, Guidance
from flowkit.registry import GUIDANCE

__all__ = ["AdaptiveGuidance", "cosine"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity over all non-batch dimensions, in float64."""
    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1)


@GUIDANCE.register
class AdaptiveGuidance(Guidance):
    name = "adaptive"
    description = "adaptive guidance: stop the unconditional branch per sample once cond and uncond agree"
    role = "policy"
    saves_nfe = True

    def __init__(self, *, gamma: float = 0.999, min_guided_steps: int = 1,
                 space: Literal["x0", "epsilon", "model_output"] = "x0",
                 start: float = 0.0, stop: float = 1.0):
        super().__init__(start=start, stop=stop)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not -1.0 <= gamma <= 1.0:
            raise ValueError(f"gamma is a cosine threshold from -1 to 1 (1: fire only where cond and uncond "
                             f"coincide; for plain CFG leave adaptive out), got {gamma!r}")
        if not isinstance(min_guided_steps, int) or min_guided_steps < 0:
            raise ValueError(f"min_guided_steps must be an integer >= 0, got {min_guided_steps!r}")
        if space not in ("x0", "epsilon", "model_output"):
            raise ValueError(f"space must be x0, epsilon or model_output, got {space!r}")
        self.gamma = float(gamma)
        self.min_guided_steps = min_guided_steps
        self.space = space

    def fired(self, ctx) -> torch.Tensor:
        state = self.state(ctx)
        if "fired" not in state:
            state["fired"] = torch.zeros(ctx.batch_size, dtype=torch.bool, device=ctx.device)
            state["guided"] = torch.zeros(ctx.batch_size, dtype=torch.long, device=ctx.device)
        return state["fired"]

    def branches(self, ctx, requests: BranchRequests) -> None:
        requests.drop("uncond", self.fired(ctx))

    def _value(self, pred):
        if self.space == "model_output":
            return pred.value
        return pred.x0 if self.space == "x0" else pred.eps

    def after_step(self, ctx, x, pred, preds) -> None:
        fired = self.fired(ctx)
        if "uncond" not in preds:
            return
        state = self.state(ctx)
        present = preds.present("uncond")
        state["guided"] = state["guided"] + present.long()
        cos = cosine(self._value(preds["cond"]), self._value(preds["uncond"])).to(fired.device)
        state["cosine"] = torch.where(present, cos, torch.full_like(cos, float("nan")))
        fire = present & (cos > self.gamma) & (state["guided"] >= self.min_guided_steps)
        state["fired"] = fired | fire

    def on_stage_change(self, ctx, old_shape, new_shape) -> None:
        """A sample that stopped guidance stays unguided across a resolution change."""
        return None
