"""What the particle samplers (rbf, bon, smc) share: a reward scored on clean images, the SDE
that moves particles, and particles per image. Not a sampler itself (the registry skips
modules whose name starts with '_').

Rows are particles and `ctx.ledger` charges every evaluation to its image, so an image's
`stats.nfe` sums all its particles. Randomness comes from each row's own generator
(`ctx.generators`), and a row that is not evaluated draws nothing, so an image never
depends on its batch partners.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from flowkit.errors import InputError
from flowkit.registry import REWARDS
from flowkit.rewards import Reward, build_reward
from flowkit.sampler_base import Sampler, euler_step, sde_scale, sde_step
from flowkit.seeding import randn_per_sample

if TYPE_CHECKING:
    from flowkit.context import Context
    from flowkit.prediction import Prediction

__all__ = ["ParticleSampler", "spawn", "keep_best", "noise_for", "check_count"]


def _label(reward: Any) -> str:
    """What a reward is written as in the sampler's spec: its text, a registered reward's name, else 'custom'."""
    if isinstance(reward, str):
        return reward
    name = getattr(reward, "name", None)
    if isinstance(reward, Reward) and isinstance(name, str) and name in REWARDS and type(reward) is REWARDS.get(name):
        return name
    return "custom"


class ParticleSampler(Sampler):
    """Base of the samplers that score particles with a reward (`reward`: a registered name or
    spec, a `flowkit.rewards.Reward`, or a function of images) on the clean image the model
    predicts (`ctx.kit.to_pixels`), and move them with the flow's SDE (`frame`, `c`, `power`:
    see `flowkit.sampler_base.sde_step`; the paper's defaults, frame=vp with g = 3 r^2)."""

    def __init__(self, *, reward: Any = "count", frame: Literal["linear", "vp"] = "vp", c: float | None = None, power: float = 2.0,
                 grid: str | None = None):
        super().__init__(grid=grid)
        self._c = sde_scale(c, power, frame)
        self.c, self.power, self.frame = c, float(power), frame
        self._reward: Reward = build_reward(reward)
        self.reward = _label(reward)

    def with_reward(self, reward: Any) -> "ParticleSampler":
        """A copy of this sampler that scores with `reward` (what `flowkit.sample(reward=...)` uses)."""
        out = copy.copy(self)
        out._reward, out.reward = build_reward(reward), _label(reward)
        return out

    def refuse(self, ctx: "Context") -> str | None:
        reason = super().refuse(ctx)
        if reason:
            return reason
        if ctx.kit is None or ctx.kit.to_pixels is None:
            return f"sampler {self.name} scores the model's clean images, and this model family hands no decoder to pixels"
        family = getattr(self._reward, "family", None)
        if family is not None and ctx.kit.family != family:
            return (f"sampler {self.name}: reward {self._reward.name!r} scores {family} images, and this is a "
                    f"{ctx.kit.family} model: give a reward of your own (reward=..., flowkit.rewards.Reward.from_fn)")
        return None

    def score(self, ctx: "Context", x0: Tensor, rows: Tensor | None = None) -> Tensor:
        """The reward of clean images x0 [B, ...] (flow frame) on `rows` [B] (bool; None: all),
        as float64 [B] on the CPU, -inf elsewhere. One reward call (`stats.reward_calls`)."""
        B = x0.shape[0]
        out = torch.full((B,), float("-inf"), dtype=torch.float64)
        index = torch.arange(B) if rows is None else rows.cpu().nonzero().flatten()
        if len(index) == 0:
            return out
        prompts = None if ctx.prompts is None else [ctx.prompts[i] for i in index.tolist()]
        with torch.no_grad():
            images = ctx.kit.to_pixels(x0[index.to(x0.device)].detach().float())
            r = self._reward(images, prompts).detach().to("cpu", torch.float64)
        ctx.reward_calls += 1
        if bool(torch.isnan(r).any()):
            raise InputError(f"sampler {self.name}: the reward {self.reward!r} gave NaN")
        out[index] = r
        return out

    def move(self, x: Tensor, t: float, t_next: float, pred: "Prediction", noise: Tensor | None) -> Tensor:
        """The SDE step from t to t_next with `noise` (deterministic Euler into t = 0, no noise)."""
        if t_next == 0.0 or noise is None:
            return euler_step(x, t, t_next, pred)
        return sde_step(x, t, t_next, pred, noise, c=self._c, power=self.power, frame=self.frame)


def noise_for(ctx: "Context", x: Tensor, rows: Tensor | None = None) -> Tensor:
    """Unit noise like x [B, ...] on `rows` [B] (bool; None: all), each row from its own
    generator; rows left out draw nothing and get zeros."""
    if rows is None or bool(rows.all()):
        return ctx.randn_like(x)
    out = torch.zeros_like(x)
    index = rows.cpu().nonzero().flatten().tolist()
    if index:
        out[index] = randn_per_sample(x.shape[1:], [ctx.generators[i] for i in index], ctx.device, x.dtype)
    return out


def spawn(sampler: Sampler, ctx: "Context", x: Tensor, ts: Tensor, n: int) -> Tensor:
    """n particles per image, image-major [B * n, ...]: particle 0 is the image's own start,
    the others start from noise drawn from the image's generator; the rows become the
    particles (`ctx.reindex`: conditionings, prompts, module state and the ledger follow, and
    each particle gets a generator of its own)."""
    B = x.shape[0]
    starts = [x] + [sampler.initial_state(ctx.randn_like(x), ts, ctx) for _ in range(n - 1)]
    xs = torch.stack(starts, dim=1).reshape((B * n,) + tuple(x.shape[1:]))
    ctx.reindex(torch.arange(B).repeat_interleave(n))
    return xs


def keep_best(ctx: "Context", x: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Each image's particle of the highest reward (the first on ties), as the batch of images."""
    B = x.shape[0] // n
    index = torch.arange(B) * n + rewards.view(B, n).argmax(dim=1)
    ctx.reindex(index)
    return x[index.to(x.device)]


def check_count(name: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}")
    return value
