"""Bad input to flowkit.sample: one-line errors from flowkit.errors that say what to change."""

import pytest
import torch

import flowkit
from flowkit.errors import FlowkitError, GuidanceStackError, InputError, NonFiniteError, UnknownNameError


@pytest.fixture(scope="module")
def pipe():
    return flowkit.load("tiny")


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(sampler="eulr"), UnknownNameError, ["did you mean 'euler'", "heun"]),
        (dict(guidance="cgf:scale=3"), UnknownNameError, ["cfg"]),
        (dict(guidance="cfg:scal=3"), FlowkitError, ["scale"]),
        (dict(steps=0), InputError, ["steps"]),
        (dict(height=30, width=30), InputError, ["multiples of 4"]),
        (dict(height=32), InputError, ["both height and width"]),
        (dict(guidance="cfg:scale=7+cfg:scale=3"), GuidanceStackError, ["combiners"]),
        (dict(generators=[torch.Generator()]), InputError, ["one generator per image"]),
        (dict(negative_prompt=["a", "b", "c"]), InputError, ["negative prompts"]),
    ],
)
def test_bad_input_is_one_clear_line(pipe, kwargs, error, words):
    with pytest.raises(error) as info:
        flowkit.sample(pipe, ["a red circle", "two blue squares"], steps=kwargs.pop("steps", 2), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    assert isinstance(info.value, ValueError)


def test_unknown_model_lists_the_known(pipe):
    with pytest.raises(UnknownNameError, match="tiny"):
        flowkit.load("tinyy")


def test_nan_mid_run_names_the_step_and_skips_decoding(pipe, monkeypatch):
    unet = pipe.unet
    real = unet.forward
    calls = {"n": 0}

    def forward(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return (out[0] * float("nan"),) if calls["n"] > 3 else out

    decoded = []
    from flowkit.adapters import shapes

    monkeypatch.setattr(unet, "forward", forward)
    monkeypatch.setattr(shapes, "to_images", lambda *a: decoded.append(1))
    with pytest.raises(NonFiniteError, match="step 3"):
        flowkit.sample(pipe, "a red circle", steps=8)
    assert decoded == []


@pytest.mark.parametrize("kwargs, words", [
    (dict(seed=-1), "seed must be an integer from 0 to 9223372036854775807, got -1"),
    (dict(seed="3"), "seed must be an integer from 0 to 9223372036854775807, got '3'"),
    (dict(seed=None), "seed must be an integer from 0 to 9223372036854775807, got None"),
    (dict(seed=1.5), "seed must be an integer from 0 to 9223372036854775807, got 1.5"),
    (dict(seed=2**63), "seed must be an integer from 0 to"),
    (dict(prompts=None), "prompts must be a string or a list of strings, got None"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=["a", 5]), "prompts[1] must be a string, got an int"),
    (dict(prompts="a \udcff"), "is not valid UTF-8 text"),
    (dict(negative_prompt=5), "negative_prompt must be a string or a list of strings, got an int"),
    (dict(generators=[1]), "generators[0] must be a torch.Generator, got an int"),
    (dict(generators=torch.Generator()), "generators must be a list of torch.Generator objects"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer from 1 to 100000, got True"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer from 1 to 100000, got 0"),
    (dict(steps=4294967297), "steps must be an integer from 1 to 10000"),
    (dict(steps=2.0), "steps must be an integer from 1 to 10000, got 2.0"),
    (dict(height=10**12, width=32), "height must be an integer from 1 to 8192"),
    (dict(start_index=-1), "start_index must be"),
    (dict(grid="dynamic:1e300"), "mu must be a finite number"),
])
def test_bad_arguments_are_input_errors_that_say_what_to_change(pipe, kwargs, words):
    """Item 6: flowkit.sample raised numpy's ValueError (seed=-1), TypeError (seed="3", None,
    prompts=None, negative_prompt=5, generators=[1]), or silently took num_images_per_prompt=True
    as 1; steps=4294967297 tried a huge allocation. Each is now flowkit's one-line error,
    before any work (an InputError, or a SpecError for a grid)."""
    kwargs = {"prompts": "a red circle", "steps": 1, **kwargs}
    prompts = kwargs.pop("prompts")
    with pytest.raises(FlowkitError) as info:
        flowkit.sample(pipe, prompts, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, InputError) or "grid" in kwargs
