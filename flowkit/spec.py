r"""The one grammar for sampler and guidance specs, on every surface.

The CLI (`--sampler`, `--guidance`), batch prompt-file columns and the Python API all
take the same text::

    cfg:scale=7+adaptive:gamma=0.999
    apg:scale=10,eta=0.0,momentum=-0.5,norm_threshold=15
    euler
    frap:tokens=[2;5],mode="soft, then hard"

Grammar (whitespace is allowed around every token)::

    stack   = item { "+" item }
    item    = name [ ":" option { "," option } ]
    option  = key "=" value
    value   = scalar | list
    list    = "[" [ scalar { ";" scalar } ] "]"          (no nesting)
    scalar  = int | float | bool | none | word | quoted
    name    = letter_ { letter_ | digit | "." | "-" }
    key     = letter_ { letter_ | digit }                (a Python identifier, ASCII)
    int     = [ "-" ] digit { digit }
    float   = [ "-" ] ( digits "." [ digits ] | "." digits | digits ) [ ("e"|"E") [ "+"|"-" ] digits ]
              (with a "." or an exponent; finite only: inf, nan and overflow are errors)
    bool    = "true" | "false"                          (any letter case)
    none    = "none"                                    (any letter case)
    word    = letter_ { letter_ | digit | "." | "-" | "/" }   (a bare string: x0, model_output)
    quoted  = "'" ... "'" | '"' ... '"'                 (escapes: \\ \' \" \n \t \r)

A quoted string may hold any character, including ``,+:=[];``. A bare word that reads as
another type (``true``, ``none``) is not a string, and ``inf``/``nan`` are errors; quote
them to make strings.

JSON is the second form: a list of ``{"name": ..., "params": {...}}`` objects (``params``
optional), read from a file by `load_spec_file` or given as text starting with ``[``.

The value model is small: int, finite float, bool, None, str, and flat lists of those.
`format` writes the canonical text of a list of `SpecItem`s, and
``parse(format(items)) == items`` for every such list. `instantiate` and `build` check
the options against the keyword options of a registered class (`flowkit.registry`) and
coerce values to their annotations; `to_spec` writes an instance back as a `SpecItem`.

Every bad input ends in `flowkit.errors.SpecError` (a `ValueError`) naming the offending
part; nothing else escapes.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import json
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

from flowkit.errors import SpecError, UnknownNameError, closest

__all__ = [
    "SpecItem",
    "parse",
    "format",
    "load_spec_file",
    "check_params",
    "instantiate",
    "build",
    "to_spec",
]

Scalar = int | float | bool | str | None
Value = Scalar | list[Scalar]

# --------------------------------------------------------------------------- value model

_WS = " \t\r\n"
_PUNCT = ":=,+[];"
_QUOTES = "'\""
_DELIMS = _WS + _PUNCT + _QUOTES

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_./\-]*")
_INT_RE = re.compile(r"-?[0-9]+")
_FLOAT_RE = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?")
# An unquoted run that stops just before an exponent's "+": "1e" of "1e+3".
_EXP_PREFIX_RE = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE]")
_NONFINITE = {"inf", "-inf", "infinity", "-infinity", "nan", "-nan"}
_RESERVED = {"true", "false", "none"} | _NONFINITE

_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
_UNESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


class Lookup(Protocol):
    """What building from a spec needs of a registry: the class of a name."""

    def get(self, name: str) -> type: ...


@dataclass(frozen=True)
class Param:
    """One keyword option of a registered class."""

    name: str
    annotation: Any
    default: Any
    required: bool


def params_of(cls: type) -> dict[str, Param]:
    """The keyword options of `cls.__init__`, in order (what a spec is checked against)."""
    out: dict[str, Param] = {}
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # pragma: no cover - unresolved forward references
        hints = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is inspect.Parameter.empty
        out[p.name] = Param(p.name, hints.get(p.name, p.annotation), None if required else p.default, required)
    return out


def _clip(text: str, limit: int = 80) -> str:
    """`text` shortened for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _normalize_value(value: Any, where: str) -> Value:
    """`value` in the spec value model (tuples become lists), or SpecError."""
    if isinstance(value, (list, tuple)):
        return [_normalize_scalar(v, where, in_list=True) for v in value]
    return _normalize_scalar(value, where, in_list=False)


