"""Guidance modules (installed as `flowkit.guidance`); one method per file.

Each file registers its module with `@GUIDANCE.register`; the registry finds every file of
this folder, so a new module is one file. `available()` lists every registered module,
built-in or from a plugin; `from flowkit.guidance import APG` looks the class up by its
Python name. The base classes live in the core (`flowkit.guidance_base`) and are
re-exported here and from `flowkit.guidance.base`.
"""

from typing import Any

from flowkit.guidance_base import (
    BranchPredictions,
    BranchRequests,
    Guidance,
    GuidanceStack,
)
from flowkit.registry import GUIDANCE

__all__ = ["Guidance", "GuidanceStack", "BranchRequests", "BranchPredictions", "available", "get"]


def available() -> dict[str, str]:
    """Registered guidance module names with their one-line descriptions."""
    return GUIDANCE.describe()


def get(name: str) -> type:
    """The guidance class registered as `name`."""
    return GUIDANCE.get(name)


def __getattr__(name: str) -> Any:
    cls = GUIDANCE.find_class(name) if name[:1].isupper() else None
    if cls is None:
        import importlib

        # helpers a method file exports beside its class (e.g. LinearAGCoefficients): look in each file
        for module in _method_modules():
            value = getattr(importlib.import_module(module), name, None)
            if value is not None and name in getattr(importlib.import_module(module), "__all__", ()):
                return value
        raise AttributeError(f"module 'flowkit.guidance' has no attribute {name!r}")
    return cls


def _method_modules() -> list[str]:
    import pkgutil

    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def __dir__() -> list[str]:
    return sorted(set(__all__) | {cls.__name__ for cls in GUIDANCE})
