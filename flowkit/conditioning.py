"""Conditioning of one branch: batch-first tensors plus shared (unbatched) extras."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["Conditioning"]


@dataclass(frozen=True)
class Conditioning:
    """Named tensors whose first dimension is the batch, and unbatched `shared` extras.

    The model adapter reads the names it knows (e.g. `encoder_hidden_states`,
    `pooled_projections`, `text_embeds`, `time_ids`); `shared` holds what every row uses
    alike (e.g. FLUX's text ids). Rows can be selected, concatenated and repeated, which
    is how the sampling loop batches several branches into one forward pass.
    """

    tensors: Mapping[str, Tensor]
    shared: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning tensors disagree on batch size: {sizes}")

    def __len__(self) -> int:
        for v in self.tensors.values():
            return int(v.shape[0])
        return 0

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.tensors.get(name, default)

    def select(self, index: Tensor | slice | list[int]) -> "Conditioning":
        return Conditioning({k: v[index] for k, v in self.tensors.items()}, self.shared)

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()}, self.shared)

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)

        return Conditioning({k: move(v) for k, v in self.tensors.items()}, self.shared)

    def replace(self, **tensors: Tensor) -> "Conditioning":
        return Conditioning({**self.tensors, **tensors}, self.shared)

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        keys = list(conds[0].tensors)
        for c in conds[1:]:
            if list(c.tensors) != keys:
                raise ValueError(f"cannot batch conditionings with different fields: {keys} vs {list(c.tensors)}")
        return Conditioning({k: torch.cat([c.tensors[k] for c in conds]) for k in keys}, conds[0].shared)
