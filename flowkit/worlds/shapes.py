"""The shapes world: coloured circles, squares and triangles on a grey background.

A procedural text-to-image world whose every claim can be checked exactly. Scenes are
sampled in normalised coordinates ([0, 1]^2, y down) and rasterised in numpy with a fixed
supersampling grid, so a render is a pure function of (scene, resolution) and never
changes with the Pillow version.

Captions are plain English: one group ("three red circles", "a blue square") or two
groups of different shape and different colour ("two red circles and a yellow triangle").
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "PALETTE",
    "SHAPES",
    "GROUPS",
    "NUMBER_WORDS",
    "Group",
    "Caption",
    "Obj",
    "Scene",
    "all_captions",
    "caption_text",
    "parse_caption",
    "random_caption",
    "sample_scene",
    "render",
    "render_caption",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
# Mid-saturation colours (HSV saturation 0.6, value 0.8), so that oversaturation can show.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.32, 0.32),
    "green": (0.32, 0.80, 0.32),
    "blue": (0.32, 0.32, 0.80),
    "yellow": (0.80, 0.80, 0.32),
}
BACKGROUND: tuple[float, float, float] = (0.5, 0.5, 0.5)
MAX_COUNT = 4
MAX_OBJECTS = 4  # in a two-group scene
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
_WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}

# Scene geometry, in fractions of the image side (the same scene at every resolution).
SIZE_RANGE = (0.20, 0.36)  # circle diameter, square side, triangle base = height
GAP = 0.07  # minimum gap between bounding boxes
MARGIN = 0.03  # minimum distance to the border
SUPERSAMPLE = 4  # sub-pixel samples per pixel side


@dataclass(frozen=True, order=True)
class Group:
    """`count` objects of one shape in one colour."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; use one of {COLOURS}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count {self.count} outside 1..{MAX_COUNT}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.shape, self.colour)


Caption = tuple[Group, ...]
GROUPS: tuple[tuple[str, str], ...] = tuple(itertools.product(SHAPES, COLOURS))  # 12 (shape, colour)


def caption_text(groups: Sequence[Group]) -> str:
    """`(Group(2, 'red', 'circle'),)` -> 'two red circles'."""
    parts = []
    for g in groups:
        noun = g.shape + ("s" if g.count > 1 else "")
        parts.append(f"{NUMBER_WORDS[g.count]} {g.colour} {noun}")
    return " and ".join(parts)


_GROUP_RE = re.compile(r"^(a|an|one|two|three|four)\s+(\w+)\s+(\w+?)(s?)$")


def parse_caption(text: str) -> Caption:
    """Parse a caption of one or two groups; raises ValueError naming the bad part."""
    parts = [p.strip() for p in re.split(r"\s+and\s+", text.strip().lower().rstrip("."))]
    groups = []
    for part in parts:
        m = _GROUP_RE.match(re.sub(r"\s+", " ", part))
        if not m:
            raise ValueError(f"cannot parse {part!r}: expected '<count> <colour> <shape>'")
        count = _WORD_NUMBERS[m.group(1)]
        colour, shape, plural = m.group(2), m.group(3), m.group(4)
        if (count > 1) != bool(plural):
            raise ValueError(f"{part!r}: count and plural disagree")
        groups.append(Group(count, colour, shape))
    if len(groups) > 2:
        raise ValueError(f"{text!r}: at most two groups")
    if len(groups) == 2:
        a, b = groups
        if a.shape == b.shape or a.colour == b.colour:
            raise ValueError(f"{text!r}: two groups must differ in shape and colour")
        if a.count + b.count > MAX_OBJECTS:
            raise ValueError(f"{text!r}: at most {MAX_OBJECTS} objects in a two-group caption")
    return tuple(groups)


def asked_groups(prompts: Sequence[str | None], max_groups: int = 2) -> list[list[int]]:
    """Per prompt, the indices in `GROUPS` of the groups it asks for (padded with -1 to
    `max_groups`); a prompt that is not a caption of this world asks for none."""
    out = []
    for text in prompts:
        try:
            groups = parse_caption(text) if isinstance(text, str) else ()
        except ValueError:
            groups = ()
        keys = [GROUPS.index(g.key) for g in groups][:max_groups]
        out.append(keys + [-1] * (max_groups - len(keys)))
    return out


def asked_counts(prompts: Sequence[str | None]) -> list[list[int]]:
    """Per prompt, the count it asks of each group of `GROUPS` (0 where it asks for none; a
    prompt that is not a caption of this world asks for nothing)."""
    out = []
    for text in prompts:
        row = [0] * len(GROUPS)
        try:
            groups = parse_caption(text) if isinstance(text, str) else ()
        except ValueError:
            groups = ()
        for g in groups:
            row[GROUPS.index(g.key)] = g.count
        out.append(row)
    return out


def swap_group(text: str, target: int, reference: int) -> str:
    """The caption `text` with its group `GROUPS[target]` asked as `GROUPS[reference]`
    instead, counts kept: ('two red circles and a blue square', circle-red, circle-green)
    -> 'two green circles and a blue square'. A caption without that group is unchanged."""
    groups = []
    for g in parse_caption(text):
        shape, colour = GROUPS[reference] if GROUPS.index(g.key) == target else g.key
        groups.append(Group(g.count, colour, shape))
    return caption_text(groups)


