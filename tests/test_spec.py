"""Tests of flowkit.spec: the grammar, canonical formatting, and checks against a registry."""

from __future__ import annotations

import collections.abc
import json
import math
import types
import typing
from typing import Any, Literal, Optional, Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowkit import spec
from flowkit.errors import SpecError, UnknownNameError
from flowkit.registry import Registry, params_of
from flowkit.spec import SpecItem, build, check_params, format, instantiate, load_spec_file, parse, to_spec

FAST = settings(max_examples=250, deadline=None)


# --------------------------------------------------------------------------- helpers


def strict(value: Any) -> Any:
    """A comparison key that tells 1 from 1.0 from True, -0.0 from 0.0, and tuple from list."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(strict(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, strict(v)) for k, v in value.items()))
    if isinstance(value, SpecItem):
        return ("item", value.name, strict(value.params))
    return (type(value).__name__, repr(value))


def strict_items(items: list[SpecItem]) -> Any:
    return [strict(item) for item in items]


def spec_error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse(text)
    return str(info.value)


# --------------------------------------------------------------------------- a test registry

TEST = Registry("test module", "flowkit.tests.none", ())


@TEST.register
class Alpha:
    name = "alpha"
    description = "scalars, a literal and an optional"

    def __init__(
        self,
        *,
        scale: float = 7.0,
        steps: int = 10,
        flag: bool = False,
        label: str = "x0",
        mode: Literal["x0", "eps", "velocity"] = "x0",
        cap: float | None = None,
    ):
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.scale, self.steps, self.flag, self.label, self.mode, self.cap = scale, steps, flag, label, mode, cap


@TEST.register
class Beta:
    name = "beta"
    description = "sequences and unions"

    def __init__(
        self,
        *,
        weights: tuple[float, ...] = (1.0,),
        ids: list[int] | None = None,
        pair: tuple[int, int] = (0, 1),
        tags: Sequence[str] = (),
        threshold: Optional[int] = None,
        choice: int | str = 0,
    ):
        if pair[0] > pair[1]:
            raise ValueError("pair must be ordered")
        self.weights, self.ids, self.pair, self.tags, self.threshold, self.choice = (
            weights, ids, pair, tags, threshold, choice,
        )


@TEST.register
class Gamma:
    name = "gamma-2"
    description = "a required option"

    def __init__(self, *, target: str, strength: float = 1.0, window: Literal[1, 2, 3] = 1):
        self.target, self.strength, self.window = target, strength, window


@TEST.register
class Delta:
    name = "delta"
    description = "options that only the Python API can fill"

    def __init__(self, *, inner: Alpha | None = None, fn: typing.Callable[[float], float] | None = None):
        self.inner, self.fn = inner, fn


# --------------------------------------------------------------------------- parse: examples


def test_design_example():
    items = parse("cfg:scale=7+adaptive:gamma=0.999")
    assert items == [SpecItem("cfg", {"scale": 7}), SpecItem("adaptive", {"gamma": 0.999})]
    assert type(items[0].params["scale"]) is int
    assert type(items[1].params["gamma"]) is float


def test_bare_names_and_whitespace():
    assert parse("euler") == [SpecItem("euler", {})]
    assert parse("  cfg : scale = 7 ,  start=0.1\t+ \n apg  ") == [
        SpecItem("cfg", {"scale": 7, "start": 0.1}),
        SpecItem("apg", {}),
    ]
    assert parse("flow-sde.v2") == [SpecItem("flow-sde.v2", {})]


def test_quoted_strings():
    items = parse("""frap:a="one, two + three",b='x:y=[1;2]',c="say \\"hi\\"",d='it\\'s',e="a\\\\b\\n" """)
    assert items[0].params == {
        "a": "one, two + three",
        "b": "x:y=[1;2]",
        "c": 'say "hi"',
        "d": "it's",
        "e": "a\\b\n",
    }
    assert parse('x:s=""')[0].params == {"s": ""}
    # quoted keeps the type a string even when the text looks like another type
    assert strict(parse('x:a="true",b="1.5",c=\'none\',d="7"')[0].params) == strict(
        {"a": "true", "b": "1.5", "c": "none", "d": "7"}
    )


