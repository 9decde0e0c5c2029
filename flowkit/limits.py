"""The bounds on every number and file flowkit takes, the same on every surface.

The command line, prompt files, gallery entries, `flowkit.sample` and the drop-in check
their numbers against these limits before any work, with one `InputError` line that names
the value and its range. Each bound is far beyond any real use: a value past it can only
be a mistake (or an attack), and would otherwise allocate without end.
"""

from __future__ import annotations

import os
from typing import Any

from flowkit.errors import InputError, clip

__all__ = ["MAX_STEPS", "MAX_SIZE", "MAX_SEED", "MAX_IMAGES", "MAX_BATCH_SIZE", "MAX_K", "MAX_COLUMNS",
           "MAX_FILE_BYTES", "MAX_TRAIN_STEPS", "MAX_THREADS", "MAX_TUNE_BYTES", "LIMITS", "check_int", "read_bounded",
           "check_text", "check_texts", "check_generators", "check_optional_int", "check_tune_memory", "kind"]

MAX_STEPS = 10_000  # sampling steps of one run
MAX_SIZE = 8_192  # pixels per side (height, width)
MAX_SEED = 2**63 - 1  # seeds: 0 to 2^63 - 1
MAX_IMAGES = 100_000  # images of one command or call (generate, flowkit.sample, a gallery entry, tune's samples)
MAX_BATCH_SIZE = 4_096  # images per forward pass (--batch-size)
MAX_K = 1_000  # steps of a BOSS fine grid (tune --k-max): its cost matrix grows as K^2
MAX_COLUMNS = 16  # images per prompt and arm of a gallery entry
MAX_FILE_BYTES = 64 * 2**20  # a text input flowkit reads: prompt file, spec file, BOSS table, bench results
MAX_TRAIN_STEPS = 10_000_000  # optimiser steps of `flowkit train` (the shipped targets train for thousands)
MAX_THREADS = 1_024  # torch threads (`flowkit train --threads`)
MAX_TUNE_BYTES = 8 * 2**30  # the trajectories `flowkit tune boss` keeps: every step of every one, in memory

# name -> (minimum, maximum, what it bounds): the table README.md documents
LIMITS = {
    "steps": (1, MAX_STEPS, "sampling steps (--steps, prompt files, gallery entries, steps=, num_inference_steps=)"),
    "height/width": (1, MAX_SIZE, "pixels per side"),
    "seed": (0, MAX_SEED, "seeds"),
    "images": (1, MAX_IMAGES, "images of one command or call (prompts x images per prompt)"),
    "batch size": (1, MAX_BATCH_SIZE, "images per forward pass (--batch-size)"),
    "k-max": (2, MAX_K, "steps of a BOSS fine grid (tune --k-max)"),
    "columns": (1, MAX_COLUMNS, "images per prompt and arm of a gallery entry"),
    "file bytes": (0, MAX_FILE_BYTES, "bytes of a text file flowkit reads"),
    "train steps": (1, MAX_TRAIN_STEPS, "optimiser steps of flowkit train (--steps)"),
    "train batch size": (1, MAX_BATCH_SIZE, "examples per optimiser step of flowkit train (--batch-size)"),
    "threads": (0, MAX_THREADS, "torch threads of flowkit train (--threads; 0: torch's default)"),
    "tune bytes": (0, MAX_TUNE_BYTES, "bytes of the trajectories tune boss keeps: "
                   "2 (positions, velocities) x samples x (k-max + 1) x latent values x 4"),
}


def check_int(what: str, value: Any, lo: int, hi: int | None = None) -> int:
    """`value` as an int from `lo` to `hi` (no bound above if None); InputError otherwise.

    bool, float, str and None are refused, not converted: `seed=1.5` or `steps="3"` is a mistake.
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and lo <= value and (hi is None or value <= hi):
        return int(value)
    want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    if ok:
        shown = str(value) if value.bit_length() <= 200 else f"a number of {value.bit_length()} bits"
    elif value is None or isinstance(value, (str, float, bool)):
        shown = clip(repr(value))
    else:
        shown = kind(value)
    raise InputError(f"{what} must be {want}, got {shown}")


def tune_bytes(samples: int, k_max: int, latent_elements: int) -> int:
    """Bytes of the trajectories BOSS tuning keeps: the position and the velocity (float32)
    at each of the k_max + 1 fine-grid points of each of `samples` trajectories."""
    return 2 * samples * (k_max + 1) * latent_elements * 4


def check_tune_memory(samples: int, k_max: int, latent_elements: int) -> None:
    """InputError when BOSS tuning of `samples` trajectories of `k_max` steps, each state of
    `latent_elements` values, would keep more than MAX_TUNE_BYTES of trajectories."""
    need = tune_bytes(samples, k_max, latent_elements)
    if need > MAX_TUNE_BYTES:
        raise InputError(f"--samples {samples} x --k-max {k_max} would keep {need / 2**30:,.1f} GiB of trajectories "
                         f"(positions and velocities: 2 x {samples} x {k_max + 1} x {latent_elements} latent values x 4 bytes), more "
                         f"than the {MAX_TUNE_BYTES // 2**30} GiB limit: lower --samples or --k-max (or the size)")


def kind(value: Any) -> str:
    """'None', 'an int', 'a list', ...: what a wrong value is, for a message."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def check_text(what: str, value: Any) -> str:
    """A str that is valid Unicode text (no lone surrogates: what a non-UTF-8 command-line
    argument becomes); InputError otherwise."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} {clip(value)!r} is not valid UTF-8 text: give it as UTF-8") from None
    return value


def check_texts(what: str, value: Any) -> list[str]:
    """A string or a non-empty list (or tuple) of strings -> the list; InputError otherwise."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise InputError(f"{what} must be a string or a list of strings, got {kind(value)}")
    if not items:
        raise InputError(f"{what} is empty: give at least one string")
    for k, item in enumerate(items):
        check_text(f"{what}[{k}]" if len(items) > 1 or not isinstance(value, str) else what, item)
    return items


def check_optional_int(what: str, value: Any, lo: int, hi: int | None = None) -> int | None:
    """None, or `check_int(what, value, lo, hi)`."""
    return None if value is None else check_int(what, value, lo, hi)


def check_generators(value: Any) -> list[Any] | None:
    """None, or a list (or tuple) of torch.Generator objects -> the list; InputError otherwise."""
    if value is None:
        return None
    import torch

    if isinstance(value, torch.Generator):
        raise InputError("generators must be a list of torch.Generator objects, one per image, not one generator")
    if not isinstance(value, (list, tuple)):
        raise InputError(f"generators must be a list of torch.Generator objects, one per image, got {kind(value)}")
    for k, g in enumerate(value):
        if not isinstance(g, torch.Generator):
            raise InputError(f"generators[{k}] must be a torch.Generator, got {kind(g)}: "
                             "give one torch.Generator per image (or seed=)")
    return list(value)


def read_bounded(path: str | os.PathLike[str], what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a text input, at most `limit` of them: a larger file (or an endless one,
    such as a link to /dev/zero) is an InputError, read no further than the limit. OSError
    passes through (the caller names the file)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{what} {clip(os.fspath(path))!r} is larger than {limit // 2**20} MiB, the limit for a "
                         "file flowkit reads: split it")
    return data
