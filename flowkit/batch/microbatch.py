"""Sampling one micro-batch, halving it on out-of-memory.

`MicroBatcher.run(jobs)` samples the jobs with `flowkit.sample`, each on its own CPU
generator seeded with its noise seed (fresh generators on every attempt, so a retried job
draws the same noise). When the device runs out of memory it splits the failed batch in
two, samples the rest in pieces of the smaller size (and so every batch that follows), and
goes on; out of memory with a single image is an error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from flowkit.batch.plan import Job
from flowkit.errors import InputError

__all__ = ["MicroBatcher", "Sampled", "Halving", "is_out_of_memory"]

log = logging.getLogger(__name__)

_OOM_TEXT = ("out of memory", "can't allocate memory")  # CUDA / MPS / ROCm, and the CPU allocator


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError the CPU and MPS allocators raise."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(t in str(error) for t in _OOM_TEXT)


class Halving:
    """Sampling items in pieces that halve on out-of-memory. `limit`: the largest piece to try
    (None: all at once), lowered to the size that fitted after each out-of-memory error."""

    def __init__(self, limit: int | None = None, warn: Callable[[str], None] | None = None):
        self.limit = limit
        self.warn = warn or log.warning

    def pieces(self, items: Sequence[Any], sample: Callable[[list[Any]], Any],
               too_big: Callable[[Any], Exception]) -> Iterator[tuple[list[Any], Any]]:
        """(piece, sample(piece)) for consecutive pieces of `items`, in order. Out of memory
        splits the failed piece in two and goes on at that size (said through `warn`); out of
        memory with one item raises `too_big(item)`."""
        remaining = list(items)
        while remaining:
            piece = remaining[:self.limit or len(remaining)]
            oom = False
            try:
                result = sample(piece)
            except Exception as e:  # noqa: BLE001 - anything but out-of-memory is re-raised
                if not is_out_of_memory(e):
                    raise
                oom = True
            if not oom:
                remaining = remaining[len(piece):]
                yield piece, result
                del result  # the consumer's copy is the only one while the next piece samples
                continue
            # out of the except block: its traceback no longer holds the failed batch's tensors
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(piece) == 1:
                raise too_big(piece[0])
            self.limit = (len(piece) + 1) // 2
            self.warn(f"out of memory at batch size {len(piece)}; going on at {self.limit}")


@dataclass
class Sampled:
    jobs: list[Job]
    images: list[Any]  # PIL images
    nfe: list[int]
    seconds: float  # wall time of the whole micro-batch
    sampler: str = ""  # the sampler and guidance as run (spec text; the default guidance resolved)
    guidance: str = ""


class MicroBatcher:
    def __init__(self, pipe: Any, *, warn: Callable[[str], None] | None = None, compile: bool = False):
        self.pipe = pipe
        self.halving = Halving(warn=warn)  # its limit: the largest batch that fitted after an out-of-memory error
        self.compile = compile  # run the network under torch.compile(fullgraph=True)
        self.compiled = False  # whether the network ran compiled
        self.compiles = 0  # graphs compiled (one per new micro-batch shape)
        self.compile_seconds = 0.0  # seconds of the forwards that compiled

    def run(self, jobs: Sequence[Job]) -> Iterator[Sampled]:
        """Sample `jobs` (compatible, one micro-batch), in pieces of at most the halving's limit
        (kept from one micro-batch to the next)."""
        def too_big(job: Job) -> InputError:
            return InputError(f"out of memory sampling one {job.height}x{job.width} image (line {job.line}): "
                              "use a smaller size, or free the device")

        for _, sampled in self.halving.pieces(jobs, self.sample, too_big):
            yield sampled

    def sample(self, jobs: Sequence[Job]) -> Sampled:
        from flowkit.api import sample

        first = jobs[0]
        negatives = None if first.negative_prompt is None else [j.negative_prompt for j in jobs]
        generators = [torch.Generator("cpu").manual_seed(j.noise_seed) for j in jobs]
        t0 = time.perf_counter()
        out = sample(self.pipe, [j.prompt for j in jobs], sampler=first.sampler, steps=first.steps,
                     guidance=first.guidance, negative_prompt=negatives, height=first.height, width=first.width,
                     grid=first.grid, generators=generators, compile=self.compile)
        self.compiled = self.compiled or out.stats.compiled
        self.compiles += out.stats.compiles
        self.compile_seconds += out.stats.compile_seconds
        return Sampled(list(jobs), list(out.images), [int(n) for n in out.stats.nfe], time.perf_counter() - t0,
                       out.stats.sampler, out.stats.guidance)
