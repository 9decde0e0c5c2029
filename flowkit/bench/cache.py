"""On-disk cache of per-sample bench results, keyed by a hash of the arm's configuration.

Layout under the root (default `$FLOWKIT_CACHE/bench`, FLOWKIT_CACHE defaulting to
`~/.cache/flowkit`):

    EXPERIMENT/HASH.json                       whole results: {"config": ..., "results": [...]}
    EXPERIMENT/HASH.chunks/000000-000016.json  one chunk of samples [0, 16)

Every file is written to a temporary name and moved into place with `os.replace`, so an
interrupted run never leaves a half-written entry; a chunked arm resumes from the chunks
that finished. Results are lists of JSON-serialisable dicts (numpy scalars and arrays are
converted); what comes back from the cache equals what the first run returned.

The configuration must hold everything the results depend on (method, options, model,
sample count per seed, ...). Bump a "version" key in it when the code behind an arm changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from flowkit.errors import InputError

__all__ = ["ResultCache", "config_hash", "canonical_json", "check_name", "default_cache_root", "write_json_atomic", "to_jsonable"]

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_name(name: str) -> str:
    """`name` if it is a safe experiment name (a file name: letters, digits, '_', '-', '.')."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise InputError(f"experiment name {name!r} may only hold letters, digits, '_', '-' and '.'")
    return name


def default_cache_root() -> Path:
    """`$FLOWKIT_CACHE/bench`, with FLOWKIT_CACHE defaulting to `~/.cache/flowkit`."""
    from flowkit.storage import cache_root

    return cache_root("bench")


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """`obj` with numpy scalars/arrays, tuples and Paths turned into plain JSON types.

    Floats stay floats (JSON writes them with `repr`, so 1 and 1.0 stay distinct).
    Raises `InputError` naming the offending key for anything else.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, (np.integer, np.floating)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise InputError(f"{where} has a non-string key {k!r}; use string keys")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist"):  # torch tensors without importing torch
        return to_jsonable(obj.tolist(), where)
    raise InputError(f"{where} of type {type(obj).__name__} cannot be stored as JSON; convert it first")


def canonical_json(config: Mapping[str, Any]) -> str:
    """A config as canonical JSON: sorted keys, no spaces, floats by repr, tuples as lists."""
    return json.dumps(to_jsonable(config, "config"), sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit key for `config` (sha256 of its canonical JSON)."""
    if not isinstance(config, Mapping):
        raise InputError(f"a bench config must be a dict, got {type(config).__name__}")
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:16]


_FLAT = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")  # a list or dict holding no list or dict


def _dumps(obj: Any, indent: int | None) -> str:
    """JSON text; when indented, flat lists and dicts (per-sample columns, records) stay on one line."""
    text = json.dumps(obj, indent=indent, allow_nan=True)
    if indent is None:
        return text
    # raw newlines never occur inside JSON strings, so only layout whitespace is removed
    return _FLAT.sub(lambda m: m.group(0)[0] + re.sub(r"\n\s*", " ", m.group(0)[1:-1]).strip() + m.group(0)[-1], text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file in the same folder + os.replace).

    With `indent`, the structure is indented but flat lists and dicts stay on one line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_dumps(obj, indent))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_json(path: Path) -> Any | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable bench cache file %s: %s", path, e)
        return None


def _normalise_results(results: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(results, (list, tuple)) or not all(isinstance(r, Mapping) for r in results):
        raise InputError(f"{where} must return a list of dicts, one per sample")
    return to_jsonable(list(results), where)


class ResultCache:
    """Per-sample results of bench arms on disk, keyed by (experiment, config hash)."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    def __repr__(self) -> str:
        return f"ResultCache({str(self.root)!r})"

    def _dir(self, experiment: str) -> Path:
        return self.root / check_name(experiment)

    def path(self, experiment: str, config: Mapping[str, Any]) -> Path:
        """The file holding the whole results of `config`."""
        return self._dir(experiment) / f"{config_hash(config)}.json"

    def chunk_dir(self, experiment: str, config: Mapping[str, Any]) -> Path:
        """The folder holding the chunks of `config`."""
        return self._dir(experiment) / f"{config_hash(config)}.chunks"

    def _load(self, path: Path, config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        entry = _read_json(path)
        if not isinstance(entry, dict) or "results" not in entry:
            return None
        if canonical_json(entry.get("config", {})) != canonical_json(config):
            log.warning("bench cache %s holds another config (hash collision); recomputing", path)
            return None
        return entry["results"]

    def get(self, experiment: str, config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """The cached results of `config`, or None."""
        return self._load(self.path(experiment, config), config)

    def put(self, experiment: str, config: Mapping[str, Any], per_sample_results: list[dict[str, Any]]) -> None:
        """Store the results of `config` (atomically)."""
        results = _normalise_results(per_sample_results, "per_sample_results")
        write_json_atomic(self.path(experiment, config), {"config": to_jsonable(config, "config"), "results": results})

    def run_cached(
        self, experiment: str, config: Mapping[str, Any], fn: Callable[[], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """The cached results of `config`, or `fn()` stored and returned."""
        cached = self.get(experiment, config)
        if cached is not None:
            return cached
        results = _normalise_results(fn(), "the arm function")
        self.put(experiment, config, results)
        return results

    def run_cached_chunks(
        self,
        experiment: str,
        config: Mapping[str, Any],
        n: int,
        fn: Callable[[list[int]], list[dict[str, Any]]],
        *,
        chunk: int = 16,
    ) -> list[dict[str, Any]]:
        """Results of samples 0..n-1, computed `chunk` at a time by `fn(indices)` and cached per chunk.

        fn: maps a list of sample indices to one result dict per index, in order; it must
            depend only on `config` and the indices (seed each sample from its index), so a
            chunk computed in another session is interchangeable.
        Chunks that finished in an earlier, interrupted run are read back, and only the
        missing ones are computed. The sample count is not part of the key: raising `n`
        reuses the chunks whose bounds stay the same.
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"n must be a sample count >= 0, got {n!r}")
        if not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        folder = self.chunk_dir(experiment, config)
        results: list[dict[str, Any]] = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            path = folder / f"{start:06d}-{stop:06d}.json"
            part = self._load(path, config)
            if part is None or len(part) != stop - start:
                indices = list(range(start, stop))
                part = _normalise_results(fn(indices), "the chunk function")
                if len(part) != len(indices):
                    raise InputError(
                        f"the chunk function returned {len(part)} results for {len(indices)} indices; "
                        "return one dict per index"
                    )
                write_json_atomic(path, {"config": to_jsonable(config, "config"), "results": part})
            results.extend(part)
        return results

    def clear(self, experiment: str | None = None) -> None:
        """Delete the cached results of one experiment, or of all."""
        target = self._dir(experiment) if experiment is not None else self.root
        if target.exists():
            shutil.rmtree(target)
