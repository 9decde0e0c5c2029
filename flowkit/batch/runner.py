"""`run_batch`: one rank's part of a batch run, from the prompt file to the merged manifest.

Order of work (every rank runs the same code; rank 0 alone touches shared files):

1. read the prompt file (bad lines: stop, or skip with a warning naming the line),
   check that DIR is writable, load the model, check the sizes, and (when resuming)
   refuse a DIR whose run.json holds other settings unless --force; all before any image;
2. rank 0: delete stale temporary files, fold parts left by a killed run into the
   manifest, keep only records whose image verifies (sha256) and whose job is unchanged
   (any other finished or edited image stays, listed in orphans.jsonl), write run.json;
   then every rank waits for it;
3. every rank reads the manifest, plans the pending jobs into micro-batches (the same plan
   on every rank) and samples its shard, writing each image atomically and appending its
   records to its own manifest part;
4. all ranks wait; rank 0 merges the parts and returns the summary.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flowkit.batch import records as mf
from flowkit.batch.dist import Processes, processes
from flowkit.batch.files import (
    check_writable,
    image_metadata,
    lock_folder,
    png_bytes,
    free_name,
    publish,
    remove_stale_temporaries,
    sha256_bytes,
    stage,
)
from flowkit.batch.microbatch import MicroBatcher, Sampled
from flowkit.batch.plan import Defaults, Job, plan, resolve, shard
from flowkit.batch.prompts import LineError, PromptFile, read_prompt_file
from flowkit.denoiser import compile_options
from flowkit.errors import FlowkitError, InputError

__all__ = ["BatchConfig", "Summary", "run_batch"]


@dataclass(frozen=True)
class BatchConfig:
    """A batch run's settings: the library API of `flowkit batch` (the command line builds
    one from its options). Specs are in canonical text (`flowkit.batch.prompts.canonical_spec`);
    `model_given=False` lets the default model fall back to the untrained one."""

    prompts: Path
    out: Path
    model: str = "shapes"
    model_given: bool = True
    sampler: str = "euler"
    guidance: str | None = None  # None: CFG at the model's scale
    steps: int = 30
    seed: int = 0
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    grid: str | None = None
    batch_size: int = 8
    resume: bool = True
    force: bool = False
    on_error: str = "stop"  # "stop" | "skip"
    progress: bool = False
    compile: Any = False  # run the network under torch.compile (see flowkit.sample's `compile`)

    def __post_init__(self) -> None:
        from flowkit.limits import MAX_BATCH_SIZE, MAX_SEED, MAX_SIZE, MAX_STEPS, check_int

        for name, lo, hi in (("steps", 1, MAX_STEPS), ("seed", 0, MAX_SEED), ("batch_size", 1, MAX_BATCH_SIZE)):
            check_int(f"BatchConfig.{name}", getattr(self, name), lo, hi)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_int(f"BatchConfig.{name}", getattr(self, name), 1, MAX_SIZE)
        if self.on_error not in ("stop", "skip"):
            raise InputError(f"BatchConfig.on_error must be 'stop' or 'skip', got {self.on_error!r}")
        compile_options(self.compile)
        object.__setattr__(self, "prompts", Path(self.prompts))
        object.__setattr__(self, "out", Path(self.out))


@dataclass
class Summary:
    """What a run did (on rank 0; the counts cover every rank)."""

    out: Path
    model: str
    world_size: int
    items: int  # data lines in the prompt file
    generated: list[int] = field(default_factory=list)  # indices sampled in this run
    already_done: int = 0
    errors: list[LineError] = field(default_factory=list)
    per_rank: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    nfe: int = 0
    orphans: list[str] = field(default_factory=list)  # finished images this run left out of the manifest, kept
    compiled: bool = False  # this rank's network ran compiled
    compiles: int = 0  # graphs compiled on this rank (one per new micro-batch shape)
    compile_seconds: float = 0.0  # seconds of the forwards that compiled, on this rank

    @property
    def images_per_second(self) -> float:
        return len(self.generated) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "manifest": str(self.out / mf.MANIFEST), "model": self.model,
            "world_size": self.world_size, "items": self.items, "generated": self.generated,
            "images": len(self.generated), "already_done": self.already_done,
            "errors": [{"line": e.line, "index": e.index, "message": e.message} for e in self.errors],
            "per_rank": {str(k): v for k, v in sorted(self.per_rank.items())}, "seconds": round(self.seconds, 4),
            "images_per_second": round(self.images_per_second, 4), "nfe": self.nfe,
            "orphans": self.orphans,
            "compiled": self.compiled, "compiles": self.compiles, "compile_seconds": round(self.compile_seconds, 4),
        }


log = logging.getLogger("flowkit.batch")


def _log(text: str) -> None:
    """run_batch's default `say`: a log record, at WARNING for the messages that are warnings."""
    log.log(logging.WARNING if "warning:" in text else logging.INFO, text)


