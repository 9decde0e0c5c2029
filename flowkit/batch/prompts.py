"""Prompt files for `flowkit batch`: .txt, .jsonl and .csv, read line by line.

Formats (UTF-8; blank lines are not items; one item per line, so line numbers are exact):

- ``.txt``: one prompt a line (surrounding whitespace stripped).
- ``.jsonl``: one JSON object a line: ``{"prompt": ..., "seed": 3, "sampler": "heun",
  "guidance": "cfg:scale=5", "steps": 20, "size": "32x32", "negative_prompt": ...}``;
  ``guidance`` and ``sampler`` may also be the JSON spec form (``[{"name": ..., "params":
  {...}}]``); ``null`` means the command line's default.
- ``.csv``: a header line naming the columns (``prompt`` required, the others as in
  .jsonl), then one row a line; an empty cell means the default.

``size`` is ``N`` (square), ``HxW`` or, in JSON, ``[H, W]``. Sampler and guidance columns
use the one spec grammar (`flowkit.spec`); they are checked here against the registry.

An item's `index` is the ordinal of its data line (0-based, blank lines and the CSV header
not counted, malformed lines counted), so fixing a bad line later shifts no other item.
Every data line becomes a `PromptItem` or a `LineError` with its line number: nothing is
dropped silently, and nothing but `flowkit.errors.FlowkitError` escapes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from flowkit.errors import FlowkitError, InputError, clip, closest
from flowkit.limits import MAX_SEED, MAX_SIZE, MAX_STEPS, read_bounded

__all__ = ["PromptItem", "LineError", "PromptFile", "FORMATS", "COLUMNS", "read_prompt_file", "parse_prompt_lines",
           "parse_size", "canonical_spec"]

FORMATS = (".txt", ".jsonl", ".csv")
COLUMNS = ("prompt", "seed", "sampler", "guidance", "steps", "size", "negative_prompt")


@dataclass(frozen=True)
class PromptItem:
    """One item of a prompt file; None means "the command line's default"."""

    index: int
    line: int
    prompt: str
    seed: int | None = None
    sampler: str | None = None  # canonical spec text
    guidance: str | None = None  # canonical spec text, "none" for no guidance
    steps: int | None = None
    size: tuple[int, int] | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class LineError:
    index: int
    line: int
    message: str

    def describe(self, name: str) -> str:
        return f"{name}:{self.line}: {self.message}"


@dataclass
class PromptFile:
    name: str
    format: str
    sha256: str
    items: list[PromptItem] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Data lines (items and malformed lines)."""
        return len(self.items) + len(self.errors)


class _Bad(Exception):
    """A malformed value on one line (becomes a LineError)."""


# --------------------------------------------------------------------------- values


def canonical_spec(value: Any, what: str) -> str:
    """The canonical text of a spec given as text or in the JSON form; _Bad if it does not parse."""
    from flowkit import spec

    if isinstance(value, str):
        if what == "guidance" and value.strip().lower() in ("", "none"):
            return "none"
        items = spec.parse(value)
    elif isinstance(value, (list, dict)):
        items = spec.parse(json.dumps([value] if isinstance(value, dict) else value))  # the JSON form
    else:
        raise _Bad(f"{what} must be a spec string or a list of {{\"name\", \"params\"}} objects, got {_kind(value)}")
    return spec.format(items) if items else "none"


