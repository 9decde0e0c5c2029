"""The shapes world's rewards (flowkit.rewards), on images in [-1, 1] and their captions.

- `count`: minus the squared error of the shipped counter's per-group counts against the
  caption's (every one of the 12 groups: unasked groups should count 0);
- `presence`: the log-likelihood of the caption's groups under the classifier's presence head
  (asked groups present, the others absent);
- `class`: the mean log-softmax of the asked groups under the classifier's class head;
- `oracle`: the exact analytic evaluator (not differentiable): the share of the caption's
  checks (presence, exact count, binding) the image passes; a labelled oracle, never the
  reward that a held-out score is measured with.
A prompt that is not a caption of the world asks for nothing (`count`: every count should be
0; `presence`: every group absent; `class`, `oracle`: score 0).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowkit.errors import InputError
from flowkit.registry import REWARDS
from flowkit.rewards import Reward

__all__ = ["CountReward", "PresenceReward", "ClassReward", "OracleReward", "class_logits", "group_counts"]


@functools.lru_cache(maxsize=4)
def _classifier(device: str):
    from flowkit.worlds.shapes_nets import load_classifier

    return load_classifier().to(device).requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _counter(device: str):
    from flowkit.worlds.shapes_nets import load_counter

    return load_counter().to(device).requires_grad_(False)


def _asked(prompts: Sequence[str] | None, batch: int, device: torch.device) -> Tensor:
    """[B, 12] asked count of each group (0: not asked)."""
    from flowkit.worlds.shapes import GROUPS, asked_counts

    if prompts is None:
        raise InputError("the shapes rewards score an image against its caption: give the prompts")
    out = torch.tensor(asked_counts(prompts), dtype=torch.float32, device=device)
    return out.reshape(batch, len(GROUPS))


def class_logits(images: Tensor) -> Tensor:
    """The shipped classifier's class logits [B, 12] of images in [-1, 1] (what the `class`
    reward and GFCG read; differentiable in the images)."""
    net = _classifier(str(images.device))
    return net.class_logits(images.to(_dtype(net)))


def group_counts(images: Tensor) -> Tensor:
    """The shipped counter's counts [B, 12] of images in [-1, 1] (what the `count` reward and
    counting guidance read; differentiable in the images)."""
    net = _counter(str(images.device))
    return net(images.to(_dtype(net)))


def _dtype(net: torch.nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


class _ShapesReward(Reward):
    family = "shapes"

    def _net_input(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"{self.name}: give images [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        return images


@REWARDS.register
class CountReward(_ShapesReward):
    name = "count"
    description = "shapes: minus the squared error of the counter's per-group counts against the caption's"

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        x = self._net_input(images)
        counts = group_counts(x)  # [B, 12]
        asked = _asked(prompts, x.shape[0], x.device)
        return -((counts - asked.to(counts.dtype)) ** 2).sum(dim=1).to(images.dtype)


@REWARDS.register
class PresenceReward(_ShapesReward):
    name = "presence"
    description = "shapes: log-likelihood of the caption's groups under the classifier's presence head"

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        x = self._net_input(images)
        net = _classifier(str(x.device))
        logits = net.presence_logits(x.to(_dtype(net)))  # [B, 12]
        present = (_asked(prompts, x.shape[0], x.device) > 0).to(logits.dtype)
        ll = -F.binary_cross_entropy_with_logits(logits, present, reduction="none").sum(dim=1)
        return ll.to(images.dtype)


@REWARDS.register
class ClassReward(_ShapesReward):
    name = "class"
    description = "shapes: mean log-softmax of the caption's groups under the classifier's class head"

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        x = self._net_input(images)
        logp = torch.log_softmax(class_logits(x), dim=1)  # [B, 12]
        asked = (_asked(prompts, x.shape[0], x.device) > 0).to(logp.dtype)
        n = asked.sum(dim=1)
        mean = (logp * asked).sum(dim=1) / n.clamp_min(1)
        return torch.where(n > 0, mean, torch.zeros_like(mean)).to(images.dtype)


@REWARDS.register
class OracleReward(_ShapesReward):
    name = "oracle"
    description = "shapes: the exact evaluator's share of caption checks passed (not differentiable; an oracle)"
    differentiable = False

    def score(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        from flowkit.worlds import shapes as world
        from flowkit.worlds.shapes_eval import evaluate

        x = self._net_input(images).detach().float().cpu()
        if prompts is None:
            raise InputError("the shapes rewards score an image against its caption: give the prompts")
        out = []
        for img, text in zip(x, prompts):
            try:
                caption = world.parse_caption(text)
            except ValueError:
                out.append(0.0)
                continue
            scores = evaluate(img, caption)
            checks = [scores[k] for k in ("presence", "exact_count", "binding") if scores.get(k) is not None]
            out.append(sum(map(float, checks)) / len(checks) if checks else 0.0)
        return torch.tensor(out, dtype=images.dtype, device=images.device)
