"""`flowkit`: the command line. It parses and dispatches; the work is done by library
functions (flowkit.sample, flowkit.loading, flowkit.batch, flowkit.tune, flowkit.gallery,
flowkit.train, flowkit.bench).

One module per subcommand (generate, list, batch, gallery, tune, bench, train), each with
`add_parser(sub)` and its `cmd_*` function; `options` holds the checks they share. Torch
and diffusers are imported inside the subcommands.

Exit codes: 0 done; 2 bad input (argparse usage errors, and every `FlowkitError` printed as
one line ``flowkit: error: <message>``; an OSError the file system raises is printed the
same way); 130 interrupted (what was finished is kept: `generate` and `batch` say where).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from flowkit.cli.generate import GenerateOptions, generate_options
from flowkit.cli.options import quiet_transformers, report
from flowkit.errors import FlowkitError, InputError

__all__ = ["main", "build_parser", "parse_generate_args", "GenerateOptions"]


def build_parser() -> argparse.ArgumentParser:
    """The `flowkit` parser with every subcommand (each module's parser is cheap: no torch)."""
    from flowkit import __version__
    from flowkit.cli import batch, gallery, generate, listing, train, tune

    p = argparse.ArgumentParser(prog="flowkit", description="Samplers and composable guidance for "
                                "diffusion and flow-matching models.")
    p.add_argument("--version", action="version", version=f"flowkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.add_parser(sub)
    listing.add_parser(sub)
    batch.add_parser(sub)
    gallery.add_parser(sub)
    tune.add_parser(sub)
    # Parsed by flowkit.cli.bench (main hands it the rest of the line); here for --help only.
    sub.add_parser("bench", help="run a bench experiment (flowkit bench --help)", add_help=False)
    train.add_parser(sub)
    return p


def parse_generate_args(argv: Sequence[str]) -> GenerateOptions:
    """Parse and check the arguments after `generate`, loading nothing.

    Bad input prints its error on stderr and raises SystemExit(2), as on the command line.
    """
    args = build_parser().parse_args(["generate", *argv])
    try:
        return generate_options(args)
    except FlowkitError as e:
        raise SystemExit(report(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run `flowkit` with `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            from flowkit.cli.bench import main as bench_main

            quiet_transformers()
            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command != "list":  # the commands that load models (and so transformers)
            quiet_transformers()
        return args.func(args)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except FlowkitError as e:
        return report(e)
    except OSError as e:  # the file system refused (read-only, full, a file in the way): one line, not a traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return report(InputError(f"{e.strerror or e}{where}"))
    except KeyboardInterrupt:
        print("flowkit: interrupted", file=sys.stderr)
        return 130
