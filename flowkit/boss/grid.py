"""The `boss` time-grid kind: `grid="boss:TABLE"` walks a BOSS table's best grid for the run's
number of steps, with any ODE sampler (the `boss` sampler finds the model's own table)."""

from __future__ import annotations

from torch import Tensor

from flowkit.boss.table import resolve_table
from flowkit.registry import GRID_KINDS

__all__ = ["BossGrid"]


@GRID_KINDS.register
class BossGrid:
    name = "boss"
    description = "BOSS step sizes from a table written by `flowkit tune boss` (a file or a shipped name)"
    argument = "TABLE"
    missing = ("a boss grid needs a table: boss:FILE or boss:NAME (see `flowkit tune boss`), "
               "or use the sampler 'boss', which finds the model's own")

    @staticmethod
    def times(table: str, steps: int) -> Tensor:
        """The table's best `steps`-step grid (flowkit times, float64, ending in 0)."""
        return resolve_table(table).times(steps)
