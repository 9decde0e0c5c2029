"""`flowkit generate PROMPT...`: images (PNG) or sequences (FASTA) from prompts.

`generate_options` checks every option (specs, grid, numbers, model name, output path)
before a model is loaded, so a typo fails at once. Images are made in micro-batches of
`--batch-size` and each is written as soon as it exists (Ctrl-C keeps the finished ones),
under a name no other file has (the folder's next free number), never over an existing
file unless --force; out of memory halves the micro-batch and goes on (as `batch` does),
with the names and seeds of a run at the smaller size; each PNG records its prompt, seed, sampler, guidance, steps, size,
model and flowkit version in its text chunks.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowkit.cli.options import (
    DEFAULT_MODEL,
    FALLBACK_MODEL,
    check_grid,
    check_int,
    check_out,
    check_size_and_model,
    load_model,
    say,
    with_flag,
)
from flowkit.errors import InputError, clip
from flowkit.limits import MAX_BATCH_SIZE, MAX_IMAGES, MAX_SEED, MAX_STEPS, check_text
from flowkit.storage import slug

__all__ = ["add_parser", "GenerateOptions", "generate_options", "cmd_generate"]

DEFAULT_OUT = "flowkit-out"
DEFAULT_STEPS = 30
DEFAULT_BATCH_SIZE = 8
_NUMBERED = re.compile(r"^(\d{5,})-")  # a numbered image of an output folder


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `generate` to the `flowkit` subcommands."""
    g = sub.add_parser("generate", help="generate images from prompts",
                       description="Generate images from prompts and write them as PNG files.")
    g.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="prompts (image models), or classes (sequence models; '' is unconditional)")
    g.add_argument("--class", dest="classes", action="append", default=[], metavar="CLASS",
                   help="a class of a sequence model, by name or 0-based index (repeatable); e.g. --class promoter")
    g.add_argument("--length", type=int, default=None, help="sequence length (sequence models)")
    g.add_argument("--model", default=None,
                   help=f"a built-in model (see `flowkit list models`) or a local diffusers folder "
                        f"(default {DEFAULT_MODEL}; '{FALLBACK_MODEL}' if its weights are not installed)")
    g.add_argument("--sampler", default=None, metavar="SPEC",
                   help="sampler spec, e.g. heun or sde:c=0.5 (default: the model's, euler for image models)")
    g.add_argument("--guidance", default=None, metavar="SPEC",
                   help="guidance stack, e.g. cfg:scale=7, or none (default: CFG at the model's scale)")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"sampling steps, 1 to {MAX_STEPS} (default: {DEFAULT_STEPS})")
    g.add_argument("--seed", type=int, default=0, help="image i uses flowkit.seed_for(SEED, i) (default: 0)")
    g.add_argument("-n", "--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT")
    g.add_argument("--height", type=int, default=None, metavar="H")
    g.add_argument("--width", type=int, default=None, metavar="W")
    g.add_argument("--grid", default=None, help="time grid: uniform, shift:S, dynamic[:MU] or sigmas:T1;T2;...")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"images per forward pass; each is written as soon as its micro-batch is done "
                        f"(default: {DEFAULT_BATCH_SIZE})")
    g.add_argument("-o", "--out", default=None, metavar="FILE_OR_DIR",
                   help=f"an image file for one image (.png, or another format PIL writes: .jpg, .webp, ...), "
                        f"or a folder, where images take the next free numbers (default ./{DEFAULT_OUT}/)")
    g.add_argument("--force", action="store_true", help="overwrite an existing --out FILE")
    g.add_argument("--compile", action="store_true",
                   help="run the network under torch.compile(fullgraph=True) (the first call compiles: "
                        "minutes on a CPU; its time is reported)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar over the images on stderr (default: when stderr is a terminal)")
    g.set_defaults(func=cmd_generate)
    return g


