"""`flowkit batch PROMPTS --out DIR`: the subcommand's parser, option checks and output (the
work is `flowkit.batch.run_batch` with a `BatchConfig`).

The options mirror `flowkit generate` (same spec grammar, seeds, size and grid options,
checked the same way before a model is loaded) plus the batch ones: --batch-size,
--resume/--no-resume, --force, --on-error. Under ``accelerate launch`` every process runs
this same command; rank 0 reports the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from flowkit.cli.options import (
    DEFAULT_MODEL,
    FALLBACK_MODEL,
    check_grid,
    check_int,
    check_out,
    check_size_and_model,
    say,
    with_flag,
)
from flowkit.errors import clip
from flowkit.limits import MAX_BATCH_SIZE, MAX_SEED, MAX_STEPS, check_text

if TYPE_CHECKING:
    from flowkit.batch.runner import BatchConfig, Summary

__all__ = ["add_parser", "batch_options", "cmd_batch"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `batch` to the `flowkit` subcommands."""
    b = sub.add_parser(
        "batch", help="generate images from a prompt file, resumably, on one or many processes",
        description="Generate one image per line of a .txt, .jsonl or .csv prompt file into DIR, each written "
                    "atomically and recorded in DIR/manifest.jsonl; a second run resumes. Runs unchanged under "
                    "`accelerate launch --multi_gpu --num_processes N -m flowkit batch ...` (CPU or GPUs).")
    b.add_argument("prompts", metavar="PROMPTS", help=".txt (one prompt a line), .jsonl or .csv (prompt, seed, "
                   "sampler, guidance, steps, size, negative_prompt)")
    b.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="output folder (images, manifest.jsonl, run.json); other files in it are never touched")
    b.add_argument("--model", default=None,
                   help=f"a built-in model or a local diffusers folder (default {DEFAULT_MODEL}; "
                        f"'{FALLBACK_MODEL}' if its weights are not installed)")
    b.add_argument("--sampler", default="euler", metavar="SPEC", help="default sampler spec")
    b.add_argument("--guidance", default=None, metavar="SPEC",
                   help="default guidance stack, or none (default: CFG at the model's scale)")
    b.add_argument("--steps", type=int, default=30, help=f"sampling steps, 1 to {MAX_STEPS} (default: 30)")
    b.add_argument("--seed", type=int, default=0,
                   help="item i without a seed column uses flowkit.seed_for(SEED, i); a seed column s gives "
                        "the image of `flowkit generate PROMPT --seed s`")
    b.add_argument("--negative-prompt", default=None, metavar="TEXT")
    b.add_argument("--height", type=int, default=None, metavar="H")
    b.add_argument("--width", type=int, default=None, metavar="W")
    b.add_argument("--grid", default=None, help="time grid: uniform, shift:S, dynamic[:MU] or sigmas:T1;T2;...")
    b.add_argument("--batch-size", type=int, default=8,
                   help="images per forward pass, halved on out-of-memory (default: 8)")
    b.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip images already done and verified in DIR (default); --no-resume redoes everything")
    b.add_argument("--force", action="store_true",
                   help="resume even if DIR/run.json holds other settings, redoing the images that change (a "
                        "finished image is never deleted: one that no longer belongs is kept and reported)")
    b.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="a malformed prompt-file line stops the run before any work (default), or is skipped "
                        "with a warning naming its line")
    b.add_argument("--compile", action="store_true",
                   help="run the network under torch.compile(fullgraph=True); a new micro-batch size compiles "
                        "once more (the compile time is in the summary)")
    b.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr, rank 0 (default: when stderr is a terminal)")
    b.set_defaults(func=cmd_batch)
    return b


def batch_options(args: argparse.Namespace) -> "BatchConfig":
    """Check `batch`'s parsed arguments as `generate`'s are checked; FlowkitError names the option."""
    from flowkit.api import build_guidance, build_sampler
    from flowkit.batch.prompts import canonical_spec
    from flowkit.batch.runner import BatchConfig
    from flowkit.errors import InputError

    check_int("--steps", args.steps, 1, MAX_STEPS)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    out = check_out("--out", args.out)
    if not str(args.prompts).strip():
        raise InputError("PROMPTS is empty: give a .txt, .jsonl or .csv prompt file")
    model = check_size_and_model(args)
    if args.negative_prompt is not None:
        check_text("--negative-prompt", args.negative_prompt)
    _refuse_sequence_model(model)
    with_flag("--sampler", build_sampler, args.sampler)
    sampler = with_flag("--sampler", canonical_spec, args.sampler, "sampler")
    guidance = None
    if args.guidance is not None:
        with_flag("--guidance", build_guidance, args.guidance, 0.0)
        guidance = with_flag("--guidance", canonical_spec, args.guidance, "guidance")
    check_grid(args.grid, model, args.steps)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {clip(str(out))!r} is a file: give a folder")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return BatchConfig(
        prompts=Path(args.prompts), out=out, model=model, model_given=args.model is not None, sampler=sampler,
        guidance=guidance, steps=args.steps, seed=args.seed, negative_prompt=args.negative_prompt,
        height=args.height, width=args.width, grid=args.grid, batch_size=args.batch_size, resume=args.resume,
        force=args.force, on_error=args.on_error, progress=progress, compile=bool(getattr(args, "compile", False)),
    )


def _refuse_sequence_model(model: str) -> None:
    from flowkit.errors import UnsupportedError

    try:
        from flowkit.loading import SEQUENCE_MODELS
    except ImportError:  # pragma: no cover - an older tree without sequence models
        return
    if model in SEQUENCE_MODELS:
        raise UnsupportedError(f"--model {model!r} makes sequences; `flowkit batch` makes images: give an image "
                               "model, or use `flowkit generate` for sequences")


def cmd_batch(args: argparse.Namespace) -> int:
    """Run the batch job of parsed `args` (progress lines and warnings on stderr); rank 0
    prints the summary (JSON with --json) for every rank."""
    from flowkit.batch.runner import run_batch

    cfg = batch_options(args)
    try:
        summary = run_batch(cfg, say=lambda text: print(f"flowkit batch: {text}", file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        say(f"interrupted; the finished images are kept in {cfg.out}: run the same command again to resume "
            "(it makes only the missing ones)")
        return 130
    if summary is not None:
        print(json.dumps(summary.to_dict(), indent=2) if args.json else _text(summary))
    return 0


def _text(s: "Summary") -> str:
    per_image = f", {s.nfe / len(s.generated):.1f} NFE per image" if s.generated else ""
    ranks = f" on {s.world_size} processes ({', '.join(f'rank {r}: {n}' for r, n in sorted(s.per_rank.items()))})" \
        if s.world_size > 1 else ""
    skipped = f"; {len(s.errors)} bad lines skipped" if s.errors else ""
    orphans = f"; {len(s.orphans)} finished images kept but no longer in the manifest (see {s.out / 'orphans.jsonl'})" \
        if s.orphans else ""
    compiled = f" (compiled: {s.compile_seconds:.1f} s of it compiling)" if s.compiled else ""
    return (f"{len(s.generated)} images in {s.seconds:.2f} s{compiled} ({s.images_per_second:.2f} images/s){per_image}, "
            f"{s.nfe} NFE{ranks}; {s.already_done} already done{skipped}{orphans}\n"
            f"manifest: {s.out / 'manifest.jsonl'}")
