"""`flowkit bench NAME [--quick]`: run an experiment, print its table, write its JSON.

`main(argv)` parses the arguments after `bench`, so the top-level CLI can hand them over
(`flowkit.cli.bench.main(rest)`); `python -m flowkit.bench` runs it directly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from flowkit.batch.files import check_writable
from flowkit.bench.core import available, get_experiment, run_experiment
from flowkit.cli.options import check_int, check_out
from flowkit.limits import MAX_SEED
from flowkit.bench.report import format_result, update_benchmarks

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "flowkit bench") -> argparse.ArgumentParser:
    """The argument parser of the bench command."""
    p = argparse.ArgumentParser(prog=prog, description="Run a named bench experiment and report its claims.")
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--quick", action="store_true", help="few samples, a smoke run (writes NAME.quick.json)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("-o", "--out", default="docs/results", help="folder for the JSON results (default docs/results)")
    p.add_argument("--cache", default=None, help="result cache root (default $FLOWKIT_CACHE/bench)")
    p.add_argument("--seed", type=int, default=None, help=f"override the experiment's base seed (0 to {MAX_SEED})")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="cap every arm at N samples (recorded in the result; a later run adds the rest from the cache)")
    p.add_argument("--adopt", default=None, metavar="ARM[,ARM...]",
                   help="take these arms' samples from a results file written before arm keys were recorded "
                        "(recorded in the result's info)")
    p.add_argument(
        "--docs", default=None, metavar="FILE",
        help="after the run, regenerate the experiment sections of FILE (e.g. docs/benchmarks.md) from --out",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench command; returns the exit status (0 unless the arguments are wrong)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for name, description in available().items():
            print(f"{name:24s} {description}")
        if args.list:
            return 0
        print("flowkit: error: give the NAME of an experiment (one of the above)", file=sys.stderr)
        return 2
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be a positive integer, got {args.max_samples}")
    # every input checked before the experiment runs (it may take hours)
    get_experiment(args.name)
    if args.seed is not None:
        check_int("--seed", args.seed, 0, MAX_SEED)
    out = check_out("--out", args.out)
    check_writable(out, "--out")
    adopt = [a.strip() for a in args.adopt.split(",") if a.strip()] if args.adopt else []
    result = run_experiment(args.name, quick=args.quick, out_dir=args.out, cache_root=args.cache, seed=args.seed,
                            max_samples=args.max_samples, adopt=adopt)
    print(format_result(result))
    print(f"\nwrote {result.path}")
    if args.docs:
        update_benchmarks(args.out, args.docs)
        print(f"updated {args.docs}")
    return 0
