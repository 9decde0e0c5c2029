"""`flowkit tune METHOD`: compute precomputed sampler data for a model (`boss` step sizes).

    flowkit tune boss --model shapes --prompts single --steps 4,6,8 --k-max 64 --samples 64
    flowkit tune boss --model shapes --cost endpoint --k-max 16 --samples 16

Options are checked before a model is loaded (the memory the trajectories need too, for a
built-in model); the work is `flowkit.tune.tune_boss`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowkit.cli.options import check_int, check_out, check_size_and_model, load_model, with_flag
from flowkit.errors import InputError, UnsupportedError, clip
from flowkit.limits import MAX_IMAGES, MAX_K, MAX_SEED, check_tune_memory
from flowkit.loading import builtin_latent_elements
from flowkit.tune import load_prompts

__all__ = ["add_parser", "cmd_tune", "parse_steps_list", "TuneOptions", "tune_options"]

METHODS = ("boss",)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `tune` to the `flowkit` subcommands."""
    t = sub.add_parser("tune", help="compute sampler data (BOSS step sizes) for a model",
                       description="Compute precomputed sampler data for a model: `boss` step sizes.")
    t.add_argument("method", choices=METHODS)
    t.add_argument("--model", default=None, help="a built-in model or a local diffusers folder (default shapes; "
                                                 "tiny if the shapes weights are not installed)")
    t.add_argument("--prompts", default=None, metavar="FILE|SET",
                   help="a text file (one prompt a line) or a shapes prompt set: single, two, counting "
                        "(default: single)")
    t.add_argument("--steps", default="4,6,8", metavar="K,K,...", help="step counts whose grids are stored (default: 4,6,8)")
    t.add_argument("--k-max", type=int, default=64,
                   help=f"steps of the fine grid, 2 to {MAX_K} (endpoint cost: keep it small; default: 64)")
    t.add_argument("--samples", type=int, default=32, help="trajectories (N; default: 32)")
    t.add_argument("--cost", choices=("local", "endpoint", "final"), default="local",
                   help="local: the paper's cost; endpoint / final: flowkit's variants (each jump rolled out to "
                        "the end / a direct search of each --steps grid on the final error)")
    t.add_argument("--guidance", default=None, metavar="SPEC", help="guidance stack (default: CFG at the model's "
                                                                    "scale), or none")
    t.add_argument("--seed", type=int, default=None, help="base seed of the trajectories")
    t.add_argument("--height", type=int, default=None, metavar="H")
    t.add_argument("--width", type=int, default=None, metavar="W")
    t.add_argument("-o", "--out", default=None, metavar="FILE", help="also write the table to this JSON file")
    t.add_argument("--ship", default=None, metavar="NAME", help="write flowkit/weights/boss/NAME.json (shipped)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_tune)
    return t


def parse_steps_list(text: str) -> list[int]:
    """'4,6,8' -> [4, 6, 8]: distinct integers >= 1, in increasing order."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",")]
    if not parts or any(not p for p in parts):
        raise InputError(f"--steps: give step counts separated by commas, e.g. 4,6,8; got {clip(str(text))!r}")
    out = []
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 6:
            raise InputError(f"--steps: {clip(p)!r} is not a whole number of steps (at most {MAX_K}); e.g. 4,6,8")
        k = int(p)
        if k < 1:
            raise InputError(f"--steps: step counts must be >= 1, got {k}")
        out.append(k)
    return sorted(set(out))


@dataclass(frozen=True)
class TuneOptions:
    model: str
    model_given: bool
    prompts: str | None
    steps: list[int]
    k_max: int
    samples: int
    cost: str
    guidance: Any  # GuidanceStack or None (CFG at the model's scale)
    seed: int
    height: int | None
    width: int | None
    out: Path | None
    ship: str | None
    json: bool


def tune_options(args: argparse.Namespace) -> TuneOptions:
    """Check `tune`'s parsed arguments (nothing is loaded); FlowkitError names the option."""
    from flowkit.api import build_guidance
    from flowkit.boss import TUNE_SEED

    steps = parse_steps_list(args.steps)
    check_int("--k-max", args.k_max, 2, MAX_K)
    check_int("--samples", args.samples, 1, MAX_IMAGES)
    if steps[-1] > args.k_max:
        raise InputError(f"--steps: {steps[-1]} steps need a fine grid of at least as many: raise --k-max "
                         f"(now {args.k_max})")
    if args.seed is not None:
        check_int("--seed", args.seed, 0, MAX_SEED)
    out = check_out("--out", args.out)
    if out is not None and out.is_dir():
        raise InputError(f"--out {clip(str(out))!r} is a folder: give a file name, e.g. {clip(str(out / 'boss.json'))}")
    model = check_size_and_model(args)
    _refuse_sequence_model(model)
    elements = builtin_latent_elements(model, args.height, args.width)
    if elements is not None:  # a folder's latent size is known once loaded: tune_boss checks it then
        check_tune_memory(args.samples, args.k_max, elements)
    guidance = None if args.guidance is None else with_flag("--guidance", build_guidance, args.guidance, 0.0)
    if args.prompts is not None:
        load_prompts(args.prompts)  # a missing file or unknown set fails before the model loads
    if args.ship is not None and (not args.ship or not all(c.isalnum() or c in "-_" for c in args.ship)):
        raise InputError(f"--ship: a table name holds letters, digits, '-' and '_', got {args.ship!r}")
    if out is not None:
        from flowkit.batch.files import check_writable

        check_writable(out.parent if str(out.parent) else Path("."), "--out")  # before hours of tuning
    return TuneOptions(model=model, model_given=args.model is not None, prompts=args.prompts, steps=steps,
                       k_max=args.k_max, samples=args.samples, cost=args.cost, guidance=guidance,
                       seed=TUNE_SEED if args.seed is None else args.seed, height=args.height, width=args.width,
                       out=out, ship=args.ship, json=args.json)


def _refuse_sequence_model(model: str) -> None:
    from flowkit.loading import SEQUENCE_MODELS

    if model in SEQUENCE_MODELS:
        raise UnsupportedError(f"--model {model!r} makes sequences; BOSS step sizes are tuned for an image model "
                               "(shapes, tiny or a diffusers folder)")


def cmd_tune(args: argparse.Namespace) -> int:
    from flowkit.boss import path_cost, shipped_root
    from flowkit.tune import tune_boss

    opts = tune_options(args)
    pipe, model = load_model(opts.model, opts.model_given)
    table, shape = tune_boss(pipe, prompts=load_prompts(opts.prompts), samples=opts.samples, k_max=opts.k_max,
                             cost=opts.cost, guidance=opts.guidance, seed=opts.seed, height=opts.height,
                             width=opts.width, steps=opts.steps, model=model)
    written = [table.save_to_cache()]
    if opts.out is not None:
        written.append(table.save(opts.out))
    if opts.ship is not None:
        written.append(table.save(shipped_root() / f"{opts.ship}.json"))
    report = []
    for k in opts.steps:
        total = path_cost(table.cost, table.indices(k))  # the stored grid's (final: its local cost)
        uniform = path_cost(table.cost, [round(i * opts.k_max / k) for i in range(k + 1)]) \
            if opts.k_max % k == 0 else None
        report.append({"steps": k, "times": [round(float(v), 6) for v in table.times(k).tolist()], "cost": total,
                       "uniform_cost": uniform})
    if opts.json:
        print(json.dumps({"model": model, "fingerprint": table.fingerprint, "shape": list(shape), "cost": opts.cost,
                          "nfe": table.nfe, "files": [str(p) for p in written], "grids": report}, indent=2))
        return 0
    lines = [f"BOSS ({opts.cost} cost) for {model} [{table.fingerprint}], latent {list(shape)}: "
             f"{opts.samples} trajectories x {opts.k_max} steps, {table.nfe} NFE"]
    for r in report:
        uni = "" if r["uniform_cost"] is None else f" (uniform: {r['uniform_cost']:.4g})"
        times = ", ".join(f"{v:.4f}" for v in r["times"])
        lines.append(f"  {r['steps']} steps: [{times}]  {'local ' if opts.cost == 'final' else ''}"
                     f"cost {r['cost']:.4g}{uni}")
    lines += [f"wrote {p}" for p in written]
    print("\n".join(lines))
    return 0
