"""Name -> class registries for samplers, guidance modules and rewards.

Built-in classes register themselves with a decorator when their module is imported;
third-party packages add theirs through the entry-point groups `flowkit.samplers`,
`flowkit.guidance` and `flowkit.rewards` (each entry point names a class, or a module whose
import registers classes). Every registered class has a `name` and a one-line
`description`, and takes its options as keyword-only constructor arguments with type
hints and defaults: that signature is what specs are checked against.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

from flowkit.errors import UnknownNameError, closest

__all__ = ["Registry", "Param", "SAMPLERS", "GUIDANCE", "REWARDS", "params_of"]

log = logging.getLogger(__name__)
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Param:
    """One keyword option of a registered class."""

    name: str
    annotation: Any
    default: Any
    required: bool


def params_of(cls: type) -> dict[str, Param]:
    """The keyword options of `cls.__init__`, in order."""
    out: dict[str, Param] = {}
    sig = inspect.signature(cls.__init__)
    try:
        hints = __import__("typing").get_type_hints(cls.__init__)
    except Exception:  # pragma: no cover - unresolved forward references
        hints = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is inspect.Parameter.empty
        out[p.name] = Param(p.name, hints.get(p.name, p.annotation), None if required else p.default, required)
    return out


class Registry:
    """A name -> class table with lazy loading of built-ins and entry points."""

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...]):
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: register `cls` under `cls.name`."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
        if not getattr(cls, "description", ""):
            raise TypeError(f"{cls.__qualname__} needs a one-line `description`")
        other = self._classes.get(name)
        if other is not None and other is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered by {other.__module__}.{other.__qualname__}")
        self._classes[name] = cls
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtin_modules:
            importlib.import_module(mod)
        for ep in metadata.entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not break flowkit
                log.warning("could not load %s plugin %r: %s", self.kind, ep.name, e)
                continue
            if inspect.isclass(obj) and obj not in self._classes.values():
                self.register(obj)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._load()
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes))
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{closest(name, self._classes)}; known: {known}"
            ) from None

    def items(self) -> list[tuple[str, type]]:
        self._load()
        return sorted(self._classes.items())

    def describe(self) -> dict[str, str]:
        return {name: cls.description for name, cls in self.items()}

    def create(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """Instantiate `name` with `params` checked against its signature."""
        from flowkit.spec import instantiate

        return instantiate(self, name, params or {})


SAMPLERS = Registry("sampler", "flowkit.samplers", ("flowkit.samplers",))
GUIDANCE = Registry("guidance module", "flowkit.guidance", ("flowkit.guidance",))
REWARDS = Registry("reward", "flowkit.rewards", ())