def _normalize_scalar(value: Any, where: str, *, in_list: bool) -> Scalar:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        try:
            x = float(value)
        except (OverflowError, ValueError):
            x = math.inf
        if not math.isfinite(x):
            raise SpecError(f"{where}: non-finite number {value!r}; use a finite value")
        return x
    kind = "a nested list" if in_list and isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
    raise SpecError(
        f"{where}: cannot hold {kind} ({value!r:.60}); spec values are int, float, bool, "
        "none, strings and flat lists of those"
    )


@dataclass(frozen=True)
class SpecItem:
    """One module of a spec: a registered name and its options.

    `params` is copied on construction and tuples become lists, so two items compare
    equal exactly when they would format to the same text. Items hash by value.
    """

    name: str
    params: dict[str, Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"a spec item needs a non-empty string name, got {self.name!r:.60}")
        if not isinstance(self.params, Mapping):
            raise SpecError(f"{self.name}: params must be a mapping, got {type(self.params).__name__}")
        params: dict[str, Value] = {}
        for key, value in self.params.items():
            if not isinstance(key, str):
                raise SpecError(f"{self.name}: option names must be strings, got {key!r:.60}")
            params[key] = _normalize_value(value, f"{self.name}: option {key!r}")
        object.__setattr__(self, "params", params)

    def __hash__(self) -> int:
        frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.params.items())
        return hash((self.name, frozen))

    def __str__(self) -> str:
        try:
            return format([self])
        except SpecError:
            return repr(self)


# --------------------------------------------------------------------------- lexer


@dataclass(frozen=True)
class _Token:
    kind: str  # "punct", "word" (unquoted run) or "string" (quoted, decoded)
    text: str  # the punctuation character, the run, or the decoded string
    start: int
    end: int


