"""`flowkit`: the command line (`generate`, `list`, `bench`, `train`; `batch` and `gallery` from
flowkit.batch.command and flowkit.gallery; `tune` from flowkit.tune).

One function per subcommand (`cmd_generate`, ...), all parsers built in `build_parser`.
`generate` checks every option (specs, grid, numbers, model name, output path) in
`parse_generate_args` before a model is loaded, so a typo fails at once. Torch and
diffusers are imported inside the subcommands.

Exit codes: 0 done; 2 bad input (argparse usage errors, and every `FlowkitError` printed as
one line ``flowkit: error: <message>``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from flowkit.errors import FlowkitError, InputError, UnknownNameError, closest

__all__ = ["main", "build_parser", "parse_generate_args", "GenerateOptions"]

DEFAULT_MODEL = "shapes"
FALLBACK_MODEL = "tiny"
DEFAULT_OUT = "flowkit-out"
LIST_KINDS = ("samplers", "guidance", "models", "experiments")


# --------------------------------------------------------------------------- parsers


def build_parser() -> argparse.ArgumentParser:
    """The `flowkit` parser with every subcommand."""
    from flowkit import __version__

    p = argparse.ArgumentParser(prog="flowkit", description="Samplers and composable guidance for "
                                "diffusion and flow-matching models.")
    p.add_argument("--version", action="version", version=f"flowkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: when stderr is a terminal)")
    g.set_defaults(func=cmd_generate)

    li = sub.add_parser("list", help="list samplers, guidance modules, models and experiments")
    li.add_argument("what", nargs="?", choices=(*LIST_KINDS, "all"), default="all")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)

    from flowkit.batch.command import add_parser as add_batch_parser  # both cheap: no torch at import
    from flowkit.gallery import add_parser as add_gallery_parser

    add_batch_parser(sub)
    add_gallery_parser(sub)

    from flowkit.tune import add_parser as add_tune_parser  # cheap: no torch at import

    add_tune_parser(sub)

    # Parsed by flowkit.bench.cli (main hands it the rest of the line); here for --help only.
    sub.add_parser("bench", help="run a bench experiment (flowkit bench --help)", add_help=False)

    t = sub.add_parser("train", help="train one of the small models",
                       description="Train a target, resuming from OUT/latest.pt unless --no-resume.")
    t.add_argument("target", metavar="TARGET")
    t.add_argument("--out", default=None, metavar="DIR", help="checkpoint folder (default checkpoints/TARGET)")
    t.add_argument("--steps", type=int, default=None, help="total steps (the target's curriculum follows)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch threads (0: torch's default)")
    t.add_argument("--device", default=None, help="cpu (default) or cuda[:N]; a checkpoint resumes on either")
    t.add_argument("--no-resume", dest="resume", action="store_false", help="start again from step 0")
    t.add_argument("--export-only", action="store_true",
                   help="export the EMA weights of OUT/latest.pt to OUT/export without training")
    t.set_defaults(func=cmd_train)
    return p


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run `flowkit` with `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            from flowkit.bench.cli import main as bench_main

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except FlowkitError as e:
        return _report(e)
    except KeyboardInterrupt:
        print("flowkit: interrupted", file=sys.stderr)
        return 130


def _report(error: Exception) -> int:
    """Print `error` as one line on stderr; the exit status of bad input."""
    message = " ".join(str(error).splitlines()) or type(error).__name__
    print(f"flowkit: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- generate


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

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_images


def parse_generate_args(argv: Sequence[str]) -> GenerateOptions:
    """Parse and check the arguments after `generate`, loading nothing.

    Bad input prints its error on stderr and raises SystemExit(2), as on the command line.
    """
    args = build_parser().parse_args(["generate", *argv])
    try:
        return generate_options(args)
    except FlowkitError as e:
        raise SystemExit(_report(e)) from None


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """Check `generate`'s parsed arguments; FlowkitError names the option to change."""
    from flowkit.api import build_guidance, build_sampler
    from flowkit.timegrid import TimeGrid

    _check_int("--steps", args.steps, 1)
    _check_int("--seed", args.seed, 0)
    _check_int("-n/--num-images", args.num_images, 1)
    model = check_size_and_model(args)
    sampler = None if args.sampler is None else _with_flag("--sampler", build_sampler, args.sampler)
    guidance = None if args.guidance is None else _with_flag("--guidance", build_guidance, args.guidance, 0.0)
    grid = None if args.grid is None else _with_flag("--grid", TimeGrid.parse, args.grid)
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
        out_given=args.out is not None,
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
                _with_flag("--class", parse_class, p)
        if args.length is not None:
            _with_flag("--length", check_length, args.length)
        prompts = [CLASSES[parse_class(p)] if p.strip() else "" for p in prompts]
    return prompts or [""], True


