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
