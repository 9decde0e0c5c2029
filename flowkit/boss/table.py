"""Stored BOSS step sizes: a cost matrix with its fine grid, for one model and latent shape.

A `BossTable` keeps what the dynamic program needs to give the best grid for any number of
steps K <= M (the fine grid, the cost matrix), the grids already chosen, and the key it was
made under: the model fingerprint, the latent shape, the cost kind, the prompt set and the
guidance. Tables are JSON files:

- cache: `$FLOWKIT_CACHE/boss/FINGERPRINT/CxHxW-COST-kM-nN-PROMPTSKEY.json` (what
  `flowkit tune boss` and the `boss` sampler's on-the-fly tuning write), FLOWKIT_CACHE
  defaulting to `~/.cache/flowkit`;
- shipped: `flowkit/weights/boss/NAME.json` (e.g. `shapes`), found by name or fingerprint.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowkit.boss.cost import COST_KINDS
from flowkit.boss.dp import best_path
from flowkit.errors import InputError, WeightsError, clip
from flowkit.limits import read_bounded

__all__ = ["BossTable", "cache_root", "shipped_root", "find_table", "load_table", "resolve_table", "VERSION"]

VERSION = 1


def cache_root() -> Path:
    """`$FLOWKIT_CACHE/boss` (FLOWKIT_CACHE defaulting to ~/.cache/flowkit)."""
    from flowkit.storage import cache_root as root

    return root("boss")


def shipped_root() -> Path:
    from flowkit.storage import weights_dir

    return weights_dir() / "boss"


@dataclass
class BossTable:
    """fine: the M+1 fine-grid times (descending flowkit time); cost: [M+1, M+1] (inf where
    j <= i); grids: K -> the K+1 chosen times; the rest is the key and provenance."""

    fingerprint: str
    shape: tuple[int, ...]
    cost_kind: str
    fine: list[float]
    cost: np.ndarray
    samples: int
    prompts: list[str]
    guidance: str
    prompts_key: str
    model: str = ""
    nfe: int = 0
    grids: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cost_kind not in COST_KINDS:
            raise InputError(f"BOSS cost kind must be one of {', '.join(COST_KINDS)}, got {self.cost_kind!r}")
        self.cost = np.asarray(self.cost, dtype=np.float64)
        self.shape = tuple(int(v) for v in self.shape)
        if self.cost.shape != (len(self.fine), len(self.fine)):
            raise InputError(f"a BOSS table's cost matrix {self.cost.shape} does not fit its {len(self.fine)} grid times")
        for k, grid in self.grids.items():  # stored grids are used without the DP: check them
            g = np.asarray(grid, dtype=np.float64)
            if len(g) != int(k) + 1 or not np.isfinite(g).all() or not (np.diff(g) < 0).all():
                raise InputError(f"a BOSS table's stored {k}-step grid is not {int(k) + 1} strictly decreasing "
                                 f"times: {list(grid)}; re-tune the table")

    @property
    def k_max(self) -> int:
        return len(self.fine) - 1

    def path(self, steps: int) -> list[int]:
        """Indices into the fine grid of the best `steps`-step path."""
        try:
            return best_path(self.cost, steps)[0]
        except InputError as e:
            raise InputError(f"BOSS table {self.file_name} (model {self.model or self.fingerprint}): {e}") from None

    def has(self, steps: int) -> bool:
        """Whether this table gives a `steps`-step grid: a stored one, or (cost matrices) any
        count up to k_max; a final-error table only has the grids it was searched for."""
        return steps in self.grids or (self.cost_kind != "final" and 1 <= steps <= self.k_max)

    def times(self, steps: int) -> torch.Tensor:
        """The BOSS grid for `steps` steps: steps + 1 descending flowkit times (float64)."""
        if steps in self.grids:
            return torch.tensor(self.grids[steps], dtype=torch.float64)
        if self.cost_kind == "final":  # its matrix is the local cost: the DP would give the local grid
            raise InputError(f"BOSS table {self.file_name} was searched on final error for "
                             f"{sorted(self.grids) or 'no'} steps, not {steps}: re-tune it with "
                             f"`flowkit tune boss --cost final --steps {steps}`")
        fine = np.asarray(self.fine)
        return torch.tensor(fine[self.path(steps)], dtype=torch.float64)

    def indices(self, steps: int) -> list[int]:
        """The fine-grid indices of the `steps`-step grid this table gives (stored or the DP's)."""
        fine = np.asarray(self.fine)
        idx = [np.flatnonzero(np.isclose(fine, t, rtol=0, atol=1e-9)) for t in self.times(steps).tolist()]
        if not all(len(i) == 1 for i in idx):
            raise InputError(f"BOSS table {self.file_name}: its {steps}-step grid is not on its fine grid; re-tune it")
        return [int(i[0]) for i in idx]

    def choose(self, steps_list: list[int]) -> "BossTable":
        """Store the grids for these step counts (so a reader needs no DP)."""
        for k in steps_list:
            self.grids[int(k)] = [float(v) for v in self.times(int(k)).tolist()]
        return self

    # -- files -------------------------------------------------------------------------
    @property
    def file_name(self) -> str:
        c, *rest = self.shape
        dims = "x".join(str(v) for v in (c, *rest))
        return f"{dims}-{self.cost_kind}-k{self.k_max}-n{self.samples}-{self.prompts_key}.json"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost"] = [[None if not np.isfinite(v) else float(v) for v in row] for row in self.cost]
        d["shape"] = list(self.shape)
        d["grids"] = {str(k): v for k, v in sorted(self.grids.items())}
        return {"version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BossTable":
        if d.get("version") != VERSION:
            raise WeightsError(f"BOSS table version {d.get('version')!r} is not {VERSION}: re-run `flowkit tune boss`")
        cost = np.array([[np.inf if v is None else float(v) for v in row] for row in d["cost"]])
        fields = {k: d[k] for k in ("fingerprint", "shape", "cost_kind", "fine", "samples", "prompts", "guidance",
                                    "prompts_key", "model", "nfe")}
        return cls(cost=cost, grids={int(k): list(v) for k, v in d.get("grids", {}).items()}, **fields)

    def save(self, path: str | os.PathLike) -> Path:
        from flowkit.storage import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict(), indent=1)
        return path

    def save_to_cache(self) -> Path:
        return self.save(cache_root() / self.fingerprint / self.file_name)


def load_table(path: str | os.PathLike) -> BossTable:
    path = Path(path)
    try:
        data = json.loads(read_bounded(path, "BOSS table").decode("utf-8"))
        return BossTable.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"cannot read BOSS table {clip(str(path))}: {clip(str(e), 200)}") from None


