"""A model output together with the path and state it was made at.

A `Prediction` keeps the network's raw output (`value`, of type `kind`) and the native
state and coefficients it refers to, and converts to x0 / noise / flow velocity on demand,
so a guidance method states the space it works in and a sampler takes what its update
rule needs. x0 and noise do not depend on the frame; the flow velocity `noise - x0` is the
time derivative of the flow-frame state.

Discrete paths use kind "probs": categorical probabilities over the vocabulary
[..., K]; their `x0` is the expected one-hot vector (the probabilities themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flowkit.paths.convert import canonical, from_x0_eps, to_x0_eps

if TYPE_CHECKING:
    from flowkit.paths.base import Path, PathPoint

__all__ = ["Prediction"]


@dataclass(frozen=True)
class Prediction:
    """value [B, ...] of type `kind` made at native state `x` [B, ...] on `path` at `point`."""

    value: Tensor
    kind: str
    x: Tensor
    point: "PathPoint"
    path: "Path"

    def __post_init__(self) -> None:
        if self.kind != "probs":
            object.__setattr__(self, "kind", canonical(self.kind))

    @property
    def t(self) -> Tensor:
        return self.point.t

    @property
    def is_discrete(self) -> bool:
        return self.kind == "probs"

    def _x0_eps(self) -> tuple[Tensor, Tensor]:
        if self.is_discrete:
            raise TypeError("a categorical prediction has no Gaussian noise; use .probs or .x0")
        return to_x0_eps(self.kind, self.value, self.x, self.point.alpha, self.point.sigma)

    @property
    def x0(self) -> Tensor:
        if self.is_discrete or self.kind == "x0":
            return self.value
        return self._x0_eps()[0]

    @property
    def eps(self) -> Tensor:
        if self.kind == "epsilon":
            return self.value
        return self._x0_eps()[1]

    @property
    def velocity(self) -> Tensor:
        """d x_flow / d t = noise - x0 (the linear path's velocity)."""
        if self.kind == "velocity":
            return self.value
        x0, eps = self._x0_eps()
        return eps - x0

    @property
    def probs(self) -> Tensor:
        if not self.is_discrete:
            raise TypeError(f"a {self.kind} prediction has no categorical probabilities")
        return self.value

    def as_kind(self, kind: str) -> Tensor:
        """The prediction expressed as type `kind`."""
        if kind == self.kind:
            return self.value
        if kind == "probs" or self.is_discrete:
            raise TypeError(f"cannot convert a {self.kind} prediction to {kind}")
        x0, eps = self._x0_eps()
        return from_x0_eps(kind, x0, eps, self.point.alpha, self.point.sigma)

    def replace(self, value: Tensor, kind: str | None = None) -> "Prediction":
        """The same state with a new prediction (e.g. a guided combination)."""
        return replace(self, value=value, kind=kind or self.kind)

    def with_x0(self, x0: Tensor) -> "Prediction":
        """A prediction of clean data x0, kept in this prediction's type."""
        if self.is_discrete:
            return self.replace(x0)
        return self.replace(x0.to(self.value.dtype), "x0").converted(self.kind)

    def converted(self, kind: str) -> "Prediction":
        return self.replace(self.as_kind(kind), kind)

    def select(self, index: Tensor | slice) -> "Prediction":
        """Rows `index` of the batch (value, state and path point); a slice gives views."""
        from flowkit.paths.base import PathPoint

        p = self.point
        point = PathPoint(p.t[index], p.alpha[index], p.sigma[index], p.timestep[index])
        return Prediction(self.value[index], self.kind, self.x[index], point, self.path)

    @staticmethod
    def cat(preds: list["Prediction"]) -> "Prediction":
        from flowkit.paths.base import PathPoint

        first = preds[0]
        point = PathPoint(*(torch.cat([getattr(p.point, f) for p in preds]) for f in ("t", "alpha", "sigma", "timestep")))
        return Prediction(torch.cat([p.value for p in preds]), first.kind, torch.cat([p.x for p in preds]),
                          point, first.path)
