"""flowkit's error classes: each a ValueError whose message says what to change."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "FlowkitError",
    "SpecError",
    "UnknownNameError",
    "GuidanceStackError",
    "UnsupportedError",
    "NonFiniteError",
    "InputError",
    "WeightsError",
    "closest",
    "clip",
]

CLIP = 80  # characters of a user's input that an error message repeats


class FlowkitError(ValueError):
    """Base class of every flowkit input error."""


class SpecError(FlowkitError):
    """A sampler or guidance spec that does not parse or does not fit its target."""


class UnknownNameError(FlowkitError):
    """A sampler, guidance module, model or option name that is not registered."""


class GuidanceStackError(FlowkitError):
    """A guidance stack that cannot work as composed (two combiners, a policy without one)."""


class UnsupportedError(FlowkitError):
    """A combination that flowkit refuses, with the reason."""


class NonFiniteError(FlowkitError, FloatingPointError):
    """NaN or inf appeared during sampling; the message names the first bad step."""


class InputError(FlowkitError):
    """Bad user input: steps, sizes, prompts, generators."""


class WeightsError(FlowkitError):
    """A missing or damaged weights file; the message names the file."""


def closest(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or '' (case is ignored: 'CFG' finds 'cfg')."""
    known = [str(k) for k in known]
    by_lower: dict[str, str] = {}
    for k in known:
        by_lower.setdefault(k.lower(), k)
    match = difflib.get_close_matches(str(name)[:200].lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def clip(text: str, limit: int = CLIP) -> str:
    """`text` cut to `limit` characters (middle elided, with the count), for error messages that
    repeat a user's input: a 10,000-character value is not echoed whole."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 20, 10)
    return f"{text[:keep // 2 + keep % 2]}...({len(text)} characters)...{text[len(text) - keep // 2:]}"