def test_lists():
    items = parse("x:a=[1;2;3],b=[0.5 ; -1e-3],c=[],d=[x0;'a;b';true;none],e=[ 7 ]")
    assert strict(items[0].params) == strict(
        {"a": [1, 2, 3], "b": [0.5, -0.001], "c": [], "d": ["x0", "a;b", True, None], "e": [7]}
    )


def test_numbers():
    p = parse("x:a=-3,b=-0.5,c=1e-3,d=1E+3,e=.5,f=-.25,g=2.,h=0,i=-0,j=12345678901234567890")[0].params
    assert strict(p) == strict(
        {"a": -3, "b": -0.5, "c": 0.001, "d": 1000.0, "e": 0.5, "f": -0.25, "g": 2.0, "h": 0, "i": 0,
         "j": 12345678901234567890}
    )
    # "1e+3" is one number, not a stack split at '+'
    assert parse("x:a=1e+3+y") == [SpecItem("x", {"a": 1000.0}), SpecItem("y", {})]


def test_bools_none_and_words():
    p = parse("x:a=true,b=false,c=none,d=True,e=FALSE,f=None,g=x0,h=model_output,i=shift,j=a/b.pt")[0].params
    assert strict(p) == strict(
        {"a": True, "b": False, "c": None, "d": True, "e": False, "f": None, "g": "x0", "h": "model_output",
         "i": "shift", "j": "a/b.pt"}
    )


def test_empty():
    assert "empty spec" in spec_error("")
    assert "empty spec" in spec_error(" \t\n")
    assert parse("", allow_empty=True) == []
    assert parse("   ", allow_empty=True) == []
    assert parse("[]", allow_empty=True) == []
    assert "empty spec" in spec_error("[]")


@pytest.mark.parametrize(
    "text, needles",
    [
        ("cfg:", ["missing options", "'cfg:'"]),
        ("cfg:scale", ["'scale'", "key=value"]),
        (":x=1", ["missing module name", "':x=1'"]),
        ("cfg:scale=1,scale=2", ["duplicate option 'scale'"]),
        ("cfg+", ["empty module", "'+'"]),
        ("+cfg", ["empty module", "'+'"]),
        ("cfg++apg", ["empty module"]),
        ("cfg:scale=[1;2", ["'scale=[1;2'", "']'"]),
        ("cfg:scale=", ["'scale='", "missing value"]),
        ("cfg:x=", ["bad value 'x=' in 'cfg:x='"]),
        ("cfg:scale=1,", ["empty option"]),
        ("cfg:,scale=1", ["empty option"]),
        ("cfg:scale==1", ["'scale==1'"]),
        ("cfg:scale=1 2", ["'scale=1 2'"]),
        ("cfg scale=1", ["'scale=1'"]),
        ("cfg:x=[[1]]", ["nested"]),
        ("cfg:x=[1;[2]]", ["nested"]),
        ("cfg:x=[1;;2]", ["empty list element"]),
        ("cfg:x=]", ["']'"]),
        ("cfg:x=1.2.3", ["'x=1.2.3'"]),
        ("cfg:x=12abc", ["'x=12abc'"]),
        ("cfg:x=\"abc", ["unterminated quote"]),
        ("cfg:x='a\\qb'", ["unknown escape"]),
        ("cfg:1x=2", ["bad option '1x=2'"]),
        ("cfg:\"x\"=2", ["bad option"]),
        ('"cfg":x=1', ["bad module name"]),
        ("1cfg", ["bad module name '1cfg'"]),
        ("cfg:x=€", ["'x=€'"]),
    ],
)
def test_parse_errors_name_the_part(text, needles):
    message = spec_error(text)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "value", ["inf", "-inf", "nan", "NaN", "Infinity", "-infinity", "1e999", "-1e400", "[1;inf]"]
)
def test_non_finite_rejected(value):
    assert "finite" in spec_error(f"cfg:x={value}") or "infinity" in spec_error(f"cfg:x={value}")


