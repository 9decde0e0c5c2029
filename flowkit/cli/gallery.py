"""`flowkit gallery`: draw each bench method beside its baseline into gallery/ (the work is
`flowkit.gallery.build_gallery`)."""

from __future__ import annotations

import argparse

from flowkit.cli.options import check_model, check_out

__all__ = ["add_parser", "cmd_gallery"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `gallery` to the `flowkit` subcommands."""
    g = sub.add_parser("gallery", help="draw the bench methods beside their baselines into gallery/",
                       description="Redraw each bench method's pictures beside its baseline's (entries recorded "
                                   "by the experiments in their results JSON) and write index.md and index.html.")
    g.add_argument("--results", default="docs/results", metavar="DIR", help="bench results (default docs/results)")
    g.add_argument("-o", "--out", default="gallery", metavar="DIR", help="output folder (default gallery)")
    g.add_argument("--model", default=None, help="draw every entry with this model instead of the one it names")
    g.add_argument("--quick", action="store_true", help="also read NAME.quick.json where no NAME.json exists")
    g.set_defaults(func=cmd_gallery)
    return g


def cmd_gallery(args: argparse.Namespace) -> int:
    from flowkit.gallery import build_gallery

    if args.model is not None:
        check_model(args.model)
    out = check_out("--out", args.out)
    results = check_out("--results", args.results)
    index = build_gallery(results, out, model=args.model, quick=args.quick)
    print(f"wrote {index} and {index.with_suffix('.html')}")
    return 0
