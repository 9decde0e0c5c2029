"""Samplers (installed as `flowkit.samplers`); one registered sampler per file.

Each file registers its sampler with `@SAMPLERS.register`; the registry finds every file
of this folder, so a new sampler is one file. `available()` lists every registered
sampler, built-in or from a plugin; `from flowkit.samplers import Euler` looks the class
up by its Python name.
"""

from typing import Any

from flowkit.registry import SAMPLERS
from flowkit.sampler_base import Sampler, SimplexSampler

__all__ = ["Sampler", "SimplexSampler", "available", "get"]


def available() -> dict[str, str]:
    """Registered sampler names with their one-line descriptions."""
    return SAMPLERS.describe()


def get(name: str) -> type:
    """The sampler class registered as `name`."""
    return SAMPLERS.get(name)


def __getattr__(name: str) -> Any:
    cls = SAMPLERS.find_class(name) if name[:1].isupper() else None
    if cls is None:
        raise AttributeError(f"module 'flowkit.samplers' has no attribute {name!r}")
    return cls


def __dir__() -> list[str]:
    return sorted(set(__all__) | {cls.__name__ for cls in SAMPLERS})
