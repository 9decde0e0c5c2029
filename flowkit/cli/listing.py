"""`flowkit list`: the registered samplers, guidance modules, models and experiments."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "cmd_list", "LIST_KINDS"]

LIST_KINDS = ("samplers", "guidance", "rewards", "models", "experiments")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `list` to the `flowkit` subcommands."""
    li = sub.add_parser("list", help="list samplers, guidance modules, models and experiments")
    li.add_argument("what", nargs="?", choices=(*LIST_KINDS, "all"), default="all")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)
    return li


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

        table = GUIDANCE.describe()
        # a module that runs others (`diffusers:name=...`) lists each with its options and defaults
        for _, cls in GUIDANCE.items():
            variants = getattr(cls, "variants", None)
            if callable(variants):
                table.update(variants())
        return table
    if kind == "rewards":
        from flowkit.registry import REWARDS

        return REWARDS.describe()
    if kind == "models":
        from flowkit.loading import BUILTIN_MODELS

        return dict(BUILTIN_MODELS)
    from flowkit.bench import available

    return available()
