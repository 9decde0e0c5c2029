"""Rewards: scores of images (or sequences) and their prompts, higher is better.

A reward maps images in [-1, 1] [B, 3, H, W] and the run's prompts (one per image, or None
where only embeddings were given) to scores [B], and says whether it is differentiable in the
images. Rewards are shared by reward guidance (guidance/reward.py), reward backpropagation
(`flowkit.finetune`, `flowkit train alignprop`) and inference-time scaling (the particle
samplers), which look them up by name in the registry (`flowkit.registry.REWARDS`, entry-point
group `flowkit.rewards`). The shapes world ships `count`, `presence`, `class` and the exact
evaluator as the non-differentiable `oracle`; `Reward.from_fn` wraps a function of one's own
(an aesthetic predictor, HPS, ImageReward).

A method that calls a reward counts it in `stats.reward_calls` (a reward call is not an NFE).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor

from flowkit.errors import InputError, SpecError
from flowkit.registry import REWARDS

__all__ = ["Reward", "FunctionReward", "build_reward", "available"]


class Reward:
    """Base of rewards: `reward(images, prompts) -> [B]` scores, higher is better.

    Subclasses set `name`, `description` and `differentiable`, take their options as
    keyword-only constructor arguments (the spec grammar builds them: `count`, `class:...`),
    and implement `score`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    differentiable: ClassVar[bool] = True
    family: ClassVar[str | None] = None  # the model family whose images it scores (None: any)

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim < 2:
            raise InputError(f"{self.name or 'reward'}: give images as a tensor [B, ...], got "
                             f"{type(images).__name__}")
        if prompts is not None and len(prompts) != images.shape[0]:
            raise InputError(f"{self.name or 'reward'}: {len(prompts)} prompts for {images.shape[0]} images")
        out = self.score(images, prompts)
        if not isinstance(out, Tensor) or out.shape != images.shape[:1]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"{self.name or 'reward'} must give one score per image [B], got {shape}")
        return out

    @staticmethod
    def from_fn(fn: Callable[..., Tensor], *, differentiable: bool, name: str = "custom",
                takes_prompts: bool | None = None) -> "FunctionReward":
        """A reward from `fn(images[, prompts]) -> [B]` (prompts passed when `fn` takes two
        arguments, or when `takes_prompts`)."""
        return FunctionReward(fn, differentiable=differentiable, name=name, takes_prompts=takes_prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FunctionReward(Reward):
    """A reward made from a function (see `Reward.from_fn`); not registered."""

    name = "custom"
    description = "a reward made from a function"

    def __init__(self, fn: Callable[..., Tensor], *, differentiable: bool, name: str = "custom",
                 takes_prompts: bool | None = None):
        if not callable(fn):
            raise InputError(f"a reward function must be callable, got {type(fn).__name__}")
        self.fn, self.label = fn, name
        self.differentiable = bool(differentiable)  # type: ignore[misc]  (per instance here)
        if takes_prompts is None:
            import inspect

            try:
                params = [p for p in inspect.signature(fn).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                takes_prompts = len(params) >= 2
            except (TypeError, ValueError):
                takes_prompts = False
        self.takes_prompts = takes_prompts

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        return self.fn(images, prompts) if self.takes_prompts else self.fn(images)

    def __repr__(self) -> str:
        return f"Reward.from_fn({self.label}, differentiable={self.differentiable})"


def build_reward(reward: Any) -> Reward:
    """A reward from a registered name or spec ("count"), a Reward, or a callable (taken as
    differentiable; wrap it with `Reward.from_fn` to say otherwise)."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        built = REWARDS.build(reward)
        if len(built) != 1:
            raise SpecError(f"give exactly one reward, got {len(built)} in {reward!r}")
        return built[0]
    if callable(reward):
        return Reward.from_fn(reward, differentiable=True)
    raise InputError(f"a reward is a registered name (one of {', '.join(REWARDS.names()) or 'none'}), a Reward "
                     f"or a function of images; got {type(reward).__name__}")


def available() -> dict[str, str]:
    """Registered reward names with their one-line descriptions."""
    return REWARDS.describe()