def _check_int(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise InputError(f"{flag} must be an integer >= {minimum}, got {value}")


def _with_flag(flag: str, build: Any, *args: Any) -> Any:
    """`build(*args)`, its FlowkitError prefixed with the option's name."""
    try:
        return build(*args)
    except FlowkitError as e:
        raise type(e)(f"{flag}: {e}") from None


def check_size_and_model(args: argparse.Namespace) -> str:
    """The --height/--width pair (both or neither, each >= 1) and --model (default
    DEFAULT_MODEL) of a command; returns the model name. Nothing is loaded."""
    if (args.height is None) != (args.width is None):
        raise InputError("give both --height and --width, or neither")
    if args.height is not None:
        _check_int("--height", args.height, 1)
        _check_int("--width", args.width, 1)
    model = args.model if args.model is not None else DEFAULT_MODEL
    _check_model(model)
    return model


def _check_model(name: str) -> None:
    """A built-in model name or an existing folder, else UnknownNameError (nothing is loaded)."""
    from flowkit.loading import BUILTIN_MODELS

    if name in BUILTIN_MODELS or _is_dir(name):
        return
    raise UnknownNameError(f"--model: unknown model {name!r}{closest(name, BUILTIN_MODELS)}; give one of "
                           f"{', '.join(BUILTIN_MODELS)} or the path of a local diffusers folder")


def _is_dir(path: str) -> bool:
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # NUL bytes, unknown ~user, no home directory
        return False


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
    pipe, model = _load_model(opts)
    result = flowkit.sample(
        pipe, opts.prompts, sampler=opts.sampler, steps=opts.steps, guidance=opts.guidance, seed=opts.seed,
        negative_prompt=opts.negative_prompt, height=opts.height, width=opts.width, grid=opts.grid,
        num_images_per_prompt=opts.num_images, progress=opts.progress,
    )
    files = []
    for i, (image, prompt) in enumerate(zip(result.images, result.prompts)):
        path = opts.out if opts.out_is_file else out_dir / f"{i:05d}-{_slug(prompt)}.png"
        _write_png(image, path)
        files.append(str(path))
    stats = result.stats
    if opts.json:
        print(json.dumps({
            "model": model, "files": files, "seeds": result.seeds, "prompts": result.prompts,
            "steps": opts.steps, "sampler": stats.sampler, "guidance": stats.guidance, "seconds": stats.seconds,
            "stats": {"nfe": stats.nfe, "forward_calls": stats.forward_calls, "seconds": stats.seconds,
                      "forward_seconds": stats.forward_seconds},
        }, indent=2))
        return 0
    for path, seed in zip(files, result.seeds):
        print(f"{path}  seed={seed}")
    nfe = sorted(set(stats.nfe))
    per_image = str(nfe[0]) if len(nfe) == 1 else f"{nfe[0]}-{nfe[-1]}"
    plural = "s" if len(files) != 1 else ""
    print(f"{len(files)} image{plural} in {stats.seconds:.2f} s, {per_image} NFE per image, "
          f"sampler {stats.sampler}, guidance {stats.guidance}")
    return 0


def _generate_sequences(opts: GenerateOptions) -> int:
    """Sample a sequence model and print FASTA (or write it to --out): one record per sequence,
    its header the index, class and seed."""
    import flowkit
    from flowkit.worlds.dna import format_fasta

    pipe, model = _load_model(opts)
    result = flowkit.sample(pipe, opts.prompts, sampler=opts.sampler, steps=opts.steps, guidance=opts.guidance,
                            seed=opts.seed, negative_prompt=opts.negative_prompt, length=opts.length,
                            grid=opts.grid, num_images_per_prompt=opts.num_images, progress=opts.progress)
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


def _load_model(opts: GenerateOptions) -> tuple[Any, str]:
    """(pipeline, model name); the default model falls back to the tiny one if not installed."""
    from flowkit.errors import WeightsError
    from flowkit.loading import load

    try:
        return load(opts.model), opts.model
    except WeightsError as e:
        if opts.model_given:
            raise
        print(f"flowkit: note: the default model {opts.model!r} is not available ({e}); using the untrained "
              f"{FALLBACK_MODEL!r} model instead", file=sys.stderr)
        return load(FALLBACK_MODEL), FALLBACK_MODEL


def _slug(prompt: str, limit: int = 40) -> str:
    """A file-name part from a prompt: lower-case ASCII letters and digits joined by '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def _write_png(image: Any, path: Path) -> None:
    """Write `image` to `path` atomically: a temporary file beside it, then os.replace."""
    import io

    from flowkit.batch.files import write_atomic

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- batch, tune, gallery


def cmd_tune(args: argparse.Namespace) -> int:
    from flowkit.tune import run_tune

    print(run_tune(args))
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from flowkit.gallery import build_gallery

    if args.model is not None:
        _check_model(args.model)
    index = build_gallery(args.results, args.out, model=args.model, quick=args.quick)
    print(f"wrote {index} and {index.with_suffix('.html')}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from flowkit.batch.command import run_command

    report = run_command(args, say=lambda text: print(f"flowkit batch: {text}", file=sys.stderr, flush=True))
    if report is not None:
        print(report)
    return 0


# --------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    tables = {kind: _describe(kind) for kind in LIST_KINDS if args.what in (kind, "all")}
    if args.json:
        print(json.dumps(tables, indent=2))
        return 0
    for k, (kind, table) in enumerate(tables.items()):
        print(("\n" if k else "") + f"{kind}:")
        width = max(map(len, table), default=0)
        for name, description in table.items():
            print(f"  {name:<{width}}  {description}")
    return 0


def _describe(kind: str) -> dict[str, str]:
    """Registered name -> one-line description, for one kind of `flowkit list`."""
    if kind == "samplers":
        from flowkit.registry import SAMPLERS

        return SAMPLERS.describe()
    if kind == "guidance":
        from flowkit.registry import GUIDANCE

        return GUIDANCE.describe()
    if kind == "models":
        from flowkit.loading import BUILTIN_MODELS

        return dict(BUILTIN_MODELS)
    from flowkit.bench import available

    return available()


# --------------------------------------------------------------------------- train


def _train_device(name: str | None) -> str | None:
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda[:N], got {name!r}")
    return str(device)


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from flowkit.train import target, train

    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
                 "device": _train_device(args.device)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key, minimum in (("steps", 1), ("batch_size", 1), ("threads", 0)):
        if key in overrides:
            _check_int("--" + key.replace("_", "-"), overrides[key], minimum)
    if "lr" in overrides and not (math.isfinite(overrides["lr"]) and overrides["lr"] > 0):
        raise InputError(f"--lr must be a finite number > 0, got {overrides['lr']}")
    try:
        task, cfg = target(args.target)
    except FlowkitError:
        raise
    except ValueError as e:  # flowkit.train.target's unknown name
        raise UnknownNameError(str(e)) from None
    cfg = dataclasses.replace(cfg, **overrides)
    if "steps" in overrides and hasattr(task, "total_steps"):
        task.total_steps = cfg.steps  # the target's curriculum is laid out over the whole run
    out = Path(args.out if args.out is not None else Path("checkpoints") / args.target)
    if args.export_only:
        from flowkit.train.loop import export_checkpoint

        export_checkpoint(task, out)
        print(f"exported weights: {out / 'export'}")
        return 0
    try:
        losses = train(task, cfg, out, resume=args.resume, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print(f"flowkit: interrupted; run the same command again to resume from {out / 'latest.pt'}",
              file=sys.stderr)
        return 130
    last = f", last loss {losses[-1]:.4f}" if losses else ""
    print(f"trained {args.target} to step {cfg.steps} ({len(losses)} steps in this run{last})")
    print(f"exported weights: {out / 'export'}")
    return 0