def test_huge_integer_is_a_spec_error():
    assert "too many digits" in spec_error("cfg:x=" + "9" * 6000)


def test_long_parts_are_clipped_in_messages():
    message = spec_error("cfg:x=1 " + "y" * 5000)
    assert len(message) < 400


# --------------------------------------------------------------------------- JSON


def test_json_text_and_file(tmp_path):
    data = [{"name": "cfg", "params": {"scale": 7.5}}, {"name": "adaptive"}, {"name": "x", "params": None}]
    expected = [SpecItem("cfg", {"scale": 7.5}), SpecItem("adaptive", {}), SpecItem("x", {})]
    assert parse(json.dumps(data)) == expected
    assert parse("  " + json.dumps(data)) == expected
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    assert load_spec_file(path) == expected
    assert load_spec_file(str(path)) == expected
    assert build(TEST, [{"name": "alpha", "params": {"scale": 2}}])[0].scale == 2.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[{"name": "cfg", "params": {"scale": NaN}}]', "non-finite"),
        ('[{"name": "cfg", "params": {"scale": Infinity}}]', "non-finite"),
        ('[{"name": "cfg", "params": {"scale": 1e999}}]', "non-finite"),
        ('[{"params": {}}]', '"name"'),
        ('[{"name": 3}]', '"name"'),
        ('[{"name": "cfg", "prams": {}}]', "prams"),
        ('[{"name": "cfg", "params": [1]}]', '"params"'),
        ('[{"name": "cfg", "params": {"x": {"y": 1}}}]', "dict"),
        ('[{"name": "cfg", "params": {"x": [[1]]}}]', "nested"),
        ('[3]', "entry 0"),
        ('[{"name": "cfg"}', "not valid JSON"),
        ("[" * 100_000, "JSON"),
    ],
)
def test_json_errors(text, needle):
    assert needle in spec_error(text)


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe[")
    with pytest.raises(SpecError):
        load_spec_file(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('"cfg"')
    with pytest.raises(SpecError, match="list"):
        load_spec_file(obj)


# --------------------------------------------------------------------------- format and SpecItem


def test_format_canonical():
    items = [
        SpecItem("cfg", {"scale": 7, "start": 0.1}),
        SpecItem("x", {"a": "x0", "b": "true", "c": "1.5", "d": "", "e": "a,b", "f": 'q"\\', "g": "inf", "h": None,
                       "i": False, "j": [1, "two words", 2.5], "k": 1e16, "l": -0.0, "m": "None"}),
        SpecItem("euler", {}),
    ]
    text = format(items)
    assert text == (
        'cfg:scale=7,start=0.1+x:a=x0,b="true",c="1.5",d="",e="a,b",f="q\\"\\\\",g="inf",h=none,i=false,'
        'j=[1;"two words";2.5],k=1e16,l=-0.0,m="None"+euler'
    )
    assert strict_items(parse(text)) == strict_items(items)
    assert format(SpecItem("cfg", {})) == "cfg"
    assert str(SpecItem("cfg", {"scale": 7})) == "cfg:scale=7"


@pytest.mark.parametrize(
    "item, needle",
    [
        (SpecItem("bad name", {}), "module name"),
        (SpecItem("cfg", {"bad key": 1}), "option name"),
    ],
)
def test_format_errors(item, needle):
    with pytest.raises(SpecError, match=needle):
        format([item])


def test_spec_item_values():
    item = SpecItem("x", {"a": (1, 2.0)})
    assert item.params == {"a": [1, 2.0]}
    assert item == SpecItem("x", {"a": [1, 2.0]})
    assert hash(item) == hash(SpecItem("x", {"a": [1, 2.0]}))
    assert len({item, SpecItem("x", {"a": [1, 2.0]})}) == 1
    source = {"a": 1}
    copy = SpecItem("x", source)
    source["a"] = 2
    assert copy.params == {"a": 1}
    for bad in [{"a": float("nan")}, {"a": [[1]]}, {"a": {"b": 1}}, {"a": object()}, {1: 2}]:
        with pytest.raises(SpecError):
            SpecItem("x", bad)
    with pytest.raises(SpecError):
        SpecItem("", {})


# --------------------------------------------------------------------------- instantiate, build, to_spec


def test_instantiate_coerces():
    a = instantiate(TEST, "alpha", {"scale": 3, "cap": 2, "mode": "eps"})
    assert strict([a.scale, a.cap, a.mode, a.steps]) == strict([3.0, 2.0, "eps", 10])
    b = instantiate(TEST, "beta", {"weights": 0.5, "ids": [1, 2], "pair": [2, 3], "tags": "one", "choice": "w"})
    assert strict([b.weights, b.ids, b.pair, b.tags, b.choice]) == strict([(0.5,), [1, 2], (2, 3), ("one",), "w"])
    assert instantiate(TEST, "beta", {"ids": None, "threshold": None}).ids is None
    assert instantiate(TEST, "gamma-2", {"target": "cat", "window": 3}).window == 3


@pytest.mark.parametrize(
    "name, params, needles",
    [
        ("alpha", {"scal": 1}, ["unknown option 'scal'", "did you mean 'scale'", "known: scale, steps"]),
        ("alpha", {"zzzz": 1}, ["unknown option 'zzzz'", "known:"]),
        ("alpha", {"steps": 2.5}, ["steps=2.5", "int"]),
        ("alpha", {"steps": True}, ["steps=true", "int"]),
        ("alpha", {"scale": "big"}, ["scale=big", "float"]),
        ("alpha", {"flag": 1}, ["flag=1", "bool"]),
        ("alpha", {"label": 3}, ["label=3", "str"]),
        ("alpha", {"mode": "x1"}, ["mode=x1", "one of x0, eps, velocity"]),
        ("alpha", {"cap": "no"}, ["cap=no", "float | None"]),
        ("alpha", {"scale": -1}, ["alpha: scale must be >= 0"]),
        ("beta", {"pair": [1, 2, 3]}, ["pair=[1;2;3]", "tuple[int, int]"]),
        ("beta", {"weights": [1, "a"]}, ["weights=[1;a]"]),
        ("beta", {"pair": [3, 1]}, ["beta: pair must be ordered"]),
        ("beta", {"choice": 1.5}, ["choice=1.5"]),
        ("gamma-2", {}, ["missing required option(s) target"]),
        ("gamma-2", {"target": "a", "window": 4}, ["window=4", "one of 1, 2, 3"]),
        ("gamma-2", {"target": "a", "window": 1.0}, ["window=1.0"]),
        ("alphaa", {}, ["unknown test module 'alphaa'", "did you mean 'alpha'"]),
    ],
)
def test_instantiate_errors(name, params, needles):
    with pytest.raises(SpecError) as info:
        instantiate(TEST, name, params)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_instantiate_python_objects():
    inner = Alpha()
    d = instantiate(TEST, "delta", {"inner": inner, "fn": math.sqrt})
    assert d.inner is inner and d.fn is math.sqrt
    for bad, needle in [(3, "inner=3"), ("x", "inner=x"), (Beta(), "inner=<")]:
        with pytest.raises(SpecError, match=needle):
            instantiate(TEST, "delta", {"inner": bad})
    with pytest.raises(SpecError, match="cannot hold a Alpha"):
        to_spec(d)
    assert to_spec(Delta()) == SpecItem("delta", {})


def test_unknown_name_is_also_unknown_name_error():
    with pytest.raises(UnknownNameError):
        instantiate(TEST, "nope", {})
    assert TEST.create("alpha", {"steps": 3}).steps == 3


def test_build_forms():
    a = Alpha(scale=1.0)
    built = build(TEST, ["alpha:steps=2+beta", SpecItem("gamma-2", {"target": "t"}), {"name": "alpha"}, a])
    assert [type(x) for x in built] == [Alpha, Beta, Gamma, Alpha, Alpha]
    assert built[0].steps == 2 and built[-1] is a
    assert build(TEST, a) == [a]
    assert build(TEST, None) == []
    assert build(TEST, "", allow_empty=True) == []
    assert [type(x) for x in build(TEST, '[{"name": "beta"}]')] == [Beta]
    assert build(TEST, []) == []
    assert [type(x) for x in build(TEST, ["alpha", ""])] == [Alpha]  # an empty entry adds nothing
    for bad in ["", [None], [["alpha"]], 3, b"alpha", Alpha, "alpha:scale=-1", "alpha:nope=1"]:
        with pytest.raises(SpecError):
            build(TEST, bad)


def test_to_spec():
    a = Alpha(scale=2.5, label="a b", cap=None)
    assert to_spec(a) == SpecItem("alpha", {"scale": 2.5, "label": "a b"})
    assert format([to_spec(a)]) == 'alpha:scale=2.5,label="a b"'
    assert to_spec(Beta(weights=(1,), pair=(0, 1))) == SpecItem("beta", {})  # equal to the defaults
    assert to_spec(Gamma(target="x")) == SpecItem("gamma-2", {"target": "x"})

    class Hidden:
        name = "hidden"
        description = "keeps its option under another attribute"

        def __init__(self, *, scale: float = 1.0):
            self._scale = scale

    with pytest.raises(SpecError, match="attribute 'scale'"):
        to_spec(Hidden())


# --------------------------------------------------------------------------- property 1: never another exception

GRAMMAR_TOKENS = list(":=,+[];'\"\\ \t\n") + [
    "cfg", "scale", "x0", "a", "Z", "_", "-", ".", "0", "1", "7", "-0.5", "1e", "1e+3", "e-3",
    "true", "none", "inf", "nan", "é", "\x00", "\ud800",
]


def grammar_text() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(GRAMMAR_TOKENS), max_size=40).map("".join)


def check_only_spec_errors(fn, *args) -> None:
    try:
        fn(*args)
    except SpecError:
        pass  # any other exception fails the test


@FAST
@given(st.text())
def test_parse_any_text_only_spec_errors(text):
    check_only_spec_errors(parse, text)


@FAST
@given(grammar_text())
def test_parse_grammar_text_only_spec_errors(text):
    check_only_spec_errors(parse, text)
    check_only_spec_errors(build, TEST, text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["name", "params", "x", "scale"]), inner, max_size=4),
    max_leaves=20,
)


