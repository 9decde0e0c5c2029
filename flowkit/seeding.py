"""Seeds: one function of (seed, index) gives every image its own CPU generator.

`flowkit.sample`, `flowkit generate` and `flowkit batch` all seed image `index` of a run
with `seed_for(seed, index)`, draw its noise on the CPU and move it to the device, so an
image never depends on its batch partners, the batch size, the device or how a batch job
is sharded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["seed_for", "generators_for", "randn_per_sample"]


def seed_for(seed: int, index: int) -> int:
    """The seed of image `index` of a run with base `seed` (a 63-bit hash of both)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def generators_for(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed_for(seed, i)) for i in indices]


def randn_per_sample(shape: Sequence[int], generators: Sequence[torch.Generator],
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise [len(generators), *shape]: row i drawn on the CPU from generators[i], then moved."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)
