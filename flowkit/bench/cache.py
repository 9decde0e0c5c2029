"""On-disk cache of per-sample bench results, keyed by a hash of the arm's configuration.

Layout under the root (default `$FLOWKIT_CACHE/bench`, FLOWKIT_CACHE defaulting to
`~/.cache/flowkit`):

    EXPERIMENT/HASH.json                       whole results: {"config": ..., "results": [...]}
    EXPERIMENT/HASH.chunks/000000-000016.json  one chunk of samples [0, 16)

Every file is written to a temporary name and moved into place with `os.replace`, so an
interrupted run never leaves a half-written entry; a chunked arm resumes from the chunks
that finished.

Several processes may share one cache (e.g. two `flowkit bench NAME` runs on a 2-core
machine, one thread each): before computing a chunk a process claims it with a
`CHUNK.json.claim` file created exclusively; the others skip claimed chunks, compute the
rest, and then wait for the claimed ones. A claim whose process is gone (same host, pid no
longer alive) or that is older than `claim_timeout` seconds is stale and taken over.

Results are lists of JSON-serialisable dicts (numpy scalars and arrays are converted);
what comes back from the cache equals what the first run returned.

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
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from flowkit.errors import InputError
from flowkit.storage import write_json_atomic

__all__ = ["ResultCache", "config_hash", "canonical_json", "check_name", "default_cache_root", "write_json_atomic", "to_jsonable", "CacheClaim", "hold_claim"]

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

_HELD: set[str] = set()  # claim files this process holds


class CacheClaim:
    """An exclusive, cross-process claim on a cache target (`TARGET.claim`, created with O_EXCL).

    The claim file records the host and pid of its holder. A claim is stale when its holder
    is a dead process on this host, or when it is older than `timeout` seconds (a holder on
    another host sharing the folder); a stale claim is removed and can be taken.
    """

    def __init__(self, target: str | os.PathLike[str], *, timeout: float = 6 * 3600.0):
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".claim")
        self.timeout = float(timeout)
        self.held = False

    def try_acquire(self) -> bool:
        """Take the claim if it is free or stale; False while another live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                if not self.stale():
                    return False
                log.warning("taking over the stale bench claim %s", self.path)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
            self.held = True
            _HELD.add(str(self.path))
            return True
        return False

    def acquire(self, poll: float) -> None:
        """Take the claim, waiting (`poll` seconds between looks) while a live holder has it."""
        while not self.try_acquire():
            time.sleep(poll)

    def stale(self) -> bool:
        """Whether an existing claim file belongs to nobody alive (False if it vanished)."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return age > 60.0  # a claim file is written within moments of its creation
        if age > self.timeout:
            return True
        if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        if pid == os.getpid():  # ours: live if this process holds it, else left by a dead one with our pid
            return str(self.path) not in _HELD
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.held = False
            _HELD.discard(str(self.path))
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@contextmanager
def hold_claim(target: str | os.PathLike[str], *, poll: float = 2.0, timeout: float = 6 * 3600.0) -> Iterator["CacheClaim"]:
    """Hold the claim on `target`, waiting while another live process holds it.

    Use it around work whose result is written to `target` and read back when present:
    the second process waits for the first and then finds the result.
    """
    claim = CacheClaim(target, timeout=timeout)
    claim.acquire(poll)
    try:
        yield claim
    finally:
        claim.release()


class ResultCache:
    """Per-sample results of bench arms on disk, keyed by (experiment, config hash)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, poll: float = 2.0,
                 claim_timeout: float = 6 * 3600.0):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.poll = float(poll)  # seconds between looks at a chunk another process holds
        self.claim_timeout = float(claim_timeout)

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
        on_chunk: Callable[[int, int, list[dict[str, Any]]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Results of samples 0..n-1, computed `chunk` at a time by `fn(indices)` and cached per chunk.
        `on_chunk(start, stop, results)` hears of every chunk as soon as it is there (read
        back or computed), e.g. to keep a progress file that outlives the cache.

        fn: maps a list of sample indices to one result dict per index, in order; it must
            depend only on `config` and the indices (seed each sample from its index), so a
            chunk computed in another session is interchangeable.
        Chunks that finished in an earlier, interrupted run are read back, and only the
        missing ones are computed; chunks that another process has claimed are left to it
        and waited for at the end. The sample count is not part of the key: raising `n`
        reuses the chunks whose bounds stay the same.
        """
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"n must be a sample count >= 0, got {n!r}")
        if not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        folder = self.chunk_dir(experiment, config)
        bounds = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
        parts: dict[int, list[dict[str, Any]]] = {}
        waiting: list[tuple[int, int]] = []
        for start, stop in bounds:  # compute what is missing and unclaimed; defer the rest
            part = self._chunk(folder, config, fn, start, stop, wait=False)
            if part is None:
                waiting.append((start, stop))
            else:
                parts[start] = part
                if on_chunk is not None:
                    on_chunk(start, stop, part)
        for start, stop in waiting:  # chunks another process was computing
            log.info("bench cache: waiting for chunk %d-%d of %s, claimed by another process", start, stop, folder.name)
            parts[start] = self._chunk(folder, config, fn, start, stop, wait=True)
            if on_chunk is not None:
                on_chunk(start, stop, parts[start])
        return [r for start, _ in bounds for r in parts[start]]

    def _chunk(self, folder: Path, config: Mapping[str, Any], fn: Callable[[list[int]], list[dict[str, Any]]],
               start: int, stop: int, *, wait: bool) -> list[dict[str, Any]] | None:
        """Chunk [start, stop): read back, or computed under its claim; None if another
        process holds the claim and `wait` is False."""
        path = folder / f"{start:06d}-{stop:06d}.json"
        part = self._load(path, config)
        if part is not None and len(part) == stop - start:
            return part
        claim = CacheClaim(path, timeout=self.claim_timeout)
        if not claim.try_acquire():
            if not wait:
                return None
            claim.acquire(self.poll)
        try:
            part = self._load(path, config)  # it may have landed while we waited
            if part is not None and len(part) == stop - start:
                return part
            indices = list(range(start, stop))
            part = _normalise_results(fn(indices), "the chunk function")
            if len(part) != len(indices):
                raise InputError(
                    f"the chunk function returned {len(part)} results for {len(indices)} indices; "
                    "return one dict per index"
                )
            write_json_atomic(path, {"config": to_jsonable(config, "config"), "results": part})
            return part
        finally:
            claim.release()

    def seed_chunk(self, experiment: str, config: Mapping[str, Any], start: int, stop: int,
                   results: Sequence[Mapping[str, Any]]) -> bool:
        """Write one chunk [start, stop) of `config` (from a progress file) unless it is cached."""
        path = self.chunk_dir(experiment, config) / f"{start:06d}-{stop:06d}.json"
        if len(results) != stop - start or self._load(path, config) is not None:
            return False
        write_json_atomic(path, {"config": to_jsonable(config, "config"),
                                 "results": _normalise_results([dict(r) for r in results], "seeded results")})
        return True

    def seed_chunks(self, experiment: str, config: Mapping[str, Any], results: Sequence[Mapping[str, Any]], *,
                    chunk: int = 16) -> int:
        """Write the per-sample results of samples 0..len(results)-1 (e.g. read back from a
        committed results JSON) into the chunk files a run of that many samples reads, where
        they are not cached yet; returns the samples written. The results must be those `fn`
        would give for `config` (the caller checks it)."""
        folder = self.chunk_dir(experiment, config)
        written = 0
        for start in range(0, len(results), chunk):
            stop = min(start + chunk, len(results))  # the chunks a run of len(results) samples reads
            path = folder / f"{start:06d}-{stop:06d}.json"
            if self._load(path, config) is not None:
                continue
            part = _normalise_results([dict(r) for r in results[start:stop]], "seeded results")
            write_json_atomic(path, {"config": to_jsonable(config, "config"), "results": part})
            written += len(part)
        return written

    def clear(self, experiment: str | None = None) -> None:
        """Delete the cached results of one experiment, or of all."""
        target = self._dir(experiment) if experiment is not None else self.root
        if target.exists():
            shutil.rmtree(target)
