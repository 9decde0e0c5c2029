"""The processes of a batch run, through accelerate's `PartialState`.

Under ``accelerate launch`` each process learns its rank and the world size from the
launcher's environment. Without a GPU the state must be built with ``cpu=True``, or every
process of ``accelerate launch --multi_gpu --num_processes N`` believes it is alone (and
without ``--multi_gpu`` accelerate 1.x starts a single process). A plain ``flowkit batch``
is one process: rank 0 of 1. If accelerate is not installed, a run is always one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Processes", "processes"]


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device
    state: Any = None  # accelerate.PartialState, or None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def processes() -> Processes:
    """This process's rank, the world size and the device to sample on."""
    cuda = torch.cuda.is_available()
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return Processes(0, 1, torch.device("cuda" if cuda else "cpu"))
    state = PartialState(cpu=not cuda)
    device = torch.device(state.device) if cuda else torch.device("cpu")
    return Processes(int(state.process_index), int(state.num_processes), device, state)
