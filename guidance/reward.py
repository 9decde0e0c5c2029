"""Reward guidance: follow a differentiable reward's gradient while sampling.

A corrector, in the form of classifier guidance with log p = R (Dhariwal & Nichol, "Diffusion
Models Beat GANs on Image Synthesis", eq. 14: eps' = eps - sqrt(1 - abar) grad_x log p),
written with the path's alpha and sigma (x = alpha x0 + sigma eps) so it is the same step for
epsilon, x0 and velocity models:

    eps' = eps - s * sigma * g,    i.e.   x0' = x0 + s * (sigma^2 / alpha) * g,     g ~ grad_x R

- `grad="x0"`: R is differentiated through the decoder only, on the predicted clean image,
  with the network's output held fixed (x0 = (x - sigma eps) / alpha): g = dR/dx0 / alpha, so
  x0' = x0 + s (sigma / alpha)^2 dR/dx0 (no extra evaluation; one backward, through
  `to_pixels` and the reward);
- `grad="xt"`: the DPS / FreeDoM form (Chung et al., "Diffusion Posterior Sampling", Alg. 1;
  Yu et al., "FreeDoM", eq. 9): g = dR(x0_theta(x_t))/dx_t through the network (one extra
  evaluation of the conditional branch with gradients, +1 NFE a step, and its backward),
  scaled by its norm, g <- g / ||g|| per sample, so `scale` is the step's length.
Rows where alpha = 0 (t = 1 on the linear path) are left unguided (the step is infinite
there). A reward that is not differentiable is refused.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from flowkit.errors import InputError
from flowkit.guidance_base import BranchPredictions, Guidance
from flowkit.prediction import Prediction
from flowkit.registry import GUIDANCE
from flowkit.rewards import Reward, build_reward

__all__ = ["RewardGuidance"]

BRANCH = "reward"


@GUIDANCE.register
class RewardGuidance(Guidance):
    name = "reward"
    description = "reward guidance: a differentiable reward's gradient on the clean image (x0) or the state (xt)"
    role = "corrector"

    def __init__(self, *, reward: Any = "count", scale: float = 1.0, grad: Literal["x0", "xt"] = "x0",
                 start: float = 0.0, stop: float = 1.0):
        """reward: a registered reward (name or spec), a Reward or a function of images; scale:
        s; grad: "x0" (decoder and reward only) or "xt" (through the network, normalised)."""
        super().__init__(start=start, stop=stop)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if grad not in ("x0", "xt"):
            raise ValueError(f"grad must be 'x0' or 'xt', got {grad!r}")
        self._reward: Reward = build_reward(reward)
        if not getattr(self._reward, "differentiable", False):
            raise ValueError(f"reward {self._reward.name!r} is not differentiable: reward guidance follows a "
                             "gradient; use a differentiable reward (or a particle sampler, which only scores)")
        self.reward = reward if isinstance(reward, str) else "custom"
        self.scale, self.grad = float(scale), grad

    @property
    def extra_branches(self) -> int:
        return 1 if self.grad == "xt" else 0

    def refuse(self, ctx) -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        if ctx.kit is None or ctx.kit.to_pixels is None:
            return "reward guidance needs the model's decoder to pixels, and this model family hands none"
        family = getattr(self._reward, "family", None)
        if family is not None and ctx.kit.family != family:
            return (f"reward {self._reward.name!r} scores {family} images, and this is a {ctx.kit.family} model: "
                    "give a reward of your own (flowkit.rewards.Reward.from_fn)")
        return None

    def correct(self, ctx, x: Tensor, pred: Prediction, preds: BranchPredictions) -> Prediction:
        if not self.scale:
            return pred
        shape = (-1,) + (1,) * (x.ndim - 1)
        alpha = pred.point.alpha.to(device=x.device, dtype=torch.float64).view(shape)
        sigma = pred.point.sigma.to(device=x.device, dtype=torch.float64).view(shape)
        ok = alpha > 0
        safe = torch.where(ok, alpha, torch.ones_like(alpha))
        if self.grad == "x0":
            g0 = self._grad_x0(ctx, pred.x0.detach())
            step = torch.where(ok, self.scale * (sigma / safe) ** 2 * g0.double(), torch.zeros_like(alpha))
        else:
            g = self._grad_xt(ctx, x)
            step = torch.where(ok, self.scale * sigma ** 2 / safe * g.double(), torch.zeros_like(alpha))
        moved = (step != 0).flatten(1).any(dim=1).view(shape)
        new = pred.with_x0((pred.x0.double() + step).to(pred.value.dtype))
        return pred.replace(torch.where(moved, new.value, pred.value))

    def _grad_x0(self, ctx, x0: Tensor) -> Tensor:
        with torch.enable_grad():
            x0g = x0.float().requires_grad_(True)
            r = self._reward(ctx.kit.to_pixels(x0g), ctx.prompts)
            (g,) = torch.autograd.grad(r.sum(), x0g)
        ctx.reward_calls += 1
        ctx.backward_calls += 1
        return g

    def _grad_xt(self, ctx, x: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            p = ctx.evaluate(xg, ctx.t, ctx.conds["cond"], BRANCH, grad=True)
            r = self._reward(ctx.kit.to_pixels(p.x0.float()), ctx.prompts)
            (g,) = torch.autograd.grad(r.sum(), xg)
        ctx.reward_calls += 1
        ctx.backward_calls += 1
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view((-1,) + (1,) * (g.ndim - 1))
        if not torch.isfinite(g).all():
            raise InputError("reward guidance: the reward's gradient is not finite")
        return g / norm
