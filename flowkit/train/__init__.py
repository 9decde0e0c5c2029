"""Training targets of `flowkit train`: the small models this project trains and ships.

Each target registers itself in `flowkit.registry.TRAIN_TARGETS` where its task is defined
(`TrainTarget(name, description, make)`, `make() -> (task, default TrainConfig)`);
`target(name)` builds one.
"""

from __future__ import annotations

from typing import Any

from flowkit.registry import TRAIN_TARGETS
from flowkit.train.loop import TrainConfig, TrainTarget, TrainTask, train

__all__ = ["TrainConfig", "TrainTarget", "TrainTask", "train", "target", "targets"]


def targets() -> dict[str, str]:
    """Registered target names with their one-line descriptions."""
    return TRAIN_TARGETS.describe()


def target(name: str) -> tuple[Any, TrainConfig]:
    """(task, default config) of the target `name`; UnknownNameError lists the known ones."""
    return TRAIN_TARGETS.get(name).make()