def _line_errors(errors: list[LineError], parsed: PromptFile, on_error: str, procs: Processes,
                 say: Callable[[str], None]) -> None:
    """Stop at the first bad line, or warn (rank 0) about each one skipped."""
    if not errors:
        return
    if on_error == "stop":
        e = errors[0]
        more = f" ({len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise InputError(f"{e.describe(parsed.name)}{more}: fix the line, or pass --on-error skip")
    if procs.main:
        for e in errors:
            say(f"warning: {e.describe(parsed.name)} (line skipped)")


def _load(cfg: BatchConfig, procs: Processes, say: Callable[[str], None]) -> tuple[Any, str]:
    from flowkit.loading import load_model

    pipe, model = load_model(cfg.model if cfg.model_given else None, on_fallback=say)
    if procs.device.type != "cpu":
        pipe.to(procs.device)
    return pipe, model


def _jobs(cfg: BatchConfig, parsed: PromptFile, pipe: Any, model: str) -> tuple[list[Job], list[LineError]]:
    """The jobs of the valid items, and the items whose size the model refuses."""
    from flowkit.adapters.base import adapt

    adapter = adapt(pipe)
    h, w = (cfg.height, cfg.width) if cfg.height is not None else adapter.default_size()
    try:
        adapter.latent_shape(h, w)
    except FlowkitError as e:
        raise InputError(f"--height/--width: {e}") from None
    d = Defaults(model, cfg.sampler, cfg.guidance, cfg.steps, cfg.seed, cfg.negative_prompt, h, w, cfg.grid)
    jobs, errors, checked = [], [], {}
    for item in parsed.items:
        job = resolve(item, d)
        size = (job.height, job.width)
        if size not in checked:
            try:
                adapter.latent_shape(*size)
                checked[size] = None
            except FlowkitError as e:
                checked[size] = f"size: {e}"
        if checked[size] is None:
            jobs.append(job)
        else:
            errors.append(LineError(item.index, item.line, checked[size]))
    return jobs, errors


def _fingerprint(cfg: BatchConfig, parsed: PromptFile, model: str) -> dict[str, Any]:
    """What the images depend on, besides the per-line columns (covered by the file's hash)."""
    h, w = (cfg.height, cfg.width)
    return {
        "version": 1, "model": model, "prompts": {"file": cfg.prompts.name, "sha256": parsed.sha256},
        "settings": {"sampler": cfg.sampler, "guidance": cfg.guidance, "steps": cfg.steps, "seed": cfg.seed,
                     "negative_prompt": cfg.negative_prompt, "height": h, "width": w, "grid": cfg.grid},
    }


