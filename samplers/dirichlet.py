"""Dirichlet flow matching samplers (Stark et al., "Dirichlet Flow Matching with Applications
to DNA Sequence Design", ICML 2024): Euler in alpha (Sec. 3.3, eq. 14 summed over the
denoiser's probabilities) and the distilled one-step sampler (Sec. 5.2, "distillation").

`dirichlet`: from the flat Dirichlet (alpha = 1, t = 1) the state x [B, L, K] follows
dx/dalpha = sum_j p(e_j | x) C(x_j, alpha)(e_j - x) with Euler steps of the grid's alphas
(uniform in alpha by default); after each step the state is projected back onto the simplex
(the identity unless a strongly guided step overshoots a face, as in the paper's code).
The last evaluation draws the tokens from the denoiser (see `SimplexSampler`).

`dirichlet-onestep`: a student distilled from the multi-step sampler maps the source draw
straight to tokens: one evaluation at t = 1 whatever `steps` says; it needs a distilled
model (`flowkit.load("dna-distilled")`, trained by `flowkit train dna-distilled`).
"""

from __future__ import annotations

from typing import Literal

from flowkit.paths.categorical import project_simplex
from flowkit.registry import SAMPLERS
from flowkit.sampler_base import SimplexSampler

__all__ = ["DirichletEuler", "DirichletOneStep"]


@SAMPLERS.register
class DirichletEuler(SimplexSampler):
    name = "dirichlet"
    description = "Dirichlet flow matching: Euler steps in alpha on the simplex, tokens drawn at the end"
    path_name = "dirichlet"

    def update(self, model, x, probs, t, t_next):
        path = model.ctx.denoiser.path
        alpha, alpha_next = float(path.alpha(t)), float(path.alpha(t_next))
        v = path.velocity(probs, x, alpha)  # eq. 14, marginalised
        return project_simplex(x.double() + (alpha_next - alpha) * v).to(x.dtype)


@SAMPLERS.register
class DirichletOneStep(SimplexSampler):
    name = "dirichlet-onestep"
    description = "Dirichlet FM distilled one-step sampler: one evaluation of a distilled model at alpha = 1"
    path_name = "dirichlet"

    def __init__(self, *, final: Literal["sample", "argmax"] = "argmax", grid: str | None = None):
        super().__init__(final=final, grid=grid)

    def evaluations(self, steps: int) -> int:
        return 1

    def refuse(self, ctx):
        reason = super().refuse(ctx)
        if reason is None and not getattr(ctx.denoiser, "one_step", False):
            reason = ("sampler dirichlet-onestep needs a distilled one-step model, e.g. flowkit.load('dna-distilled'); "
                      "use sampler dirichlet for this model")
        return reason

    def sample(self, model, x, ts):
        pred = model(x, float(ts[0]))
        x = self.finish(model, pred.probs, x)
        return model.end_step(x, pred)
