"""Training targets of `flowkit train`: the small models this project trains and ships."""

from __future__ import annotations

from typing import Callable

from flowkit.train.loop import TrainConfig, TrainTask, train

__all__ = ["TARGETS", "TrainConfig", "TrainTask", "train", "target"]


def _shapes() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.shapes import ShapesTask

    task = ShapesTask(total_steps=16000)
    return task, TrainConfig(steps=16000, batch_size=32, lr=3e-4, warmup=500, ema_decay=0.999, ckpt_every=200)


# name -> factory of (task, default config); later issues add classifier, counter, dna, simplex.
TARGETS: dict[str, Callable[[], tuple[TrainTask, TrainConfig]]] = {"shapes": _shapes}


def target(name: str) -> tuple[TrainTask, TrainConfig]:
    if name not in TARGETS:
        raise ValueError(f"unknown training target {name!r}; known: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]()
