"""The shapes world: renderer, scene sampler, captions, and the exact evaluator and metrics."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
import torch

from flowkit.worlds import shapes as W
from flowkit.worlds import shapes_eval as E
from flowkit.worlds.shapes import Group, Obj, Scene

# ----------------------------------------------------------------------------- renderer

GOLDEN = [  # (caption, seed, res, sha256 of the uint8 render)
    ("two red circles", 0, 32, "f1377c030307edb9a2977acac53e2be21ece4b61f07e5488948602f317607b7a"),
    ("a blue square and two green triangles", 1, 64,
     "01458920f0443206d2390ad55c12c9ce5c4fbd33312696ca512a0c3e130a144b"),
    ("four yellow triangles", 2, 32, "42b1a8eb0f437da6b9972b855d6dc60c6514569fa4b4c69fd132980880f885bd"),
]


def _scene(text: str, seed: int) -> Scene:
    return W.sample_scene(W.parse_caption(text), np.random.default_rng(seed))


@pytest.mark.parametrize("text,seed,res,digest", GOLDEN)
def test_golden_renders(text, seed, res, digest):
    img = W.render(_scene(text, seed), res)
    assert img.shape == (res, res, 3) and img.dtype == np.float32
    assert hashlib.sha256(np.round(img * 255).astype(np.uint8).tobytes()).hexdigest() == digest


def test_same_seed_same_scene():
    for seed in range(20):
        cap = W.random_caption(np.random.default_rng(seed))
        a = W.sample_scene(cap, np.random.default_rng([seed, 1]))
        b = W.sample_scene(cap, np.random.default_rng([seed, 1]))
        assert a == b
        assert np.array_equal(W.render(a, 32), W.render(b, 32))
    assert _scene("two red circles", 0) != _scene("two red circles", 1)


def test_scenes_are_legal():
    """Counts match the caption; sizes in range; inside the margin; bbox gaps respected."""
    for i in range(400):
        rng = np.random.default_rng([99, i])
        cap = W.random_caption(rng)
        scene = W.sample_scene(cap, rng)
        assert scene.counts() == {g.key: g.count for g in cap}
        for o in scene.objects:
            assert W.SIZE_RANGE[0] - 1e-12 <= o.size <= W.SIZE_RANGE[1] + 1e-12
            x0, y0, x1, y1 = o.bbox()
            assert min(x0, y0) >= W.MARGIN - 1e-9 and max(x1, y1) <= 1 - W.MARGIN + 1e-9
        for a, b in itertools.combinations(scene.objects, 2):
            assert W._bbox_gap(a, b) >= W.GAP - 1e-12
        if i < 50:  # pixel level: coloured pixels never mix two objects' colours
            img = W.render(scene, 64).astype(np.float64)
            covered = np.zeros((64, 64), dtype=int)
            for o in scene.objects:
                covered += W.render(Scene((o,)), 64).astype(np.float64).sum(-1) != 1.5
            assert covered.max() <= 1
            assert np.all((img >= 0) & (img <= 1))


# ----------------------------------------------------------------------------- captions


def test_caption_round_trip_and_count():
    caps = W.all_captions()
    assert len(caps) == 480 and len(set(caps)) == 480
    assert sum(len(c) == 1 for c in caps) == 48
    for c in caps:
        assert W.parse_caption(W.caption_text(c)) == c
    assert W.caption_text((Group(1, "blue", "square"), Group(2, "red", "circle"))) == "a blue square and two red circles"


@pytest.mark.parametrize("bad", [
    "five red circles",
    "a red circle and a red square",
    "a purple circle",
    "two red circle",
    "a red circle and a blue circle",
    "three red circles and two blue squares",
    "a red circle and a blue square and a green triangle",
])
def test_bad_captions_raise(bad):
    with pytest.raises(ValueError):
        W.parse_caption(bad)


# ----------------------------------------------------------------------------- detector


@pytest.mark.parametrize("res", [32, 64])
def test_detector_accuracy_clean(res):
    assert E.accuracy(res, 1000) >= 0.99


@pytest.mark.parametrize("res", [32, 64])
def test_detector_accuracy_blur_and_noise(res):
    assert E.accuracy(res, 1000, blur=0.5, noise=0.05) >= 0.97


def test_detect_positions_sizes_and_inputs():
    objs = (Obj("circle", "red", 0.25, 0.25, 0.30), Obj("square", "blue", 0.72, 0.30, 0.24),
            Obj("triangle", "green", 0.30, 0.72, 0.28), Obj("triangle", "yellow", 0.75, 0.75, 0.22))
    img = W.render(Scene(objs), 64)
    found = E.detect(img)
    assert sorted((d.shape, d.colour) for d in found) == sorted((o.shape, o.colour) for o in objs)
    for o in objs:
        d = next(d for d in found if d.key == (o.shape, o.colour))
        centroid_dy = o.size / 6 if o.shape == "triangle" else 0.0
        assert abs(d.cx - o.cx) < 0.5 / 64 and abs(d.cy - (o.cy + centroid_dy)) < 0.5 / 64
        assert d.size == pytest.approx(o.size, rel=0.05)
        assert d.misfit < 0.05
    # The same image as a model-space tensor [3, H, W] / [1, 3, H, W], as uint8, as PIL.
    x = torch.from_numpy(img).permute(2, 0, 1) * 2 - 1
    u8 = np.round(img * 255).astype(np.uint8)
    from PIL import Image
    for other in (x, x[None], u8, Image.fromarray(u8)):
        assert [d.key for d in E.detect(other)] == [d.key for d in found]
    with pytest.raises(ValueError):
        E.detect(np.zeros((3, 32, 32)))
    with pytest.raises(ValueError):
        E.detect(np.full((32, 48, 3), 0.5))


def test_detect_ignores_background_and_specks():
    grey = np.full((32, 32, 3), 0.5)
    assert E.detect(grey) == []
    speck = grey.copy()
    speck[10:12, 10:12] = W.PALETTE["red"]  # 4 px, far below the smallest legal object
    assert E.detect(speck) == []
    # Pixels far from every palette colour (white, black) are not objects.
    blob = grey.copy()
    blob[5:15, 5:15] = 1.0
    blob[18:28, 18:28] = 0.0
    assert E.detect(blob) == []


# ----------------------------------------------------------------------------- metrics


def _eval(objs, caption, res=64):
    return E.evaluate(W.render(Scene(tuple(objs)), res), caption)


def test_metric_extra_object():
    objs = [Obj("circle", "red", 0.25, 0.25, 0.25), Obj("circle", "red", 0.7, 0.3, 0.25),
            Obj("square", "blue", 0.4, 0.75, 0.25)]
    m = _eval(objs, "two red circles")
    assert m["presence"] and m["exact_count"] and not m["whole_caption"]
    assert m["binding"] is None
    assert m["group_counts"] == [2] and m["n_objects"] == 3
    assert m["counts"] == {"red circle": 2, "blue square": 1}
    assert _eval(objs[:2], "two red circles")["whole_caption"]


def test_metric_count_mismatch():
    objs = [Obj("circle", "red", 0.25, 0.25, 0.25), Obj("circle", "red", 0.7, 0.3, 0.25)]
    for res in (32, 64):
        m = _eval(objs, "three red circles", res)
        assert m["presence"] and not m["exact_count"] and not m["whole_caption"]
        assert m["group_counts"] == [2]


def test_metric_binding():
    caption = "a red circle and a blue square"
    right = [Obj("circle", "red", 0.3, 0.3, 0.28), Obj("square", "blue", 0.7, 0.7, 0.28)]
    swapped = [Obj("circle", "blue", 0.3, 0.3, 0.28), Obj("square", "red", 0.7, 0.7, 0.28)]
    leaked = right + [Obj("circle", "blue", 0.7, 0.25, 0.22)]
    m = _eval(right, caption)
    assert m["presence"] and m["exact_count"] and m["binding"] is True and m["whole_caption"]
    m = _eval(swapped, caption)
    assert m["binding"] is False and not m["presence"] and not m["whole_caption"]
    m = _eval(leaked, caption)  # both groups exact, but blue also appears on a circle
    assert m["presence"] and m["exact_count"] and m["binding"] is False and not m["whole_caption"]
    # An empty image binds nothing.
    assert E.caption_metrics({}, caption) == {"presence": False, "exact_count": False,
                                              "binding": False, "whole_caption": False}
    # Unasked objects do not break binding.
    counts = {("circle", "red"): 1, ("square", "blue"): 1, ("triangle", "green"): 2}
    assert E.caption_metrics(counts, W.parse_caption(caption))["binding"] is True


def test_saturation_stats():
    scene = _scene("a blue square and two green triangles", 1)
    img = W.render(scene, 32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1  # [1, 3, H, W] in [-1, 1]
    s = E.saturation_stats(x)
    assert s["frac_out"] == 0.0 and s["mean_excess"] == 0.0
    assert s["rel_saturation"] == pytest.approx(1.0, abs=0.02)
    assert E.saturation_stats(img * 2 - 1) == pytest.approx(s)  # [H, W, 3] array
    # x1.5 stays inside [-1, 1] (the palette reaches 0.6) but is more saturated.
    s15 = E.saturation_stats(1.5 * x)
    assert s15["frac_out"] == 0.0 and s15["rel_saturation"] > 1.15
    s2 = E.saturation_stats(torch.cat([x, 2.0 * x]))  # a batch of two
    assert s2["frac_out"] > 0.0 and s2["mean_excess"] > 0.0 and s2["max_abs"] > 1.0
    assert E.saturation_stats(2.0 * x)["rel_saturation"] > s15["rel_saturation"]
    assert np.isnan(E.saturation_stats(np.zeros((8, 8, 3)))["rel_saturation"])


def test_diversity():
    assert E.diversity(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    f = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert E.diversity(f) == pytest.approx((1 + 1 + np.sqrt(2)) / 3)
    assert E.diversity(torch.ones(5, 7)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        E.diversity(np.zeros((1, 4)))


# ----------------------------------------------------------------------------- prompt sets


def test_prompt_sets():
    single, two, counting = E.prompt_set("single"), E.prompt_set("two"), E.prompt_set("counting")
    assert len(single) == 48 and len(two) == 48 and len(counting) == 36
    assert {c for _, c in single} == {c for c in W.all_captions() if len(c) == 1}
    assert all(len(c) == 2 for _, c in two) and len({c for _, c in two}) == 48
    assert all(len(c) == 1 and 2 <= c[0].count <= 4 for _, c in counting)
    for text, cap in single + two + counting:
        assert W.parse_caption(text) == cap
    assert E.prompt_set("two") == two  # deterministic
    assert set(E.prompt_set("two", 12)) <= set(two)  # nested
    assert len(E.prompt_set("two", 432)) == 432
    with pytest.raises(ValueError):
        E.prompt_set("triples")
    with pytest.raises(ValueError):
        E.prompt_set("single", 49)