def _lex(text: str) -> list[_Token]:
    """Split `text` into punctuation, unquoted runs and quoted strings."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
        elif c in _PUNCT:
            tokens.append(_Token("punct", c, i, i + 1))
            i += 1
        elif c in _QUOTES:
            start, i, chars = i, i + 1, []
            while True:
                if i >= n:
                    raise SpecError(f"unterminated quote in {_clip(text[start:])!r}: close it with {c}")
                ch = text[i]
                if ch == c:
                    i += 1
                    break
                if ch == "\\":
                    if i + 1 >= n:
                        raise SpecError(f"unterminated quote in {_clip(text[start:])!r}: close it with {c}")
                    esc = text[i + 1]
                    if esc not in _ESCAPES:
                        raise SpecError(
                            f"unknown escape '\\{esc}' in {_clip(text[start:i + 2])!r}: use \\\\ for a "
                            "backslash (known: \\\\ \\' \\\" \\n \\t \\r)"
                        )
                    chars.append(_ESCAPES[esc])
                    i += 2
                else:
                    chars.append(ch)
                    i += 1
            tokens.append(_Token("string", "".join(chars), start, i))
        else:
            start = i
            while i < n:
                ch = text[i]
                if ch == "+" and i + 1 < n and text[i + 1] in "0123456789" and _EXP_PREFIX_RE.fullmatch(text, start, i):
                    i += 1  # the "+" of an exponent, as in 1e+3
                elif ch in _DELIMS:
                    break
                else:
                    i += 1
            tokens.append(_Token("word", text[start:i], start, i))
    return tokens


def _scalar_from_word(word: str) -> Scalar:
    """The value of an unquoted run; ValueError (with the reason) if it is none."""
    low = word.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low == "none":
        return None
    if low in _NONFINITE:
        raise ValueError("non-finite numbers are not allowed")
    if _INT_RE.fullmatch(word):
        try:
            return int(word)
        except ValueError:  # longer than sys.get_int_max_str_digits()
            raise ValueError("integer has too many digits") from None
    if _FLOAT_RE.fullmatch(word):
        x = float(word)
        if not math.isfinite(x):
            raise ValueError("number overflows to infinity")
        return x
    if _WORD_RE.fullmatch(word):
        return word
    raise ValueError(
        "not a number, bool, none or bare word; quote it to pass a string, e.g. \"...\""
    )


# --------------------------------------------------------------------------- parser


class _ItemParser:
    """Parses the tokens of one stack item; errors quote the item's text."""

    def __init__(self, text: str, tokens: list[_Token]):
        self.text = text
        self.tokens = tokens
        self.item_text = text[tokens[0].start : tokens[-1].end]

    def _span(self, toks: Sequence[_Token]) -> str:
        return self.text[toks[0].start : toks[-1].end] if toks else ""

    def fail(self, what: str, part: str | None, reason: str) -> SpecError:
        named = f" {_clip(part)!r}" if part is not None else ""
        return SpecError(f"{what}{named} in {_clip(self.item_text)!r}: {reason}")

    def parse(self) -> SpecItem:
        toks = self.tokens
        head = toks[0]
        if head.kind == "punct":
            raise self.fail("missing module name", None, "start each module with its name, e.g. cfg:scale=7")
        if head.kind != "word":
            raise self.fail("bad module name", self._span([head]), "a module name is not quoted")
        if not _NAME_RE.fullmatch(head.text):
            raise self.fail(
                "bad module name", head.text, "a name is letters, digits, '_', '.' and '-', starting with a letter"
            )
        if len(toks) == 1:
            return SpecItem(head.text, {})
        if toks[1].text != ":" or toks[1].kind != "punct":
            raise self.fail("unexpected", self._span(toks[1:]), f"write options as {head.text}:key=value,...")
        body = toks[2:]
        if not body:
            raise self.fail("missing options after ':'", None, f"write {head.text}:key=value or drop the ':'")
        params: dict[str, Value] = {}
        for option in self._split(body, ","):
            key, value = self._option(option)
            if key in params:
                raise self.fail("duplicate option", key, "give each option once")
            params[key] = value
        return SpecItem(head.text, params)

    def _split(self, toks: list[_Token], sep: str) -> list[list[_Token]]:
        parts: list[list[_Token]] = [[]]
        for t in toks:
            if t.kind == "punct" and t.text == sep:
                parts.append([])
            else:
                parts[-1].append(t)
        for k, part in enumerate(parts):
            if not part:
                where = "after" if k == len(parts) - 1 else "before"
                raise self.fail(f"empty option {where} '{sep}'", None, "remove the extra separator")
        return parts

    def _option(self, toks: list[_Token]) -> tuple[str, Value]:
        part = self._span(toks)
        key = toks[0]
        if key.kind != "word" or not _KEY_RE.fullmatch(key.text):
            raise self.fail("bad option", part, "an option starts with a key (letters, digits, '_')")
        if len(toks) == 1 or toks[1].kind != "punct" or toks[1].text != "=":
            raise self.fail("bad option", part, "expected key=value")
        value_toks = toks[2:]
        if not value_toks:
            raise self.fail("bad value", part, "missing value after '='")
        try:
            return key.text, self._value(value_toks)
        except ValueError as e:
            raise self.fail("bad value", part, str(e)) from None

    def _value(self, toks: list[_Token]) -> Value:
        first = toks[0]
        if first.kind == "punct" and first.text == "[":
            if toks[-1].kind != "punct" or toks[-1].text != "]" or len(toks) == 1:
                raise ValueError("unclosed list, expected ']'")
            inner = toks[1:-1]
            if not inner:
                return []
            out: list[Scalar] = []
            elems: list[list[_Token]] = [[]]
            for t in inner:
                if t.kind == "punct" and t.text == ";":
                    elems.append([])
                else:
                    elems[-1].append(t)
            for elem in elems:
                if not elem:
                    raise ValueError("empty list element; separate elements with single ';'")
                if len(elem) == 1 and elem[0].kind == "punct" and elem[0].text in "[]":
                    raise ValueError("lists cannot be nested" if elem[0].text == "[" else "unexpected ']'")
                out.append(self._scalar(elem))
            return out
        return self._scalar(toks)

    def _scalar(self, toks: list[_Token]) -> Scalar:
        if len(toks) != 1:
            punct = next((t for t in toks if t.kind == "punct"), None)
            if punct is not None and punct.text == "[":
                raise ValueError("lists cannot be nested")
            if punct is not None:
                raise ValueError(f"unexpected {punct.text!r}")
            raise ValueError(f"unexpected {_clip(self._span(toks[1:]))!r} after {_clip(self._span(toks[:1]))!r}")
        t = toks[0]
        if t.kind == "string":
            return t.text
        if t.kind == "punct":
            if t.text in "[]":
                raise ValueError("lists cannot be nested" if t.text == "[" else "unexpected ']'")
            raise ValueError(f"unexpected {t.text!r}")
        return _scalar_from_word(t.text)