def _prepare(out: Path, jobs: list[Job], resume: bool) -> tuple[list[str], list[str]]:
    """Rank 0: clean up after a killed run and keep only the verified, unchanged records.

    Nothing but flowkit's own temporaries is deleted, and no existing file is overwritten.
    A recorded image whose file is missing is made again. A recorded image whose file is
    there but no longer verifies (other bytes: edited, truncated) is kept as it is, its
    record moves to orphans.jsonl (reason "changed since written"), and its item is made
    again under a free name. A finished image that no longer belongs to the run (its line
    dropped or changed, or --no-resume) stays too, its record moved to orphans.jsonl.
    Returns the names newly listed: (no longer in the run, changed since written).
    """
    remove_stale_temporaries(out)
    by_index = {j.index: j for j in jobs}
    records = mf.merged_records(out)
    keep, orphans, changed = {}, [], []
    for i, r in records.items():
        finished = mf.verify(out, r)
        if finished and resume and i in by_index and by_index[i].matches(r):
            keep[i] = r
        elif finished:
            orphans.append({**r, "reason": "no longer in this run"})
        elif mf.is_image_name(r.get("file")) and os.path.lexists(out / r["file"]):
            changed.append({**r, "reason": "changed since written"})
    added = mf.add_orphans(out, orphans + changed)
    mf.write_manifest(out, keep)
    for p in mf.part_paths(out):
        p.unlink(missing_ok=True)
    edited = {r["file"] for r in changed}
    return [n for n in added if n not in edited], [n for n in added if n in edited]


def _per_line(error: FlowkitError) -> bool:
    """Errors that belong to a micro-batch's lines (skippable), not to the whole run (a full disk)."""
    from flowkit.errors import NonFiniteError, SpecError, UnsupportedError

    return isinstance(error, (SpecError, UnsupportedError, NonFiniteError)) or "out of memory" in str(error)


def _write(sampled: Sampled, out: Path, writer: mf.PartWriter, procs: Processes) -> None:
    """Record the micro-batch's images, then put each in place: staged as temporaries, recorded
    in the part (so an image in place always has its record), then linked under a free name."""
    staged = []
    per_image = sampled.seconds / len(sampled.jobs)
    for job, image, nfe in zip(sampled.jobs, sampled.images, sampled.nfe):
        data = png_bytes(image, image_metadata(
            prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, seed_index=job.seed_index,
            noise_seed=job.noise_seed, sampler=sampled.sampler or job.sampler,
            guidance=sampled.guidance or job.guidance, steps=job.steps, height=job.height, width=job.width,
            grid=job.grid, model=job.model))
        name = free_name(out, job.file_name())
        record = {**job.record(), "file": name, "sha256": sha256_bytes(data), "bytes": len(data),
                  "seconds": round(per_image, 6), "nfe": nfe, "rank": procs.rank, "world_size": procs.world_size,
                  "batch_size": len(sampled.jobs)}
        staged.append((stage(out / name, data), record))
    writer.append([r for _, r in staged])
    moved = []
    for tmp, record in staged:
        name = publish(tmp, out, record["file"])
        if name != record["file"]:  # another process took the name meanwhile
            moved.append({**record, "file": name})
    if moved:
        writer.append(moved)  # a later record of an index wins