def resolve_table(ref: str) -> BossTable:
    """A table by reference: a JSON file path, or the name of a shipped table."""
    try:
        is_file = Path(ref).expanduser().is_file()
    except (OSError, ValueError):
        is_file = False
    if is_file:
        return load_table(Path(ref).expanduser())
    shipped = shipped_root() / f"{ref}.json"
    if shipped.is_file():
        return load_table(shipped)
    names = sorted(p.stem for p in shipped_root().glob("*.json")) if shipped_root().is_dir() else []
    known = ", ".join(names) if names else "none shipped yet"
    raise InputError(f"no BOSS table {ref!r}: give a table file written by `flowkit tune boss` "
                     f"or a shipped name ({known})")


def find_table(fingerprint: str, shape: tuple[int, ...], cost_kind: str, *, auto: bool | None = None,
               min_steps: int = 1, guidance: str | None = None) -> BossTable | None:
    """The table of this model, latent shape and cost kind that gives a `min_steps`-step grid
    (a fine grid of at least that many steps; a final-error table: that grid searched), tuned
    under `guidance` (the stack's spec; None: any): a tuned one from the cache (newest first),
    then a shipped one, then an on-the-fly one from the cache (prompt set 'auto'). `auto`
    restricts the search to auto (True) or tuned (False) tables. The step sizes that are best
    depend on the guidance (CFG bends the trajectories), so a table tuned without guidance is
    not taken for a guided run, nor the other way round."""
    shape = tuple(int(v) for v in shape)

    def fits(t: BossTable) -> bool:
        return (t.fingerprint == fingerprint and t.shape == shape and t.cost_kind == cost_kind
                and t.has(min_steps) and (guidance is None or t.guidance == guidance))

    dims = "x".join(str(v) for v in shape)
    cached = []
    folder = cache_root() / fingerprint
    if folder.is_dir():
        for p in sorted(folder.glob(f"{dims}-{cost_kind}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                cached.append(load_table(p))
            except WeightsError:
                continue  # a damaged cache entry is skipped (and rewritten by the next tuning)
    tuned = [t for t in cached if fits(t) and t.prompts_key != "auto"]
    on_the_fly = [t for t in cached if fits(t) and t.prompts_key == "auto"]
    shipped = []
    if shipped_root().is_dir():
        for p in sorted(shipped_root().glob("*.json")):
            t = load_table(p)
            if fits(t):
                shipped.append(t)
    order = {None: tuned + shipped + on_the_fly, False: tuned + shipped, True: on_the_fly}[auto]
    return order[0] if order else None
