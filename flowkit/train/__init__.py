"""Training targets of `flowkit train`: the small models this project trains and ships."""

from __future__ import annotations

from typing import Callable

from flowkit.train.loop import TrainConfig, TrainTask, train

__all__ = ["TARGETS", "TrainConfig", "TrainTask", "train", "target"]


def _shapes() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.shapes import ShapesTask

    task = ShapesTask(total_steps=16000)
    return task, TrainConfig(steps=16000, batch_size=32, lr=3e-4, warmup=500, ema_decay=0.999, ckpt_every=200)


def _classifier() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.classifier import ClassifierTask

    return ClassifierTask(), TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                                         ckpt_every=250)


def _counter() -> tuple[TrainTask, TrainConfig]:
    from flowkit.train.counter import CounterTask

    return CounterTask(), TrainConfig(steps=2000, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.999,
                                      ckpt_every=250)


# name -> factory of (task, default config); later issues add dna, simplex.
TARGETS: dict[str, Callable[[], tuple[TrainTask, TrainConfig]]] = {
    "shapes": _shapes,
    "classifier": _classifier,
    "counter": _counter,
}


def target(name: str) -> tuple[TrainTask, TrainConfig]:
    if name not in TARGETS:
        raise ValueError(f"unknown training target {name!r}; known: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]()