def _progress(total: int, procs: Processes, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    desc = f"rank 0 of {procs.world_size}" if procs.world_size > 1 else "batch"
    return tqdm(total=total, unit="img", desc=desc, disable=not (enabled and procs.main), file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def run_batch(cfg: BatchConfig, *, pipe: Any = None, say: Callable[[str], None] = _log) -> Summary | None:
    """Run this process's part of the batch job; the summary on rank 0, None on the others.

    pipe: an already loaded pipeline to use, recorded as model `cfg.model` (default: load it).
    say: where progress lines and warnings go (default: the `flowkit.batch` logger; the
        command line prints them on stderr).
    """
    procs = processes()
    parsed = read_prompt_file(cfg.prompts)
    _line_errors(parsed.errors, parsed, cfg.on_error, procs, say)
    check_writable(cfg.out)
    pipe, model = _load(cfg, procs, say) if pipe is None else (pipe, cfg.model)
    jobs, size_errors = _jobs(cfg, parsed, pipe, model)
    _line_errors(size_errors, parsed, cfg.on_error, procs, say)
    fingerprint = _fingerprint(cfg, parsed, model)
    if cfg.resume:
        mf.check_fingerprint(cfg.out, fingerprint, cfg.force)

    lock = lock_folder(cfg.out) if procs.main else None  # one run per folder at a time
    try:
        return _run(cfg, procs, parsed, pipe, model, jobs, size_errors, fingerprint, say)
    finally:
        if lock is not None:
            lock.close()


def _sample_shard(cfg: BatchConfig, procs: Processes, parsed: PromptFile, pipe: Any, mine: list[list[Job]],
                  say: Callable[[str], None], batcher: MicroBatcher) -> list[LineError]:
    """Sample this rank's micro-batches, recording each in its manifest part; the lines skipped."""
    writer = mf.PartWriter(mf.part_path(cfg.out, procs.rank))
    failed: list[LineError] = []
    with _progress(sum(len(c) for c in mine), procs, cfg.progress) as bar:
        for chunk in mine:
            try:
                for sampled in batcher.run(chunk):
                    _write(sampled, cfg.out, writer, procs)
                    bar.update(len(sampled.jobs))
            except FlowkitError as e:  # a line's settings refused at run time, non-finite values, ...
                if cfg.on_error == "stop" or not _per_line(e):
                    raise
                lines = ", ".join(str(j.line) for j in chunk)
                say(f"rank {procs.rank}: warning: {parsed.name}: lines {lines}: {e} (skipped)")
                failed += [LineError(j.index, j.line, str(e)) for j in chunk if j.index not in writer.indices]
    return failed


def _run(cfg: BatchConfig, procs: Processes, parsed: PromptFile, pipe: Any, model: str, jobs: list[Job],
         size_errors: list[LineError], fingerprint: dict[str, Any], say: Callable[[str], None]) -> Summary | None:
    orphans: list[str] = []
    if procs.main:
        orphans, changed = _prepare(cfg.out, jobs, cfg.resume)
        mf.write_fingerprint(cfg.out, fingerprint)
        if orphans:
            say(f"warning: {len(orphans)} finished image{'s' if len(orphans) > 1 else ''} no longer "
                f"belong{'s' if len(orphans) == 1 else ''} to this run (line dropped or changed, or --no-resume): "
                f"kept, and listed in {cfg.out / mf.ORPHANS}; delete them yourself if you do not want them")
        if changed:
            say(f"warning: {len(changed)} image{'s' if len(changed) > 1 else ''} changed since written (sha256 "
                f"differs from the manifest): kept as {'they are' if len(changed) > 1 else 'it is'}, listed in "
                f"{cfg.out / mf.ORPHANS}, and made again under a new name")
        orphans += changed
    procs.barrier()

    done = {r["index"] for r in mf.read_records(cfg.out / mf.MANIFEST)}
    pending = [j for j in jobs if j.index not in done]
    chunks = plan(pending, cfg.batch_size)
    mine = shard(chunks, procs.rank, procs.world_size)
    count = sum(len(c) for c in mine)
    say(f"rank {procs.rank} of world size {procs.world_size} on {procs.device}: {count} images in {len(mine)} "
        f"micro-batches ({len(pending)} pending of {len(jobs)}, {len(done)} already done)")

    t0 = time.perf_counter()
    batcher = MicroBatcher(pipe, warn=lambda text: say(f"rank {procs.rank}: {text}"), compile=cfg.compile)
    failed = _sample_shard(cfg, procs, parsed, pipe, mine, say, batcher)
    procs.barrier()
    seconds = time.perf_counter() - t0
    if not procs.main:
        return None
    this_run = [r for p in mf.part_paths(cfg.out) for r in mf.read_records(p)]
    mf.merge_parts(cfg.out)
    return Summary(
        out=cfg.out, model=model, world_size=procs.world_size, items=parsed.count,
        generated=sorted(r["index"] for r in this_run), already_done=len(done),
        errors=sorted(parsed.errors + size_errors + failed, key=lambda e: e.line),
        per_rank=dict(Counter(r["rank"] for r in this_run)), seconds=seconds,
        nfe=sum(int(r.get("nfe", 0)) for r in this_run), orphans=orphans, compiled=batcher.compiled,
        compiles=batcher.compiles, compile_seconds=batcher.compile_seconds,
    )