def parse_size(value: Any) -> tuple[int, int]:
    """N, "N", "HxW" or [H, W] -> (H, W), each >= 1."""
    if isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value):
        h, w = value
    elif _is_int(value):
        h = w = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d{1,6}\s*([xX]\s*\d{1,6}\s*)?", value):
        parts = [int(p) for p in re.split(r"[xX]", value)]
        h, w = (parts[0], parts[0]) if len(parts) == 1 else parts
    else:
        raise _Bad(f"size must be N, \"HxW\" or [H, W], got {_show(value)}")
    if not (1 <= h <= MAX_SIZE and 1 <= w <= MAX_SIZE):
        raise _Bad(f"size must be from 1 to {MAX_SIZE} px per side, got {h}x{w}")
    return int(h), int(w)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(value: Any, what: str, lo: int, hi: int, *, text: bool = False) -> int:
    """An integer column; `text`: the value may be its decimal text (CSV cells are text; in
    JSON a number must be a number: "3" is refused, not converted)."""
    if text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,25}\s*", value):
        value = int(value)
    if isinstance(value, str) and not text and re.fullmatch(r"\s*[+-]?\d{1,25}\s*", value):
        raise _Bad(f"{what} must be a JSON number, not a string: write {value.strip()} without quotes")
    if not _is_int(value) or not lo <= value <= hi:
        raise _Bad(f"{what} must be an integer from {lo} to {hi}, got {_show(value)}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} must be a string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}.get(type(value),
                                                                                      type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Checker:
    """Builds each distinct sampler / guidance spec once against the registry."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], str | None] = {}

    def __call__(self, what: str, value: Any) -> str:
        try:
            text = canonical_spec(value, what)
        except FlowkitError as e:
            raise _Bad(f"{what}: {e}") from None
        key = (what, text)
        if key not in self._seen:
            self._seen[key] = self._build(what, text)
        if self._seen[key] is not None:
            raise _Bad(self._seen[key])
        return text

    @staticmethod
    def _build(what: str, text: str) -> str | None:
        from flowkit.api import build_guidance, build_sampler

        try:
            build_sampler(text) if what == "sampler" else build_guidance(text, 0.0)
        except FlowkitError as e:
            return f"{what}: {e}"
        return None


def _item(index: int, line: int, fields: Mapping[str, Any], check: Callable[[str, Any], str], *,
          text: bool = False) -> PromptItem:
    """A PromptItem from a mapping of column -> value (None or "" in CSV: the default)."""
    unknown = [k for k in fields if k not in COLUMNS]
    if unknown:
        k = str(unknown[0])
        raise _Bad(f"unknown field {_show(k)}{closest(k, COLUMNS)}; fields are {', '.join(COLUMNS)}")
    if "prompt" not in fields:
        raise _Bad("no \"prompt\" field")
    given = {k: v for k, v in fields.items() if v is not None and k != "prompt"}
    seed = _int(given["seed"], "seed", 0, MAX_SEED, text=text) if "seed" in given else None
    steps = _int(given["steps"], "steps", 1, MAX_STEPS, text=text) if "steps" in given else None
    size = parse_size(given["size"]) if "size" in given else None
    sampler = check("sampler", given["sampler"]) if "sampler" in given else None
    guidance = check("guidance", given["guidance"]) if "guidance" in given else None
    negative = _text(given["negative_prompt"], "negative_prompt") if "negative_prompt" in given else None
    return PromptItem(index, line, _text(fields["prompt"], "prompt"), seed, sampler, guidance, steps, size, negative)


# --------------------------------------------------------------------------- formats


def _txt(line: str) -> dict[str, Any]:
    return {"prompt": line.strip()}


def _jsonl(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _Bad("not valid JSON: nested too deeply") from None
    except ValueError as e:
        raise _Bad(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _Bad(f"expected a JSON object with a \"prompt\", got {_kind(data)}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if a key appears twice (json keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"the key {_show(key)} appears twice in one object: keep one")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Bad(f"non-finite number {name}")


def _csv_row(line: str) -> list[str]:
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error as e:
        raise _Bad(f"not a valid CSV row: {e}") from None
    return rows[0] if rows else []


def _csv_header(line: str, lineno: int) -> list[str]:
    try:
        names = [c.strip() for c in _csv_row(line)]
    except _Bad as e:
        raise InputError(f"line {lineno}: the CSV header {e}") from None
    for name in names:
        if name not in COLUMNS:
            raise InputError(f"line {lineno}: unknown CSV column {_show(name)}{closest(name, COLUMNS)}; "
                             f"columns are {', '.join(COLUMNS)}")
    if len(set(names)) != len(names):
        raise InputError(f"line {lineno}: a CSV column is named twice in {', '.join(names)}")
    if "prompt" not in names:
        raise InputError(f"line {lineno}: the CSV header has no \"prompt\" column (have: {', '.join(names)})")
    return names


def _lines(data: bytes) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None if it is not UTF-8) for each line, split on "\\n" only."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for k, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield k, raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            yield k, None


def parse_prompt_lines(data: bytes, fmt: str, *, check: Callable[[str, Any], str] | None = None,
                       name: str = "prompts") -> PromptFile:
    """Parse a prompt file's bytes in format `fmt` (".txt", ".jsonl" or ".csv").

    Only a bad CSV header (nothing can be read without it) raises, as InputError.
    """
    if fmt not in FORMATS:
        raise InputError(f"prompt files are {', '.join(FORMATS)}; got {fmt!r}")
    check = check or _Checker()
    out = PromptFile(name, fmt, hashlib.sha256(data).hexdigest())
    header: list[str] | None = None
    index = 0
    for lineno, text in _lines(data):
        if text is not None and not text.strip():
            continue
        if fmt == ".csv" and header is None:
            if text is None:
                raise InputError(f"line {lineno}: the CSV header is not UTF-8 text")
            header = _csv_header(text, lineno)
            continue
        try:
            if text is None:
                raise _Bad("not UTF-8 text")
            if fmt == ".txt":
                fields = _txt(text)
            elif fmt == ".jsonl":
                fields = _jsonl(text)
            else:
                cells = _csv_row(text)
                if len(cells) != len(header):
                    raise _Bad(f"{len(cells)} cells for {len(header)} columns ({', '.join(header)})")
                fields = {k: (v if (v.strip() or k == "prompt") else None) for k, v in zip(header, cells)}
            out.items.append(_item(index, lineno, fields, check, text=fmt == ".csv"))
        except _Bad as e:
            out.errors.append(LineError(index, lineno, str(e)))
        index += 1
    return out


def read_prompt_file(path: str | os.PathLike[str]) -> PromptFile:
    """Read and parse a prompt file; InputError if it cannot be read or its kind is unknown."""
    p = Path(path)
    fmt = p.suffix.lower()
    if fmt not in FORMATS:
        raise InputError(f"PROMPTS {clip(str(p))!r}: give a .txt (one prompt a line), .jsonl or .csv file")
    try:
        data = read_bounded(p, "PROMPTS")  # a link to /dev/zero stops at the limit
    except OSError as e:
        raise InputError(f"PROMPTS: cannot read {clip(str(p))!r}: {e.strerror or e}") from None
    try:
        parsed = parse_prompt_lines(data, fmt, name=str(p))
    except InputError as e:
        raise InputError(f"{p}: {e}") from None
    if not parsed.count:
        raise InputError(f"PROMPTS {clip(str(p))!r} has no prompts")
    return parsed
