"""`flowkit train TARGET`: train one of the small models this project ships, resumably."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from flowkit.cli.options import check_int, check_out
from flowkit.errors import InputError
from flowkit.limits import MAX_BATCH_SIZE, MAX_THREADS, MAX_TRAIN_STEPS

__all__ = ["add_parser", "cmd_train"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `train` to the `flowkit` subcommands."""
    t = sub.add_parser("train", help="train one of the small models", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a target, resuming from OUT/latest.pt unless --no-resume.")
    t.add_argument("-h", "--help", action=_HelpWithTargets, help="show this help (with the targets) and exit")
    t.add_argument("target", metavar="TARGET", help="what to train: one of the targets listed below, or "
                   "name:key=value,... for a target with options (alignprop:reward=count,truncation=fixed,k=2)")
    t.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="checkpoint folder (default checkpoints/TARGET, options included as a slug)")
    t.add_argument("--steps", type=int, default=None,
                   help=f"total steps, 1 to {MAX_TRAIN_STEPS:,} (the target's curriculum follows)")
    t.add_argument("--batch-size", type=int, default=None, help=f"examples per step, 1 to {MAX_BATCH_SIZE:,}")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--threads", type=int, default=None,
                   help=f"torch threads, 0 to {MAX_THREADS:,} (0: torch's default)")
    t.add_argument("--device", default=None, help="cpu (default) or cuda[:N]; a checkpoint resumes on either")
    t.add_argument("--no-resume", dest="resume", action="store_false", help="start again from step 0")
    t.add_argument("--export-only", action="store_true",
                   help="export the EMA weights of OUT/latest.pt to OUT/export without training")
    t.set_defaults(func=cmd_train)
    return t


class _HelpWithTargets(argparse.Action):
    """-h/--help: the help with the training targets listed (looked up only when asked: the
    lookup imports the trainers)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from flowkit.train import targets

        table = targets()
        width = max(map(len, table), default=0)
        parser.epilog = "targets:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in sorted(table.items()))
        parser.print_help()
        parser.exit()


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
    for key, minimum, maximum in (("steps", 1, MAX_TRAIN_STEPS), ("batch_size", 1, MAX_BATCH_SIZE),
                                  ("threads", 0, MAX_THREADS)):
        if key in overrides:
            check_int("--" + key.replace("_", "-"), overrides[key], minimum, maximum)
    if "lr" in overrides and not (math.isfinite(overrides["lr"]) and overrides["lr"] > 0):
        raise InputError(f"--lr must be a finite number > 0, got {overrides['lr']}")
    task, cfg = target(args.target)  # UnknownNameError lists the known targets
    cfg = dataclasses.replace(cfg, **overrides)
    if "steps" in overrides and hasattr(task, "total_steps"):
        task.total_steps = cfg.steps  # the target's curriculum is laid out over the whole run
    out = check_out("--out", args.out)
    if out is None:
        from flowkit.storage import slug

        out = Path("checkpoints") / (args.target if ":" not in args.target else slug(args.target, 120))
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
