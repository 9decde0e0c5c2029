"""Training targets of `flowkit train`: the small models this project trains and ships.

Each target registers itself in `flowkit.registry.TRAIN_TARGETS` where its task is defined
(`TrainTarget(name, description, make)`, `make() -> (task, default TrainConfig)`);
`target(spec)` builds one: a name, or a name with options (`alignprop:reward=count,k=2`, the
spec grammar of flowkit.spec) for a target that declares them.
"""

from __future__ import annotations

from typing import Any

from flowkit.registry import TRAIN_TARGETS
from flowkit.train.loop import TrainConfig, TrainTarget, TrainTask, train

__all__ = ["TrainConfig", "TrainTarget", "TrainTask", "train", "target", "targets"]


def targets() -> dict[str, str]:
    """Registered target names with their one-line descriptions."""
    return TRAIN_TARGETS.describe()


def target(spec: str) -> tuple[Any, TrainConfig]:
    """(task, default config) of the target `spec` (a name, or `name:key=value,...`);
    UnknownNameError lists the known ones, SpecError names a bad option."""
    from flowkit.errors import SpecError
    from flowkit.spec import check_params, parse

    if ":" not in spec:
        return TRAIN_TARGETS.get(spec).make()
    items = parse(spec)
    if len(items) != 1:
        raise SpecError(f"give one training target, got {len(items)} in {spec!r}")
    item = items[0]
    entry = TRAIN_TARGETS.get(item.name)
    if entry.options is None:
        raise SpecError(f"training target {item.name!r} takes no options; give its name alone")
    options = entry.options

    class _Options:  # what check_params looks names up in: the target's options class
        @staticmethod
        def get(name: str) -> type:
            return options

    return entry.make(**check_params(_Options, item.name, item.params))