def parse(text: str, *, allow_empty: bool = False) -> list[SpecItem]:
    """Parse spec text (or JSON text starting with ``[``) into a list of `SpecItem`s.

    Raises `SpecError` naming the offending part. Empty or all-whitespace text is an
    error ("empty spec") unless `allow_empty`, when it gives ``[]``.
    """
    if not isinstance(text, str):
        raise SpecError(f"a spec is a string, got {type(text).__name__}")
    stripped = text.strip(_WS)
    if not stripped:
        if allow_empty:
            return []
        raise SpecError("empty spec: give at least one module, e.g. 'cfg:scale=7'")
    if stripped.startswith("["):
        items = _items_from_json_text(stripped, "JSON spec")
        if not items and not allow_empty:
            raise SpecError("empty spec: the JSON list has no modules")
        return items
    tokens = _lex(text)
    groups: list[list[_Token]] = [[]]
    for t in tokens:
        if t.kind == "punct" and t.text == "+":
            groups.append([])
        else:
            groups[-1].append(t)
    items: list[SpecItem] = []
    for k, group in enumerate(groups):
        if not group:
            where = "after" if k == len(groups) - 1 else "before"
            raise SpecError(f"empty module {where} '+' in {_clip(stripped)!r}: remove the extra '+'")
        items.append(_ItemParser(text, group).parse())
    return items


# --------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> Any:
    raise SpecError(f"non-finite number {name} in JSON spec; use a finite value")


def _items_from_json_text(text: str, where: str) -> list[SpecItem]:
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(f"{where}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, huge integers
        raise SpecError(f"{where} is not valid JSON: {e}") from None
    return _items_from_json(data, where)


def _items_from_json(data: Any, where: str) -> list[SpecItem]:
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise SpecError(f"{where}: expected a list of {{\"name\": ..., \"params\": {{...}}}} objects, got {type(data).__name__}")
    return [_item_from_mapping(entry, f"{where}, entry {k}") for k, entry in enumerate(data)]


def _item_from_mapping(entry: Any, where: str) -> SpecItem:
    if not isinstance(entry, Mapping):
        raise SpecError(f"{where}: expected an object with \"name\" and \"params\", got {entry!r:.60}")
    extra = set(entry) - {"name", "params"}
    if extra:
        raise SpecError(f"{where}: unknown field(s) {sorted(map(str, extra))}; an entry has \"name\" and \"params\"")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}: \"name\" must be a non-empty string, got {name!r:.60}")
    params = entry.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise SpecError(f"{where} ({name}): \"params\" must be an object, got {type(params).__name__}")
    return SpecItem(name, dict(params))


