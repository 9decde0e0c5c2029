"""The one registry: name -> entry for samplers, guidance modules, model families, rewards,
training targets, bench experiments and time-grid kinds.

An entry is a class (or, for experiments, an object) with a `name` and a one-line
`description`. Built-in entries register themselves where they are defined, with the
registry's decorator (`@SAMPLERS.register`); on its first lookup a registry imports its
built-in places (every module of a package, such as `flowkit.samplers`, or a named module),
so adding a sampler or a guidance module is one file. Third-party packages add theirs
through the registry's entry-point group (each entry point names a class, or a module whose
import registers entries). Classes take their options as keyword-only constructor
arguments with type hints and defaults: that signature is what specs are checked against.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from importlib import metadata
from typing import Any, Generic, Iterator, TypeVar

from flowkit.errors import UnknownNameError, closest
from flowkit.spec import Param, params_of

__all__ = ["Registry", "Param", "params_of", "SAMPLERS", "GUIDANCE", "REWARDS", "MODEL_FAMILIES", "TRAIN_TARGETS",
           "EXPERIMENTS", "GRID_KINDS", "REGISTRIES"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry table, filled lazily from built-in places and entry points.

    kind: what an entry is, for messages ("sampler"); group: the entry-point group;
    builtin: modules or packages to import on the first lookup (a package: each of its
    modules whose name does not start with '_').
    """

    def __init__(self, kind: str, group: str, builtin: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self._builtin = builtin
        self._entries: dict[str, T] = {}
        self._loaded = False
        self._loading = False

    # -- registration ------------------------------------------------------------------------
    def register(self, entry: T) -> T:
        """Register `entry` under `entry.name` (a class decorator, or a call with an object)."""
        name = getattr(entry, "name", None)
        what = entry.__qualname__ if inspect.isclass(entry) else type(entry).__qualname__
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} needs a `name` to be registered as a {self.kind}")
        if not getattr(entry, "description", ""):
            raise TypeError(f"{what} needs a one-line `description` to be registered as a {self.kind}")
        other = self._entries.get(name)
        if other is not None and other is not entry and _origin(other) != _origin(entry):
            raise ValueError(f"{self.kind} {name!r} is already registered by {_origin(other)}")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Forget the entry `name` (a test's throwaway entry); unknown names are ignored."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for place in self._builtin:
                _import_place(place)
            self._loaded = True
        finally:
            self._loading = False
        for ep in metadata.entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not break flowkit
                log.warning("could not load %s plugin %r: %s", self.kind, ep.name, e)
                continue
            if getattr(obj, "name", None) and getattr(obj, "description", None) and obj not in self._entries.values():
                try:
                    self.register(obj)
                except (TypeError, ValueError) as e:
                    log.warning("could not register %s plugin %r: %s", self.kind, ep.name, e)

    # -- lookup ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._entries))
            raise UnknownNameError(
                f"unknown {self.kind} {str(name)!r:.80}{closest(str(name), self._entries)}; known: {known}"
            ) from None

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def __iter__(self) -> Iterator[T]:
        return iter([entry for _, entry in self.items()])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, sorted by name (what `flowkit list` shows)."""
        return {name: entry.description for name, entry in self.items()}  # type: ignore[attr-defined]

    def find_class(self, class_name: str) -> type | None:
        """The registered class whose Python name is `class_name` (for `from flowkit.samplers import Euler`)."""
        for _, entry in self.items():
            if inspect.isclass(entry) and entry.__name__ == class_name:
                return entry
        return None

    # -- building from specs ---------------------------------------------------------------
    def create(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """Instantiate `name` with `params` checked against its signature (see flowkit.spec)."""
        from flowkit.spec import instantiate

        return instantiate(self, name, params or {})

    def build(self, spec: Any, *, allow_empty: bool = False) -> list[Any]:
        """Instances from any spec form (text, JSON, SpecItem, dict, instance, or a list of them)."""
        from flowkit.spec import build

        return build(self, spec, allow_empty=allow_empty)


def _origin(entry: Any) -> str:
    target = entry if inspect.isclass(entry) else getattr(entry, "fn", entry)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


def _import_place(place: str) -> None:
    """Import a module, or every module of a package (names starting with '_' skipped)."""
    module = importlib.import_module(place)
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{place}.{info.name}")


SAMPLERS: Registry[type] = Registry("sampler", "flowkit.samplers", ("flowkit.samplers",))
GUIDANCE: Registry[type] = Registry("guidance module", "flowkit.guidance", ("flowkit.guidance",))
REWARDS: Registry[type] = Registry("reward", "flowkit.rewards", ("flowkit.worlds.shapes_rewards",))
MODEL_FAMILIES: Registry[type] = Registry("model family", "flowkit.model_families",
                                          ("flowkit.adapters", "flowkit.seqmodels"))
TRAIN_TARGETS: Registry[type] = Registry("training target", "flowkit.train_targets", ("flowkit.train",))
EXPERIMENTS: Registry[Any] = Registry("experiment", "flowkit.bench", ("flowkit.bench.experiments",))
GRID_KINDS: Registry[Any] = Registry("time grid kind", "flowkit.grids", ("flowkit.boss",))

REGISTRIES: dict[str, Registry[Any]] = {
    "samplers": SAMPLERS, "guidance": GUIDANCE, "rewards": REWARDS, "models": MODEL_FAMILIES,
    "train": TRAIN_TARGETS, "experiments": EXPERIMENTS, "grids": GRID_KINDS,
}
