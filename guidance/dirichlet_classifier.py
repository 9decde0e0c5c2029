"""Classifier guidance on the Dirichlet path (Stark et al., "Dirichlet Flow Matching with
Applications to DNA Sequence Design", ICML 2024, Sec. 3.4, eq. 19-20).

A noisy classifier p(y | x_t) adds its gradient to the marginal score,
s(x | y) = s(x) + gamma * grad_x log p(y | x), and the guided score is turned back into the
denoiser's probabilities, in which the Euler step in alpha is written. On the Dirichlet
path both conversions are closed form (flowkit.paths.dirichlet), so the correction is

    p <- p + gamma / (alpha - 1) * x * (g - <x, g>),        g = grad_x log p(y | x),

with no division by x (finite on the faces of the simplex). At alpha = 1 (t = 1, the first
step of every run) the quotient is 0/0, since every class has the same flat Dirichlet and g
vanishes, but its limit is finite (gamma dg/dalpha): it is taken as a forward difference of
the classifier's gradient over ALPHA_EPS in alpha (one more classifier call on that step).
A strong gamma can push a letter below 0: the result is projected onto the simplex, as in
the paper's code. The target class
is the conditional branch's class (the prompt), or `target` (a class index) for all samples.
The classifier is the model's own (`denoiser.classifier_logits(x, t)`; the dna model ships
one); its evaluations are not denoiser evaluations and do not count as NFE.
"""

from __future__ import annotations

import torch

from flowkit.errors import InputError
from flowkit.guidance_base import Guidance
from flowkit.paths.categorical import project_simplex
from flowkit.registry import GUIDANCE

__all__ = ["DirichletClassifierGuidance", "ALPHA_EPS"]

ALPHA_EPS = 1e-4  # below alpha = 1 + ALPHA_EPS the correction is its limit at alpha = 1 (a forward difference)


@GUIDANCE.register
class DirichletClassifierGuidance(Guidance):
    name = "dirichlet-classifier"
    description = "classifier guidance on the Dirichlet path: a noisy classifier's gradient added to the score"
    role = "corrector"
    path_kinds = ("discrete",)

    def __init__(self, *, scale: float = 1.0, target: int | None = None, start: float = 0.0, stop: float = 1.0):
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
            raise ValueError(f"target must be a class index >= 0 or none, got {target!r}")
        self.scale = float(scale)
        self.target = target

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason is not None:
            return reason
        if ctx.denoiser.path.name != "dirichlet":
            return f"{self.name} needs the Dirichlet path's score; this model is on the {ctx.denoiser.path.name} path"
        if getattr(ctx.denoiser, "classifier", None) is None:
            return f"{self.name} needs a model with a noisy classifier (the dna model ships one); this model has none"
        return None

    def _labels(self, ctx, batch: int) -> torch.Tensor:
        if self.target is not None:
            return torch.full((batch,), self.target, dtype=torch.long)
        return ctx.conds["cond"]["class_labels"].long()

    def _grad(self, ctx, x, t, y):
        """grad_x log p(y | x) [B, L, V] (float64) of the model's classifier at flowkit times t [B]."""
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logits = ctx.denoiser.classifier_logits(xg, t)
            if not (0 <= int(y.min()) and int(y.max()) < logits.shape[-1]):
                raise InputError(f"{self.name}: target class outside the classifier's {logits.shape[-1]} classes")
            logp = torch.log_softmax(logits.double(), dim=-1).gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(logp, xg)
        return g.double()

    def correct(self, ctx, x, pred, preds):
        if self.scale == 0.0:
            return pred
        path = ctx.denoiser.path
        y = self._labels(ctx, x.shape[0]).to(x.device)
        t = ctx.t.double().cpu().reshape(-1)
        alpha = path.alpha(t)  # [B] float64
        g = self._grad(ctx, x, t, y)
        point = pred.point
        near = alpha < 1.0 + ALPHA_EPS
        if bool(near.any()):
            # g / (alpha - 1) is 0/0 at alpha = 1; its limit is dg/dalpha there, taken as the
            # forward difference (g(alpha + eps) - g(alpha)) / eps (the paper's code evaluates at
            # alpha + 1e-4); subtracting g(alpha) cancels what a learned classifier wrongly reads
            # at alpha = 1 instead of amplifying it 1/eps times.
            t_hi = torch.where(near, path.time_from_alpha(alpha + ALPHA_EPS), t)
            g_hi = self._grad(ctx, x, t_hi, y)
            g = torch.where(near.to(x.device)[:, None, None], g_hi - g, g)
            point = path.at(torch.where(near, path.time_from_alpha(torch.full_like(alpha, 1.0 + ALPHA_EPS)), t))
        tilted = path.classifier_tilt(pred.probs, x, point, self.scale * g)
        return pred.replace(project_simplex(tilted).to(pred.value.dtype))