def load_spec_file(path: str | os.PathLike[str]) -> list[SpecItem]:
    """Read a JSON spec file: a list of ``{"name": ..., "params": {...}}`` objects."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeError, ValueError) as e:
        raise SpecError(f"cannot read spec file {os.fspath(path)!r}: {e}") from None
    return _items_from_json_text(text, f"spec file {os.fspath(path)!r}")


# --------------------------------------------------------------------------- format


def _format_scalar(value: Scalar) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # longer than sys.get_int_max_str_digits()
            raise SpecError(f"integer with too many digits to write ({value.bit_length()} bits)") from None
    if isinstance(value, float):
        return repr(value).replace("e+", "e")
    if _WORD_RE.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    return '"' + "".join(_UNESCAPES.get(c, c) for c in value) + '"'


def format(items: Iterable[SpecItem] | SpecItem) -> str:  # noqa: A001 - the spec's own verb
    """The canonical text of `items`: ``parse(format(items)) == items``."""
    if isinstance(items, SpecItem):
        items = [items]
    parts = []
    for item in items:
        if not isinstance(item, SpecItem):
            raise SpecError(f"format takes SpecItems, got {type(item).__name__}")
        if not _NAME_RE.fullmatch(item.name):
            raise SpecError(f"cannot write module name {item.name!r}: use letters, digits, '_', '.', '-'")
        options = []
        for key, value in item.params.items():
            if not _KEY_RE.fullmatch(key):
                raise SpecError(f"{item.name}: cannot write option name {key!r}: use letters, digits and '_'")
            if isinstance(value, list):
                text = "[" + ";".join(_format_scalar(v) for v in value) + "]"
            else:
                text = _format_scalar(value)
            options.append(f"{key}={text}")
        parts.append(item.name + (":" + ",".join(options) if options else ""))
    return "+".join(parts)


# --------------------------------------------------------------------------- coercion


class _Mismatch(Exception):
    """A value that does not fit an annotation (internal; becomes SpecError)."""


def _type_name(ann: Any) -> str:
    if ann is type(None):
        return "none"
    if isinstance(ann, type) and not typing.get_args(ann):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _coerce(value: Value, ann: Any) -> Any:
    """`value` converted to annotation `ann`, or _Mismatch."""
    if ann is inspect.Parameter.empty or ann is Any or isinstance(ann, (str, typing.ForwardRef)):
        return value
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return choice
        raise _Mismatch
    if ann is type(None) or ann is None:
        if value is None:
            return None
        raise _Mismatch
    if ann is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if ann is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if ann is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if ann is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    container = origin if origin is not None else ann
    if container in (tuple, list, collections.abc.Sequence, typing.Sequence, collections.abc.Iterable):
        elems = value if isinstance(value, list) else [value]
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(elems) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(elems, args))
        elem_ann = args[0] if args else Any
        out = [_coerce(v, elem_ann) for v in elems]
        return out if container is list else tuple(out)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        for member in ann:
            if value == member.name or (type(value) is type(member.value) and value == member.value):
                return member
        raise _Mismatch
    if isinstance(ann, type):
        if isinstance(value, ann):
            return value
        raise _Mismatch
    return value  # an annotation we cannot check (Callable, TypeVar, ...): the constructor decides


def _expected(ann: Any) -> str:
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(_format_scalar(a) if isinstance(a, (str, int, float, bool)) else repr(a)
                                      for a in typing.get_args(ann))
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(m.name for m in ann)
    return _type_name(ann)


def _show(value: Any) -> str:
    """`value` as spec text for a message, or its clipped repr if it has none."""
    try:
        return format([SpecItem("x", {"v": value})])[len("x:v="):]
    except SpecError:
        return _clip(repr(value))


class _UnknownSpecName(SpecError, UnknownNameError):
    """A spec naming an unregistered module: both a SpecError and an UnknownNameError."""


def _lookup(registry: Lookup, name: str) -> type:
    try:
        return registry.get(name)
    except UnknownNameError as e:
        raise _UnknownSpecName(str(e)) from None


def check_params(registry: Lookup, name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """`params` checked against the keyword options of `registry`'s `name` and coerced.

    Unknown options (with the closest known one), missing required options and values
    that do not fit the annotation raise `SpecError`.
    """
    cls = _lookup(registry, name)
    return _check_params_of(cls, name, params)


def _check_params_of(cls: type, name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise SpecError(f"{name}: params must be a mapping, got {type(params).__name__}")
    # a class whose options depend on one of them (flowkit.guidance's `diffusers:name=...`) says so
    known: dict[str, Param] = cls.spec_params(params) if hasattr(cls, "spec_params") else params_of(cls)
    out: dict[str, Any] = {}
    for key, raw in params.items():
        if not isinstance(key, str):
            raise SpecError(f"{name}: option names must be strings, got {key!r:.60}")
        if key not in known:
            listing = ", ".join(known) if known else "(none: it takes no options)"
            raise SpecError(f"{name}: unknown option {key!r}{closest(key, known)}; known: {listing}")
        try:
            value = _normalize_value(raw, f"{name}: option {key!r}")
        except SpecError:
            value = raw  # a Python object (API use): only an annotation naming its type accepts it
        ann = known[key].annotation
        try:
            out[key] = _coerce(value, ann)
        except (_Mismatch, TypeError, ValueError, OverflowError):
            raise SpecError(f"{name}: option {key}={_show(value)} is not {_expected(ann)}") from None
    missing = [p.name for p in known.values() if p.required and p.name not in out]
    if missing:
        raise SpecError(f"{name}: missing required option(s) {', '.join(missing)}; e.g. {name}:{missing[0]}=...")
    return out


def instantiate(registry: Lookup, name: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build `registry`'s `name` with `params` checked and coerced by `check_params`.

    The constructor's own `ValueError`s (and `TypeError`s) come back as `SpecError`
    prefixed with the module name.
    """
    if not isinstance(name, str):
        raise SpecError(f"a module name is a string, got {type(name).__name__}")
    cls = _lookup(registry, name)
    kwargs = _check_params_of(cls, name, params)
    try:
        return cls(**kwargs)
    except SpecError as e:
        msg = str(e)
        raise SpecError(msg if msg.startswith(f"{name}:") else f"{name}: {msg}") from e
    except (ValueError, TypeError) as e:
        raise SpecError(f"{name}: {e}") from e