@dataclass(frozen=True)
class GenerateOptions:
    """`flowkit generate`'s options, checked; `sampler` and `guidance` are built objects."""

    prompts: list[str]
    model: str
    model_given: bool  # --model was given: no fallback to the tiny model
    sampler: Any  # flowkit.sampler_base.Sampler
    guidance: Any  # flowkit.guidance.GuidanceStack, or None: CFG at the model's default scale
    grid: Any  # flowkit.TimeGrid, or None: the model's default grid
    steps: int
    seed: int
    num_images: int
    negative_prompt: str | None
    height: int | None
    width: int | None
    out: Path
    out_is_file: bool
    json: bool
    progress: bool
    sequence: bool = False  # a sequence model: classes for prompts, FASTA out
    length: int | None = None
    out_given: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    force: bool = False
    out_format: str = "PNG"  # the PIL format of --out FILE
    compile: bool = False

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_images


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """Check `generate`'s parsed arguments; FlowkitError names the option to change."""
    from flowkit.api import build_guidance, build_sampler

    check_int("--steps", args.steps, 1, MAX_STEPS)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("-n/--num-images", args.num_images, 1, MAX_IMAGES)
    check_int("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    model = check_size_and_model(args)
    for k, p in enumerate(args.prompts):
        check_text(f"PROMPT {k + 1}", p)
    if args.negative_prompt is not None:
        check_text("--negative-prompt", args.negative_prompt)
    sampler = None if args.sampler is None else with_flag("--sampler", build_sampler, args.sampler)
    guidance = None if args.guidance is None else with_flag("--guidance", build_guidance, args.guidance, 0.0)
    grid = check_grid(args.grid, model, args.steps)
    prompts, sequence = _sequence_prompts(args, model)

    total = len(prompts) * args.num_images
    if total > MAX_IMAGES:
        raise InputError(f"this command makes {total} images ({len(prompts)} prompts x {args.num_images}); "
                         f"one command makes at most {MAX_IMAGES}: use `flowkit batch` for more")
    out = check_out("--out", args.out, DEFAULT_OUT)
    out_format = "PNG"
    if sequence:
        out_is_file = out.suffix.lower() in (".fa", ".fasta", ".txt") and not out.is_dir()
        if args.out is not None and not out_is_file:
            raise InputError(f"--out {clip(str(out))!r}: sequence models write one FASTA file (.fa, .fasta or "
                             ".txt); leave --out out to print to stdout")
    else:
        out_is_file, out_format = _image_file(out)
    if out_is_file and total != 1 and not sequence:
        raise InputError(f"--out {clip(str(out))!r} names one file, but this command makes {total} images: "
                         "give a folder")
    if not out_is_file and out.exists() and not out.is_dir():
        raise InputError(f"--out {clip(str(out))!r} is a file: give a folder, or an image file name for one image")
    if out_is_file and args.out is not None and out.exists() and not args.force:
        raise InputError(f"--out {clip(str(out))!r} exists: pass --force to overwrite it, or give another name")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return GenerateOptions(
        prompts=prompts, model=model, model_given=args.model is not None, sampler=sampler,
        guidance=guidance, grid=grid, steps=args.steps, seed=args.seed, num_images=args.num_images,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, out=out,
        out_is_file=out_is_file, json=args.json, progress=progress, sequence=sequence, length=args.length,
        out_given=args.out is not None, batch_size=args.batch_size, force=args.force, out_format=out_format,
        compile=bool(getattr(args, "compile", False)),
    )


def _image_file(out: Path) -> tuple[bool, str]:
    """(whether --out names one image file, its PIL format): an existing folder is a folder; a
    name whose extension PIL writes is a file in that format; another file extension
    (.txt, .mp4, .psd, ...) is refused; anything else (no extension, `run.1`) is a folder."""
    from flowkit.storage import image_format

    if out.is_dir():
        return False, "PNG"
    fmt = image_format(out)
    if fmt is not None:
        return True, fmt
    suffix = out.suffix.lower()
    if suffix and mimetypes.guess_type(f"x{suffix}")[0] is not None:
        raise InputError(f"--out {clip(str(out))!r}: flowkit cannot write {suffix} files; give an image file "
                         "(.png, .jpg, .webp, .bmp, .tiff) or a folder")
    return False, "PNG"


def _sequence_prompts(args: argparse.Namespace, model: str) -> tuple[list[str], bool]:
    """(prompts, whether the model makes sequences): --class values join the prompts, checked
    against the dna world's classes; a sequence model with none samples unconditionally."""
    from flowkit.loading import SEQUENCE_MODELS

    sequence = model in SEQUENCE_MODELS
    if not sequence:
        for flag, given in (("--class", args.classes), ("--length", args.length is not None)):
            if given:
                raise InputError(f"{flag} is for sequence models ({', '.join(SEQUENCE_MODELS)}), not {model!r}")
        if not args.prompts:
            raise InputError("give at least one prompt")
        return list(args.prompts), False
    if args.height is not None:
        raise InputError("sequence models take --length, not --height/--width")
    prompts = list(args.prompts) + list(args.classes)
    if model.startswith("dna"):
        from flowkit.worlds.dna import CLASSES, check_length, parse_class

        for p in prompts:
            if p.strip():
                with_flag("--class", parse_class, p)
        if args.length is not None:
            with_flag("--length", check_length, args.length)
        prompts = [CLASSES[parse_class(p)] if p.strip() else "" for p in prompts]
    return prompts or [""], True


def cmd_generate(args: argparse.Namespace) -> int:
    opts = generate_options(args)
    if opts.sequence:
        return _generate_sequences(opts)
    from flowkit.batch.files import check_writable

    out_dir = opts.out.parent if opts.out_is_file else opts.out
    check_writable(out_dir, "--out")  # created, and proved writable, before the model loads
    pipe, model = load_model(opts.model, opts.model_given)
    run = _ImageRun(opts, model, out_dir)
    try:
        run.sample_all(pipe)
    except KeyboardInterrupt:
        run.close()
        where = f" in {out_dir}" if run.files else ""
        say(f"interrupted: {len(run.files)} of {opts.total} images written{where}")
        return 130
    run.close()
    if opts.json:
        print(json.dumps({
            "model": model, "files": run.files, "seeds": run.seeds, "prompts": run.prompts,
            "steps": opts.steps, "sampler": run.sampler, "guidance": run.guidance, "seconds": run.seconds,
            "stats": {"nfe": run.nfe, "forward_calls": run.forward_calls, "backward_calls": run.backward_calls,
                      "reward_calls": run.reward_calls, "seconds": run.seconds,
                      "forward_seconds": run.forward_seconds, "compiled": run.compiled,
                      "compiles": run.compiles, "compile_seconds": run.compile_seconds},
        }, indent=2))
        return 0
    nfe = sorted(set(run.nfe))
    per_image = str(nfe[0]) if len(nfe) == 1 else f"{nfe[0]}-{nfe[-1]}"
    plural = "s" if len(run.files) != 1 else ""
    compiled = f" (compiled: {run.compile_seconds:.1f} s of it compiling)" if run.compiled else ""
    # backward passes and reward/counter calls of guidance modules are not NFE: shown beside it
    backward = f"{run.backward_calls} backward pass{'es' if run.backward_calls != 1 else ''}"
    rewards = f"{run.reward_calls} reward call{'s' if run.reward_calls != 1 else ''}"
    print(f"{len(run.files)} image{plural} in {run.seconds:.2f} s{compiled}, {per_image} NFE per image, "
          f"{backward}, {rewards}, sampler {run.sampler}, guidance {run.guidance}")
    return 0


class _ImageRun:
    """The images of one `generate` command, made micro-batch by micro-batch and each written
    at once (its path printed, unless --json): what is written survives an interrupt."""

    def __init__(self, opts: GenerateOptions, model: str, out_dir: Path):
        from tqdm.auto import tqdm

        self.opts, self.model, self.out_dir = opts, model, out_dir
        self.files: list[str] = []
        self.seeds: list[int] = []
        self.prompts: list[str] = []
        self.nfe: list[int] = []
        self.seconds = self.forward_seconds = 0.0
        self.forward_calls = 0
        self.backward_calls = self.reward_calls = 0  # summed over micro-batches, as the NFE are listed
        self.compiled, self.compiles, self.compile_seconds = False, 0, 0.0  # --compile: graphs built, their time
        self.sampler = self.guidance = ""
        self.number = None if opts.out_is_file else _next_number(out_dir)
        self.bar = tqdm(total=opts.total, unit="img", desc="generate", disable=not opts.progress, file=sys.stderr,
                        dynamic_ncols=True)

    def sample_all(self, pipe: Any) -> None:
        """Sample and write the images in order, micro-batch by micro-batch. Out of memory
        halves the micro-batch and retries it (and every later one at the smaller size): image
        i keeps its index, seed and name, as a run with the smaller --batch-size gives them;
        out of memory with one image is an InputError (the images written stay)."""
        import flowkit
        from flowkit.batch.microbatch import Halving

        opts = self.opts

        def sample(indices: list[int]) -> Any:
            return flowkit.sample(
                pipe, [opts.prompts[i // opts.num_images] for i in indices], sampler=opts.sampler, steps=opts.steps,
                guidance=opts.guidance, seed=opts.seed, negative_prompt=opts.negative_prompt, height=opts.height,
                width=opts.width, grid=opts.grid, start_index=indices[0], compile=opts.compile)

        halving = Halving(opts.batch_size, say)
        for indices, result in halving.pieces(range(opts.total), sample, self._too_big):
            self._record(result, indices)
            del result

    def _too_big(self, index: int) -> InputError:
        """The error of out of memory with one image (the images written stay)."""
        opts = self.opts
        size = f"{opts.height}x{opts.width}" if opts.height is not None else "default-size"
        kept = f"; the {len(self.files)} images written are kept" if self.files else ""
        halved = f" (--batch-size {opts.batch_size} halved down to 1)" if opts.batch_size > 1 else ""
        return InputError(f"out of memory sampling one {size} image, even at batch size 1{halved}: lower "
                          f"--height/--width, or free memory on the device{kept}")

    def _record(self, result: Any, indices: list[int]) -> None:
        """Write the images of one sampled micro-batch and add its stats to the run's."""
        opts = self.opts
        stats = result.stats
        self.compiled = self.compiled or stats.compiled
        self.compiles += stats.compiles
        self.compile_seconds += stats.compile_seconds
        self.sampler, self.guidance = stats.sampler, stats.guidance
        self.seconds += stats.seconds
        self.forward_seconds += stats.forward_seconds
        self.forward_calls += stats.forward_calls
        self.backward_calls += stats.backward_calls
        self.reward_calls += stats.reward_calls
        for i, image, prompt, seed, nfe in zip(indices, result.images, result.prompts, result.seeds, stats.nfe):
            path = self._write(image, prompt, i, seed)
            self.files.append(str(path))
            self.seeds.append(seed)
            self.prompts.append(prompt)
            self.nfe.append(int(nfe))
            if not opts.json:
                print(f"{path}  seed={seed}", flush=True)
            self.bar.update(1)

    def _write(self, image: Any, prompt: str, index: int, seed: int) -> Path:
        from flowkit.batch.files import image_metadata
        from flowkit.storage import image_bytes, write_atomic, write_new

        opts = self.opts
        width, height = image.size
        data = image_bytes(image, opts.out_format, image_metadata(
            prompt=prompt, negative_prompt=opts.negative_prompt, seed=opts.seed, seed_index=index, noise_seed=seed,
            sampler=self.sampler, guidance=self.guidance, steps=opts.steps, height=height, width=width,
            grid=None if opts.grid is None else opts.grid.describe(), model=self.model))
        if opts.out_is_file:
            try:
                (write_atomic if opts.force else write_new)(opts.out, data)
            except FileExistsError:
                raise InputError(f"--out {clip(str(opts.out))!r} exists: pass --force to overwrite it, or give "
                                 "another name") from None
            return opts.out
        while True:  # the next free number: another writer may take one meanwhile
            path = self.out_dir / f"{self.number:05d}-{slug(prompt)}.png"
            self.number += 1
            try:
                write_new(path, data)
                return path
            except FileExistsError:
                continue

    def close(self) -> None:
        self.bar.close()


def _next_number(folder: Path) -> int:
    """One more than the highest number of a numbered image (NNNNN-...) in `folder`, or 0."""
    try:
        names = [e.name for e in os.scandir(folder)]
    except OSError:
        return 0
    numbers = [int(m.group(1)) for name in names if (m := _NUMBERED.match(name))]
    return max(numbers) + 1 if numbers else 0


def _generate_sequences(opts: GenerateOptions) -> int:
    """Sample a sequence model in micro-batches and print FASTA (or write it to --out): one
    record per sequence, its header the index, class and seed."""
    import flowkit
    from flowkit.storage import write_atomic, write_new
    from flowkit.worlds.dna import format_fasta

    pipe, model = load_model(opts.model, opts.model_given)
    seqs, classes, seeds, nfe, seconds = [], [], [], [], 0.0
    stats = None
    for start in range(0, opts.total, opts.batch_size):
        indices = range(start, min(start + opts.batch_size, opts.total))
        result = flowkit.sample(pipe, [opts.prompts[i // opts.num_images] for i in indices], sampler=opts.sampler,
                                steps=opts.steps, guidance=opts.guidance, seed=opts.seed,
                                negative_prompt=opts.negative_prompt, length=opts.length, grid=opts.grid,
                                start_index=start, progress=False,
                                compile=opts.compile)
        stats = result.stats
        seqs += [s if isinstance(s, str) else " ".join(map(str, s)) for s in result.images]
        classes += result.prompts
        seeds += result.seeds
        nfe += [int(n) for n in stats.nfe]
        seconds += stats.seconds
    if opts.json:
        print(json.dumps({"model": model, "sequences": seqs, "classes": classes, "seeds": seeds,
                          "steps": opts.steps, "sampler": stats.sampler, "guidance": stats.guidance,
                          "stats": {"nfe": nfe, "seconds": seconds}}, indent=2))
        return 0
    text = format_fasta((f"{i} class={p or 'none'} seed={seed}", s)
                        for i, (s, p, seed) in enumerate(zip(seqs, classes, seeds)))
    if opts.out_given:
        try:
            (write_atomic if opts.force else write_new)(opts.out, text.encode("utf-8"))
        except FileExistsError:
            raise InputError(f"--out {clip(str(opts.out))!r} exists: pass --force to overwrite it, or give "
                             "another name") from None
        print(f"{opts.out}  ({len(seqs)} sequences)")
    else:
        sys.stdout.write(text)
    return 0
