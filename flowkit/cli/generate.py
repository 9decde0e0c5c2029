"""`flowkit generate PROMPT...`: images (PNG) or sequences (FASTA) from prompts.

`generate_options` checks every option (specs, grid, numbers, model name, output path)
before a model is loaded, so a typo fails at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowkit.cli.options import (
    DEFAULT_MODEL,
    FALLBACK_MODEL,
    check_int,
    check_size_and_model,
    load_model,
    with_flag,
)
from flowkit.errors import InputError
from flowkit.storage import slug

__all__ = ["add_parser", "GenerateOptions", "generate_options", "cmd_generate"]

DEFAULT_OUT = "flowkit-out"


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
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--seed", type=int, default=0, help="image i uses flowkit.seed_for(SEED, i)")
    g.add_argument("-n", "--num-images", type=int, default=1, metavar="N", help="images per prompt")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT")
    g.add_argument("--height", type=int, default=None, metavar="H")
    g.add_argument("--width", type=int, default=None, metavar="W")
    g.add_argument("--grid", default=None, help="time grid: uniform, shift:S, dynamic[:MU] or sigmas:T1;T2;...")
    g.add_argument("--out", default=None, metavar="FILE_OR_DIR",
                   help=f"a .png file (one image) or a directory (default ./{DEFAULT_OUT}/)")
    g.add_argument("--compile", action="store_true",
                   help="run the network under torch.compile(fullgraph=True) (the first call compiles: "
                        "minutes on a CPU; its time is reported)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: when stderr is a terminal)")
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
    compile: bool = False

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_images


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """Check `generate`'s parsed arguments; FlowkitError names the option to change."""
    from flowkit.api import build_guidance, build_sampler
    from flowkit.timegrid import TimeGrid

    check_int("--steps", args.steps, 1)
    check_int("--seed", args.seed, 0)
    check_int("-n/--num-images", args.num_images, 1)
    model = check_size_and_model(args)
    sampler = None if args.sampler is None else with_flag("--sampler", build_sampler, args.sampler)
    guidance = None if args.guidance is None else with_flag("--guidance", build_guidance, args.guidance, 0.0)
    grid = None if args.grid is None else with_flag("--grid", TimeGrid.parse, args.grid)
    prompts, sequence = _sequence_prompts(args, model)

    total = len(prompts) * args.num_images
    out = Path(args.out if args.out is not None else DEFAULT_OUT)
    out_is_file = out.suffix.lower() in ((".fa", ".fasta", ".txt") if sequence else (".png",)) and not out.is_dir()
    if sequence and args.out is not None and not out_is_file:
        raise InputError(f"--out {str(out)!r}: sequence models write one FASTA file (.fa, .fasta or .txt); "
                         "leave --out out to print to stdout")
    if out_is_file and total != 1 and not sequence:
        raise InputError(f"--out {str(out)!r} names one file, but this command makes {total} images: "
                         "give a directory")
    if not out_is_file and out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file: give a directory, or a .png name for one image")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return GenerateOptions(
        prompts=prompts, model=model, model_given=args.model is not None, sampler=sampler,
        guidance=guidance, grid=grid, steps=args.steps, seed=args.seed, num_images=args.num_images,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, out=out,
        out_is_file=out_is_file, json=args.json, progress=progress, sequence=sequence, length=args.length,
        out_given=args.out is not None, compile=bool(getattr(args, "compile", False)),
    )


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
    import flowkit

    opts = generate_options(args)
    if opts.sequence:
        return _generate_sequences(opts)
    out_dir = opts.out.parent if opts.out_is_file else opts.out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out: cannot create folder {str(out_dir)!r}: {e.strerror}") from None
    pipe, model = load_model(opts.model, opts.model_given)
    result = flowkit.sample(
        pipe, opts.prompts, sampler=opts.sampler, steps=opts.steps, guidance=opts.guidance, seed=opts.seed,
        negative_prompt=opts.negative_prompt, height=opts.height, width=opts.width, grid=opts.grid,
        num_images_per_prompt=opts.num_images, progress=opts.progress, compile=opts.compile,
    )
    files = []
    for i, (image, prompt) in enumerate(zip(result.images, result.prompts)):
        path = opts.out if opts.out_is_file else out_dir / f"{i:05d}-{slug(prompt)}.png"
        _write_png(image, path)
        files.append(str(path))
    stats = result.stats
    if opts.json:
        print(json.dumps({
            "model": model, "files": files, "seeds": result.seeds, "prompts": result.prompts,
            "steps": opts.steps, "sampler": stats.sampler, "guidance": stats.guidance, "seconds": stats.seconds,
            "stats": {"nfe": stats.nfe, "forward_calls": stats.forward_calls, "seconds": stats.seconds,
                      "forward_seconds": stats.forward_seconds, "compiled": stats.compiled,
                      "compiles": stats.compiles, "compile_seconds": stats.compile_seconds},
        }, indent=2))
        return 0
    for path, seed in zip(files, result.seeds):
        print(f"{path}  seed={seed}")
    nfe = sorted(set(stats.nfe))
    per_image = str(nfe[0]) if len(nfe) == 1 else f"{nfe[0]}-{nfe[-1]}"
    plural = "s" if len(files) != 1 else ""
    compiled = f" (compiled: {stats.compile_seconds:.1f} s of it compiling)" if stats.compiled else ""
    print(f"{len(files)} image{plural} in {stats.seconds:.2f} s{compiled}, {per_image} NFE per image, "
          f"sampler {stats.sampler}, guidance {stats.guidance}")
    return 0


def _generate_sequences(opts: GenerateOptions) -> int:
    """Sample a sequence model and print FASTA (or write it to --out): one record per sequence,
    its header the index, class and seed."""
    import flowkit
    from flowkit.worlds.dna import format_fasta

    pipe, model = load_model(opts.model, opts.model_given)
    result = flowkit.sample(pipe, opts.prompts, sampler=opts.sampler, steps=opts.steps, guidance=opts.guidance,
                            seed=opts.seed, negative_prompt=opts.negative_prompt, length=opts.length,
                            grid=opts.grid, num_images_per_prompt=opts.num_images, progress=opts.progress,
                            compile=opts.compile)
    seqs = [s if isinstance(s, str) else " ".join(map(str, s)) for s in result.images]
    if opts.json:
        print(json.dumps({"model": model, "sequences": seqs, "classes": result.prompts, "seeds": result.seeds,
                          "steps": opts.steps, "sampler": result.stats.sampler, "guidance": result.stats.guidance,
                          "stats": {"nfe": result.stats.nfe, "seconds": result.stats.seconds}}, indent=2))
        return 0
    text = format_fasta((f"{i} class={p or 'none'} seed={seed}", s)
                        for i, (s, p, seed) in enumerate(zip(seqs, result.prompts, result.seeds)))
    if opts.out_given:
        try:
            opts.out.write_text(text)
        except OSError as e:
            raise InputError(f"cannot write {str(opts.out)!r}: {e.strerror or e}") from None
        print(f"{opts.out}  ({len(seqs)} sequences)")
    else:
        sys.stdout.write(text)
    return 0


def _write_png(image: Any, path: Path) -> None:
    """Write `image` to `path` atomically: a temporary file beside it, then os.replace."""
    import io

    from flowkit.storage import write_atomic

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