def build(
    registry: Lookup,
    spec: str | os.PathLike[str] | SpecItem | Mapping[str, Any] | Sequence[Any] | object | None,
    *,
    allow_empty: bool = False,
) -> list[Any]:
    """Instances of `registry`'s classes from any spec form.

    `spec` may be spec text or JSON text (see `parse`), a path to a JSON spec file, a
    `SpecItem`, a ``{"name": ..., "params": {...}}`` dict, an already-built instance
    (kept as is), ``None`` (no modules), or a list mixing all of these (an empty list
    gives no modules). `allow_empty` applies to text, as in `parse`.
    """
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        out: list[Any] = []
        for k, entry in enumerate(spec):
            if entry is None or isinstance(entry, (list, tuple)):
                raise SpecError(f"spec list entry {k}: expected a spec, SpecItem, dict or instance, got {entry!r:.60}")
            out.extend(build(registry, entry, allow_empty=True))
        return out
    if isinstance(spec, str):
        items = parse(spec, allow_empty=allow_empty)
    elif isinstance(spec, os.PathLike):
        items = load_spec_file(spec)
    elif isinstance(spec, SpecItem):
        items = [spec]
    elif isinstance(spec, Mapping):
        items = [_item_from_mapping(spec, "spec")]
    elif isinstance(spec, type):
        raise SpecError(f"pass an instance ({spec.__qualname__}(...)) or a spec string, not the class")
    elif isinstance(spec, (bytes, bytearray, numbers.Number, bool)):
        raise SpecError(f"expected a spec string, SpecItem, dict or instance, got {type(spec).__name__} {spec!r:.60}")
    else:
        return [spec]
    return [instantiate(registry, item.name, item.params) for item in items]


def to_spec(obj: Any) -> SpecItem:
    """The `SpecItem` of a registered instance: its class `name` and the options that differ
    from their defaults, read from the attributes of the same names."""
    cls = type(obj)
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise SpecError(f"cannot write a {cls.__qualname__} as a spec: its class has no `name`")
    if hasattr(obj, "spec_values"):  # options of its own making (see `_check_params_of`)
        return SpecItem(name, {k: _spec_value_of(v, f"{name}: option {k!r}") for k, v in obj.spec_values().items()})
    params: dict[str, Value] = {}
    for p in params_of(cls).values():
        if not hasattr(obj, p.name):
            raise SpecError(
                f"cannot write {name} as a spec: option {p.name!r} is not stored as attribute {p.name!r}"
            )
        value = _spec_value_of(getattr(obj, p.name), f"{name}: option {p.name!r}")
        if not p.required:
            try:
                default = _spec_value_of(p.default, f"{name}: default of {p.name!r}")
            except SpecError:
                default = _NO_DEFAULT
            if default is not _NO_DEFAULT and _same(default, value):
                continue
        params[p.name] = value
    return SpecItem(name, params)


_NO_DEFAULT = object()


def _same(a: Value, b: Value) -> bool:
    """Equal as spec values: 1 and 1.0 are the same, 1 and true or 0 and none are not."""
    if isinstance(a, list) or isinstance(b, list):
        return (
            isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
        )
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        return type(a) is type(b) and a == b
    return a == b


def _spec_value_of(value: Any, where: str) -> Value:
    if isinstance(value, enum.Enum):
        value = value.name
    return _normalize_value(value, where)


