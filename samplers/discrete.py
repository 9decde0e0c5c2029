"""The discrete Euler (jump) sampler of discrete flow matching (Gat et al., "Discrete Flow
Matching", NeurIPS 2024, Algorithm 1 on the mixture path of eq. 5).

Per step from t to t_next each position jumps with probability
lambda = (kappa(t_next) - kappa(t)) / (1 - kappa(t)) (the mixture path's velocity
kappa' / (1 - kappa) (p_{1|t} - delta), eq. 13, integrated over the step) to a letter drawn
from the denoiser p_{1|t}; with the masked source an unmasked letter never changes. The last
step has lambda = 1: every remaining position is drawn (or takes its most likely letter,
`final="argmax"`). Uniforms come from the loop's per-sample Gaussian noise.
"""

from __future__ import annotations

import torch

from flowkit.paths.categorical import (
    categorical_from_normal,
    one_hot,
    uniform_from_normal,
)
from flowkit.registry import SAMPLERS
from flowkit.sampler_base import SimplexSampler

__all__ = ["DiscreteEuler"]


@SAMPLERS.register
class DiscreteEuler(SimplexSampler):
    name = "discrete"
    description = "discrete flow matching: Euler jumps on the mixture path (masked or uniform source)"
    path_name = "mixture"

    def update(self, model, x, probs, t, t_next, last=False):
        path = model.ctx.denoiser.path
        lam = 1.0 if last else path.jump_probability(t, t_next)
        z = model.ctx.randn((x.shape[1], 2)).to(x.device)  # [B, L, 2]: jump?, which letter
        current = x.argmax(dim=-1)
        if self.final == "argmax" and last:
            drawn = probs.argmax(dim=-1)
        else:
            drawn = categorical_from_normal(probs, z[..., 1])
        jump = uniform_from_normal(z[..., 0]) < lam
        if path.mask_index is not None:
            jump = jump & (current == path.mask_index)  # unmasked letters stay
        return one_hot(torch.where(jump, drawn, current), x.shape[-1], x.dtype)

    def finish(self, model, probs, x):
        """The last step jumps every letter still to move (probability 1)."""
        return self.update(model, x, probs, 0.0, 0.0, last=True)
