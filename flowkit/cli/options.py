"""What every `flowkit` subcommand checks the same way: numbers, sizes, model names, and
one line per error on stderr (exit status 2)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from flowkit.errors import FlowkitError, InputError, UnknownNameError, clip, closest
from flowkit.limits import MAX_SIZE
from flowkit.limits import check_int as _check_int

__all__ = ["DEFAULT_MODEL", "FALLBACK_MODEL", "report", "check_int", "with_flag", "check_size_and_model",
           "check_model", "check_out", "check_grid", "load_model", "say", "MAX_MESSAGE", "quiet_transformers"]

MAX_MESSAGE = 1000  # characters of an error line; longer ones keep their start and their end (the advice)

from flowkit.loading import DEFAULT_MODEL, FALLBACK_MODEL  # noqa: E402  (cheap: no torch at import)


def report(error: Exception) -> int:
    """Print `error` as one line on stderr; the exit status of bad input."""
    message = " ".join(str(error).splitlines()) or type(error).__name__
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE // 2]} ... {message[-MAX_MESSAGE // 2:]}"
    print(f"flowkit: error: {message}", file=sys.stderr)
    return 2


def say(text: str) -> None:
    """A note of the CLI's own on stderr."""
    print(f"flowkit: {text}", file=sys.stderr, flush=True)


def check_int(flag: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """`value` from `minimum` to `maximum` (flowkit.limits), else InputError naming the option."""
    return _check_int(flag, value, minimum, maximum)


def check_out(flag: str, value: str | None, default: str | None = None) -> Path | None:
    """The path an --out option names (`default` when not given); an empty name is refused
    (it would silently mean the current folder)."""
    if value is None:
        return None if default is None else Path(default)
    if not str(value).strip():
        raise InputError(f"{flag} is empty: give a file or folder name ('.' for the current folder)")
    return Path(value)


def with_flag(flag: str, build: Any, *args: Any) -> Any:
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
        check_int("--height", args.height, 1, MAX_SIZE)
        check_int("--width", args.width, 1, MAX_SIZE)
    model = args.model if args.model is not None else DEFAULT_MODEL
    check_model(model)
    if args.height is not None and not _is_dir(model):
        from flowkit.loading import check_builtin_size

        with_flag("--height/--width", check_builtin_size, model, args.height, args.width)
    return model


def check_grid(text: str | None, model: str, steps: int | None) -> Any:
    """--grid parsed and checked as far as it can be without the model (TimeGrid, or None):
    `dynamic` without mu on a built-in model (none has an image sequence length to derive it
    from), and a registered kind's argument (a BOSS table is read, and must hold `steps`)."""
    if text is None:
        return None
    from flowkit.timegrid import TimeGrid

    grid = with_flag("--grid", TimeGrid.parse, text)
    if grid.kind == "dynamic" and grid.mu is None and not _is_dir(model):
        raise InputError(f"--grid dynamic: model {clip(model)!r} has no image sequence length to derive mu from "
                         "(FLUX's rule): give it, e.g. --grid dynamic:0.5")
    if grid.registered and not grid.sigmas and steps is not None:
        with_flag("--grid", grid.build, steps, None)
    return grid


def check_model(name: str) -> None:
    """A built-in model name or an existing folder, else UnknownNameError (nothing is loaded)."""
    from flowkit.loading import BUILTIN_MODELS

    if name in BUILTIN_MODELS or _is_dir(name):
        return
    raise UnknownNameError(f"--model: unknown model {clip(name)!r}{closest(name, BUILTIN_MODELS)}; give one of "
                           f"{', '.join(BUILTIN_MODELS)} or the path of a local diffusers folder")


def _is_dir(path: str) -> bool:
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # NUL bytes, unknown ~user, no home directory
        return False


def load_model(model: str, model_given: bool) -> tuple[Any, str]:
    """(pipeline, model name) for a command's --model; the default model falls back to the
    untrained tiny one, with a note, when its weights are not installed."""
    from flowkit.loading import load_model as load

    return load(model if model_given else None, on_fallback=say)


class _ImageProcessorFallback(logging.Filter):
    """Drops transformers' note that an image processor falls back to PIL without torchvision."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def quiet_transformers() -> None:
    """Silence what transformers says about modules flowkit does not use: diffusers' pipelines
    import transformers' image processors (for safety checkers and IP-Adapters, which flowkit
    does not run), and without torchvision transformers warns about each of them. A filter on
    the one transformers logger that says it (`transformers.utils.import_utils`, through
    `transformers.utils.logging`) drops those lines only; the rest of transformers' messages,
    and its verbosity, are left as they are. Idempotent."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # transformers not installed: nothing to silence
        return
    logger = transformers_logging.get_logger("transformers.utils.import_utils")
    if not any(isinstance(f, _ImageProcessorFallback) for f in logger.filters):
        logger.addFilter(_ImageProcessorFallback())