@FAST
@given(JSON_VALUES)
def test_parse_any_json_only_spec_errors(data):
    text = json.dumps([data] if not isinstance(data, list) else data)
    check_only_spec_errors(parse, text)
    check_only_spec_errors(build, TEST, text)


# --------------------------------------------------------------------------- property 2: round trip

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,8}", fullmatch=True)
KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
SCALARS = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(),
    st.sampled_from(["true", "False", "none", "inf", "-nan", "1.5", "-3", "1e+3", "x0", "a/b.c", "", " "]),
)
VALUES = SCALARS | st.lists(SCALARS, max_size=4)
ITEMS = st.lists(
    st.builds(SpecItem, NAMES, st.dictionaries(KEYS, VALUES, max_size=5)),
    min_size=1,
    max_size=4,
)


@FAST
@given(ITEMS)
def test_format_parse_round_trip(items):
    text = format(items)
    again = parse(text)
    assert again == items
    assert strict_items(again) == strict_items(items)
    assert format(again) == text  # canonical


# --------------------------------------------------------------------------- property 3: registry-driven

FLOATS = st.one_of(
    st.floats(0, 1), st.floats(-10, 10), st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1.0])
)
INTS = st.integers(0, 64) | st.integers()


def strategy_for(ann: Any) -> st.SearchStrategy[Any] | None:
    """Values for an annotation, already in the Python type instantiate makes of them; None if unsupported."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is bool:
        return st.booleans()
    if ann is int:
        return INTS
    if ann is float:
        return FLOATS
    if ann is str:
        return st.text(max_size=12) | st.sampled_from(["x0", "true", "1.5", "a,b"])
    if ann is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        parts = [strategy_for(a) for a in args]
        return None if any(p is None for p in parts) else st.one_of(*parts)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            elem = strategy_for(args[0])
            return None if elem is None else st.lists(elem, max_size=4).map(tuple)
        elems = [strategy_for(a) for a in args]
        return None if any(e is None for e in elems) or not elems else st.tuples(*elems)
    if origin in (list, collections.abc.Sequence):
        elem = strategy_for(args[0]) if args else None
        if elem is None:
            return None
        lists = st.lists(elem, max_size=4)
        return lists if origin is list else lists.map(tuple)
    return None


def supported_classes(registry: Registry) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    """name -> {option: strategy} for every class whose required options we can generate."""
    out = {}
    for name, cls in registry.items():
        strategies = {}
        ok = True
        for p in params_of(cls).values():
            s = strategy_for(p.annotation)
            if s is not None:
                strategies[p.name] = s
            elif p.required:
                ok = False
        if ok:
            out[name] = strategies
    return out


def check_registry_round_trip(registry: Registry, data: st.DataObject, classes, *, attributes: bool) -> None:
    name = data.draw(st.sampled_from(sorted(classes)), label="class")
    known = params_of(registry.get(name))
    params = {}
    for key, strategy in classes[name].items():
        if known[key].required or data.draw(st.booleans(), label=f"give {key}"):
            params[key] = data.draw(strategy, label=key)
    text = format([SpecItem(name, params)])
    [item] = parse(text)
    assert item.name == name
    checked = check_params(registry, item.name, item.params)
    assert strict(checked) == strict(params), text
    try:
        obj = instantiate(registry, item.name, item.params)
    except SpecError:
        assume(False)  # the class's own validation refused the generated value
        return
    if attributes:
        assert strict({k: getattr(obj, k) for k in params}) == strict(params)
        again = instantiate(registry, name, parse(format([to_spec(obj)]))[0].params)
        assert strict({k: getattr(again, k) for k in known}) == strict({k: getattr(obj, k) for k in known})


@FAST
@given(st.data())
def test_test_registry_round_trip(data):
    classes = supported_classes(TEST)
    assert sorted(classes) == ["alpha", "beta", "delta", "gamma-2"]
    check_registry_round_trip(TEST, data, classes, attributes=True)


def real_registry(kind: str) -> tuple[Registry, dict[str, Any]]:
    try:
        from flowkit import registry as reg

        registry = getattr(reg, kind)
        names = registry.names()
    except ImportError as e:
        pytest.skip(f"flowkit.registry.{kind} cannot load its modules yet: {e}")
    if not names:
        pytest.skip(f"flowkit.registry.{kind} has no registered classes yet")
    classes = supported_classes(registry)
    if not classes:
        pytest.skip(f"no class in {kind} has options that the test can generate")
    return registry, classes


@pytest.mark.parametrize("kind", ["SAMPLERS", "GUIDANCE"])
def test_real_registry_round_trip(kind):
    registry, classes = real_registry(kind)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(st.data())
    def run(data):
        check_registry_round_trip(registry, data, classes, attributes=False)

    run()


@pytest.mark.parametrize("kind", ["SAMPLERS", "GUIDANCE"])
def test_real_registry_to_spec(kind):
    """Every registered class keeps its options as attributes, so `to_spec` writes it back."""
    registry, _ = real_registry(kind)
    for name, cls in registry.items():
        if any(p.required for p in params_of(cls).values()):
            continue
        obj = instantiate(registry, name, {})
        item = to_spec(obj)
        assert item.name == name
        assert item.params == {}, f"{name}: a default instance should write as its bare name, got {format([item])}"


def test_spec_module_exports():
    for name in spec.__all__:
        assert hasattr(spec, name)
    assert issubclass(SpecError, ValueError)
    assert math.isfinite(parse("x:a=1e308")[0].params["a"])
