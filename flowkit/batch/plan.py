"""Jobs and the micro-batch plan of `flowkit batch`.

A `Job` is a prompt-file item with every default filled in and its noise seed fixed:

- an item without a ``seed`` column is image `index` of a run with the command's
  ``--seed S``: noise seed ``seed_for(S, index)``, as image `index` of
  ``flowkit generate PROMPT_0 PROMPT_1 ... --seed S``;
- an item with ``seed: s`` gets ``seed_for(s, 0)``, the image of
  ``flowkit generate PROMPT --seed s``.

So an image depends on its item only, never on the batch size or on how the work is
split. `plan` groups pending jobs that can share a forward pass (same sampler, guidance,
steps, size, grid, and whether a negative prompt is given) and cuts each group, in index
order, into micro-batches of `batch_size`; `shard` gives rank r every world-th
micro-batch. The plan depends on the pending jobs and the batch size only, not on the
number of processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from flowkit.seeding import seed_for

__all__ = ["Defaults", "Job", "resolve", "plan", "shard", "MATCH_FIELDS"]

# the record fields that must equal the job's for a finished image to count as done
MATCH_FIELDS = ("index", "prompt", "negative_prompt", "noise_seed", "sampler", "guidance", "steps", "height",
                "width", "grid", "model")


@dataclass(frozen=True)
class Defaults:
    """The command line's settings, used where a prompt-file line gives none."""

    model: str
    sampler: str
    guidance: str | None  # canonical spec text; None: CFG at the model's default scale
    steps: int
    seed: int
    negative_prompt: str | None
    height: int
    width: int
    grid: str | None


@dataclass(frozen=True)
class Job:
    index: int
    line: int
    prompt: str
    negative_prompt: str | None
    seed: int
    seed_index: int
    noise_seed: int
    sampler: str
    guidance: str | None
    steps: int
    height: int
    width: int
    grid: str | None
    model: str

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share a micro-batch."""
        return (self.sampler, self.guidance, self.steps, self.height, self.width, self.grid,
                self.negative_prompt is None)

    def file_name(self) -> str:
        from flowkit.storage import slug

        return f"{self.index:06d}-{slug(self.prompt)}.png"

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, record: dict[str, Any]) -> bool:
        return all(record.get(k) == getattr(self, k) for k in MATCH_FIELDS)


def resolve(item: Any, d: Defaults) -> Job:
    """The Job of a `PromptItem` under defaults `d`."""
    seed, seed_index = (item.seed, 0) if item.seed is not None else (d.seed, item.index)
    h, w = item.size if item.size is not None else (d.height, d.width)
    return Job(
        index=item.index, line=item.line, prompt=item.prompt,
        negative_prompt=item.negative_prompt if item.negative_prompt is not None else d.negative_prompt,
        seed=seed, seed_index=seed_index, noise_seed=seed_for(seed, seed_index),
        sampler=item.sampler if item.sampler is not None else d.sampler,
        guidance=item.guidance if item.guidance is not None else d.guidance,
        steps=item.steps if item.steps is not None else d.steps, height=h, width=w, grid=d.grid, model=d.model,
    )


def plan(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Micro-batches of compatible jobs, at most `batch_size` each, ordered by first index."""
    groups: dict[tuple[Any, ...], list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.index):
        groups.setdefault(job.key, []).append(job)
    chunks = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(chunks, key=lambda c: c[0].index)


def shard(chunks: Sequence[list[Job]], rank: int, world_size: int) -> list[list[Job]]:
    """Rank `rank`'s micro-batches: every `world_size`-th one, starting at `rank`."""
    return list(chunks[rank::world_size])