def all_captions() -> list[Caption]:
    """Every caption of the world: 48 single-group and 432 two-group captions."""
    out: list[Caption] = []
    for shape, colour in GROUPS:
        for n in range(1, MAX_COUNT + 1):
            out.append((Group(n, colour, shape),))
    for (s1, c1), (s2, c2) in itertools.product(GROUPS, GROUPS):
        if s1 == s2 or c1 == c2:
            continue
        for n1 in range(1, MAX_OBJECTS):
            for n2 in range(1, MAX_OBJECTS - n1 + 1):
                out.append((Group(n1, c1, s1), Group(n2, c2, s2)))
    return out


def random_caption(rng: np.random.Generator, p_two: float = 0.5) -> Caption:
    """A caption drawn uniformly within its kind (single or two-group)."""
    shape, colour = GROUPS[rng.integers(len(GROUPS))]
    if rng.random() >= p_two:
        return (Group(int(rng.integers(1, MAX_COUNT + 1)), colour, shape),)
    others = [(s, c) for s, c in GROUPS if s != shape and c != colour]
    s2, c2 = others[rng.integers(len(others))]
    pairs = [(a, b) for a in range(1, MAX_OBJECTS) for b in range(1, MAX_OBJECTS - a + 1)]
    n1, n2 = pairs[rng.integers(len(pairs))]
    return (Group(n1, colour, shape), Group(n2, c2, s2))


@dataclass(frozen=True)
class Obj:
    """One object: centre (cx, cy) and size in fractions of the image side."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    def bbox(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for o in self.objects:
            out[(o.shape, o.colour)] = out.get((o.shape, o.colour), 0) + 1
        return out


def _bbox_gap(a: Obj, b: Obj) -> float:
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    dx = max(bx0 - ax1, ax0 - bx1, 0.0)
    dy = max(by0 - ay1, ay0 - by1, 0.0)
    return max(dx, dy)


def sample_scene(groups: Iterable[Group], rng: np.random.Generator) -> Scene:
    """Place the objects of `groups` at random sizes and positions with no overlaps."""
    kinds = [(g.shape, g.colour) for g in groups for _ in range(g.count)]
    smin, smax = SIZE_RANGE
    for attempt in range(200):
        # Shrink the size range after repeated failures so that dense scenes always place.
        hi = smax - (smax - smin) * min(attempt / 100, 1.0)
        placed: list[Obj] = []
        for shape, colour in kinds:
            for _ in range(50):
                size = float(rng.uniform(smin, max(hi, smin)))
                lo_c, hi_c = MARGIN + size / 2, 1 - MARGIN - size / 2
                cx, cy = float(rng.uniform(lo_c, hi_c)), float(rng.uniform(lo_c, hi_c))
                cand = Obj(shape, colour, cx, cy, size)
                if all(_bbox_gap(cand, o) >= GAP for o in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == len(kinds):
            order = rng.permutation(len(placed))
            return Scene(tuple(placed[i] for i in order))
    raise RuntimeError(f"could not place {len(kinds)} objects")  # pragma: no cover


def _coverage(obj: Obj, res: int, ss: int) -> tuple[slice, slice, np.ndarray]:
    """Fraction of each pixel inside `obj` (numpy supersampling), on the object's bbox."""
    x0, y0, x1, y1 = obj.bbox()
    px0, py0 = max(int(np.floor(x0 * res)), 0), max(int(np.floor(y0 * res)), 0)
    px1, py1 = min(int(np.ceil(x1 * res)), res), min(int(np.ceil(y1 * res)), res)
    # Sub-pixel sample centres in normalised coordinates.
    sx = (np.arange(px0 * ss, px1 * ss) + 0.5) / (res * ss)
    sy = (np.arange(py0 * ss, py1 * ss) + 0.5) / (res * ss)
    X, Y = np.meshgrid(sx, sy)
    h = obj.size / 2
    if obj.shape == "circle":
        inside = (X - obj.cx) ** 2 + (Y - obj.cy) ** 2 <= h * h
    elif obj.shape == "square":
        inside = (np.abs(X - obj.cx) <= h) & (np.abs(Y - obj.cy) <= h)
    else:  # upright isosceles triangle, apex at the top, base = height = size
        rel_y = (Y - (obj.cy - h)) / obj.size  # 0 at the apex, 1 at the base
        inside = (rel_y >= 0) & (rel_y <= 1) & (np.abs(X - obj.cx) <= h * rel_y)
    cov = inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3))
    return slice(py0, py1), slice(px0, px1), cov


def render(scene: Scene, res: int = 32, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Rasterise `scene` to a float32 image [res, res, 3] in [0, 1]."""
    img = np.empty((res, res, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for obj in scene.objects:
        ys, xs, cov = _coverage(obj, res, supersample)
        col = np.asarray(PALETTE[obj.colour])
        img[ys, xs] = img[ys, xs] * (1 - cov[..., None]) + col * cov[..., None]
    return img.astype(np.float32)


def render_caption(caption: Caption, res: int, rng: np.random.Generator) -> tuple[Scene, np.ndarray]:
    scene = sample_scene(caption, rng)
    return scene, render(scene, res)
