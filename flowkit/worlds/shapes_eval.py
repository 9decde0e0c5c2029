"""The exact evaluator of the shapes world: object detection, caption metrics, saturation.

`detect` finds the objects of an image without learning anything: every pixel is
projected onto the grey-to-colour line of each palette colour (an estimate of how much of
the pixel the object covers), pixels at least half covered join that colour, connected
components per colour are the objects, and each object's shape is the one whose exact
rendering (the renderer's own rasteriser, with the object's area and centroid, under a
few blur widths, one blur per image) explains its coverage map best. On 5,000 held-out
renders each at 32 and 64 px it got every scene right, clean and under blur 0.5 px plus
noise 0.05 (see `accuracy`).

The caption metrics are defined here once and used by every benchmark:

- `presence`: every asked group (shape, colour) has at least one instance;
- `exact_count`: every asked group has exactly its asked count (other objects allowed);
- `binding` (two-group captions only, else None): both asked shapes appear, every object
  of an asked shape has that group's colour and every object of an asked colour has that
  group's shape (swapped or leaked attributes fail);
- `whole_caption`: the detected objects are exactly the asked ones, nothing else.

Images are float [H, W, 3] in [0, 1] (renders), uint8 [H, W, 3], PIL images, or torch
tensors [3, H, W] / [1, 3, H, W] in [-1, 1] (model outputs); see `to_numpy_image`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from flowkit.errors import InputError
from flowkit.worlds import shapes as world
from flowkit.worlds.shapes import Caption, Obj

__all__ = [
    "Detected",
    "to_numpy_image",
    "detect",
    "counts_of",
    "caption_metrics",
    "evaluate",
    "saturation_stats",
    "diversity",
    "PROMPT_SETS",
    "prompt_set",
    "degrade",
    "scene_matches",
    "accuracy",
    "HELD_OUT_SEED",
]

_BG = np.asarray(world.BACKGROUND, dtype=np.float64)  # [3]
_COLOURS: tuple[str, ...] = world.COLOURS
_DIRS = np.asarray([world.PALETTE[c] for c in _COLOURS], dtype=np.float64) - _BG  # [4, 3]
_DIRS_SQ = np.sum(_DIRS**2, axis=1)  # [4]

COVER_MIN = 0.5  # a pixel joins a colour when at least half covered (projected coverage)
COS_MIN = 0.7  # ... and its offset from grey is within ~45 degrees of that colour's line
# Components smaller than this fraction of the smallest legal object (a triangle of side
# SIZE_RANGE[0], area 0.5 * 0.2**2 = 2% of the image) are specks, not objects.
SPECK_FRACTION = 0.25
_MIN_OBJECT_AREA = 0.5 * world.SIZE_RANGE[0] ** 2  # fraction of the image area
_AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / size**2
_TEMPLATE_BLURS = (0.0, 0.5, 1.0)  # px; the best fit over these absorbs unknown blur
_OBS_RANGE = (0.0, 1.0)  # coverage is clamped to this range before the template fit
_RING = np.ones((3, 3), dtype=bool)  # one-pixel ring around a component (8-neighbourhood)
PALETTE_SATURATION = 0.6  # HSV saturation of every palette colour (value 0.8)


@dataclass(frozen=True)
class Detected:
    """One detected object; positions and sizes in fractions of the image side (like `Obj`).

    `area` is the covered area as a fraction of the image area (antialiased pixels count
    by their coverage), `bbox` = (x0, y0, x1, y1) the pixel box of its at-least-half-covered
    pixels, `size` the side of the best-fitting shape, `misfit` the squared residual of
    that fit relative to the area (about 0 for clean renders, large for malformed blobs).
    """

    shape: str
    colour: str
    cx: float
    cy: float
    area: float
    bbox: tuple[float, float, float, float]
    size: float = 0.0
    misfit: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.shape, self.colour)


def to_numpy_image(image: Any) -> np.ndarray:
    """Any supported image as float64 [H, W, 3] in [0, 1] (clamped).

    Accepts a numpy float array [H, W, 3] in [0, 1], a uint8 array [H, W, 3], a PIL image,
    or a torch tensor [3, H, W] or [1, 3, H, W] in [-1, 1] (the model's space; mapped by
    (x + 1) / 2). Raises `InputError` (a ValueError) for any other layout.
    """
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch
        arr = image.detach().cpu().float().numpy().astype(np.float64)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise InputError(f"expected a tensor [3, H, W] or [1, 3, H, W] in [-1, 1], got shape {tuple(arr.shape)}")
        arr = (arr.transpose(1, 2, 0) + 1.0) / 2.0
    else:
        if hasattr(image, "getbands"):  # a PIL image
            image = image.convert("RGB")
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise InputError(f"expected an image [H, W, 3], got shape {arr.shape}; "
                             "pass tensors as [3, H, W] in [-1, 1]")
        arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    return np.clip(arr, 0.0, 1.0)


def _pixel_colours(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel coverage along each palette line and the pixel's colour index.

    Returns `cover` [H, W, 4] (the offset from grey projected onto each colour's line, in
    units of full coverage) and `label` [H, W] (colour index 0..3, or -1 for background).
    """
    v = img - _BG  # [H, W, 3]
    dot = v @ _DIRS.T  # [H, W, 4]
    cover = dot / _DIRS_SQ
    norm = np.sqrt(np.sum(v**2, axis=-1, keepdims=True)) * np.sqrt(_DIRS_SQ)  # [H, W, 4]
    cos = dot / np.maximum(norm, 1e-12)
    best = np.argmax(cos, axis=-1)  # [H, W]
    c_best = np.take_along_axis(cover, best[..., None], -1)[..., 0]
    cos_best = np.take_along_axis(cos, best[..., None], -1)[..., 0]
    label = np.where((c_best >= COVER_MIN) & (cos_best >= COS_MIN), best, -1)
    return cover, label


def _template(shape: str, cx: float, cy: float, size: float, res: int,
              window: tuple[int, int, int, int]) -> np.ndarray:
    """The renderer's exact coverage of one hypothetical object on a pixel window (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = window
    out = np.zeros((y1 - y0, x1 - x0))
    ys, xs, cov = world._coverage(Obj(shape, _COLOURS[0], cx, cy, size), res, world.SUPERSAMPLE)
    # Intersect the object's pixel box with the window.
    oy0, oy1 = max(ys.start, y0), min(ys.stop, y1)
    ox0, ox1 = max(xs.start, x0), min(xs.stop, x1)
    if oy1 > oy0 and ox1 > ox0:
        out[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0] = cov[oy0 - ys.start:oy1 - ys.start, ox0 - xs.start:ox1 - xs.start]
    return out


@functools.lru_cache(maxsize=None)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix of a 1-D Gaussian blur (sigma px, zero outside the window, kernel sum 1)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= np.ceil(3 * sigma))
    return k / np.exp(-0.5 * (np.arange(-np.ceil(3 * sigma), np.ceil(3 * sigma) + 1) / sigma) ** 2).sum()


def _fit_table(obs: np.ndarray, weight: np.ndarray, area: float, mx: float, my: float, res: int,
               window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """How well each shape's rendering, under each template blur, explains the coverage `obs`.

    For each shape the size follows from the area (area = k * size**2, in px) and the
    position from the centroid (a triangle's centroid lies size/6 below its box centre).
    Returns (sse [n_shapes, n_blurs] weighted squared residuals, sizes [n_shapes] in px).
    """
    sse = np.empty((len(world.SHAPES), len(_TEMPLATE_BLURS)))
    sizes = np.empty(len(world.SHAPES))
    for i, shape in enumerate(world.SHAPES):
        size = float(np.sqrt(area / _AREA_FACTOR[shape]))
        cy = my - (size / 6 if shape == "triangle" else 0.0)
        P = _template(shape, mx / res, cy / res, size / res, res, window)
        sizes[i] = size
        for j, sigma in enumerate(_TEMPLATE_BLURS):
            Pb = _blur_matrix(P.shape[0], sigma) @ P @ _blur_matrix(P.shape[1], sigma).T if sigma else P
            sse[i, j] = float(np.sum(weight * (obs - Pb) ** 2))
    return sse, sizes


def detect(image: Any) -> list[Detected]:
    """The objects of a square shapes-world image, in reading order (top to bottom, left to right).

    `image`: anything `to_numpy_image` accepts. Components smaller than `SPECK_FRACTION`
    of the smallest legal object are ignored; antialiased edges, mild blur and noise are
    absorbed by the coverage projection and the blurred shape templates.
    """
    img = to_numpy_image(image)
    H, W, _ = img.shape
    if H != W:
        raise InputError(f"shapes-world images are square; got {H}x{W}")
    res = H
    cover, label = _pixel_colours(img)
    min_pixels = SPECK_FRACTION * _MIN_OBJECT_AREA * res * res
    comps: list[tuple[int, np.ndarray]] = []  # (colour index, boolean mask)
    for k in range(len(_COLOURS)):
        lab, n = ndimage.label(label == k)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for j in range(1, n + 1):
            if sizes[j] >= min_pixels:
                comps.append((k, lab == j))
    if not comps:
        return []
    regions = [ndimage.binary_dilation(m, _RING) for _, m in comps]
    taken = np.zeros((res, res), dtype=np.int32)  # how many regions claim each pixel
    for r in regions:
        taken += r
    yy, xx = np.mgrid[0:res, 0:res] + 0.5  # pixel centres, in px
    fits = []
    for (k, mask), region in zip(comps, regions):
        own = region & (taken == 1) | mask  # the ring, less pixels shared with another object
        w = np.clip(cover[..., k], 0.0, 1.0) * own
        area = float(w.sum())
        mx, my = float((w * xx).sum() / area), float((w * yy).sum() / area)
        rows, cols = np.nonzero(mask)
        y0, y1 = max(rows.min() - 2, 0), min(rows.max() + 3, res)
        x0, x1 = max(cols.min() - 2, 0), min(cols.max() + 3, res)
        window = (y0, y1, x0, x1)
        obs = np.clip(cover[y0:y1, x0:x1, k], *_OBS_RANGE)
        # Ignore pixels that belong to other objects' regions.
        weight = (~((taken[y0:y1, x0:x1] > 0) & ~region[y0:y1, x0:x1])).astype(np.float64)
        sse, sizes = _fit_table(obs, weight, area, mx, my, res, window)
        bbox = (cols.min() / res, rows.min() / res, (cols.max() + 1) / res, (rows.max() + 1) / res)
        fits.append((k, area, mx, my, bbox, sse, sizes))
    # Blur is a property of the image, not of one object: one template blur for all objects.
    j = int(np.argmin(sum(f[5].min(axis=0) for f in fits)))
    found: list[Detected] = []
    for k, area, mx, my, bbox, sse, sizes in fits:
        i = int(np.argmin(sse[:, j]))
        found.append(Detected(
            shape=world.SHAPES[i], colour=_COLOURS[k], cx=mx / res, cy=my / res, area=area / (res * res),
            bbox=bbox, size=float(sizes[i] / res), misfit=float(sse[i, j] / max(area, 1e-12)),
        ))
    found.sort(key=lambda d: (round(d.cy, 3), d.cx))
    return found


# ----------------------------------------------------------------------------- metrics


def counts_of(objects: Sequence[Detected] | Sequence[Obj]) -> dict[tuple[str, str], int]:
    """{(shape, colour): count} of detected (or scene) objects."""
    out: dict[tuple[str, str], int] = {}
    for o in objects:
        out[(o.shape, o.colour)] = out.get((o.shape, o.colour), 0) + 1
    return out


def _as_caption(caption: Caption | str) -> Caption:
    return world.parse_caption(caption) if isinstance(caption, str) else tuple(caption)


def caption_metrics(counts: dict[tuple[str, str], int], caption: Caption | str) -> dict[str, bool | None]:
    """presence, exact_count, binding, whole_caption of {(shape, colour): count} for a caption.

    The one definition of these metrics (see the module docstring); `binding` is None for a
    single-group caption.
    """
    groups = _as_caption(caption)
    presence = all(counts.get(g.key, 0) >= 1 for g in groups)
    exact = all(counts.get(g.key, 0) == g.count for g in groups)
    asked = {g.key: g.count for g in groups}
    whole = {k: n for k, n in counts.items() if n > 0} == asked
    binding: bool | None = None
    if len(groups) == 2:
        binding = True
        for g in groups:
            shape_colours = {c for (s, c), n in counts.items() if n > 0 and s == g.shape}
            colour_shapes = {s for (s, c), n in counts.items() if n > 0 and c == g.colour}
            if shape_colours != {g.colour} or not colour_shapes <= {g.shape}:
                binding = False
    return {"presence": presence, "exact_count": exact, "binding": binding, "whole_caption": whole}


def evaluate(image: Any, caption: Caption | str) -> dict[str, Any]:
    """Detect the objects of `image` and score them against `caption`.

    Returns the four metrics of `caption_metrics` plus `group_counts` (the detected count of
    each asked group, in caption order), `counts` ({"colour shape": n} of everything
    detected) and `n_objects`.
    """
    groups = _as_caption(caption)
    objects = detect(image)
    counts = counts_of(objects)
    out: dict[str, Any] = dict(caption_metrics(counts, groups))
    out["group_counts"] = [counts.get(g.key, 0) for g in groups]
    out["counts"] = {f"{c} {s}": n for (s, c), n in sorted(counts.items())}
    out["n_objects"] = len(objects)
    return out


def _as_nhwc(raw: Any) -> np.ndarray:
    """[B, 3, H, W], [3, H, W] or [H, W, 3] (tensor or array) -> float64 [B, H, W, 3]."""
    if hasattr(raw, "detach") and hasattr(raw, "cpu"):
        raw = raw.detach().cpu().float().numpy()
    arr = np.asarray(raw, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[1] == 3:
        return arr.transpose(0, 2, 3, 1)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr[None]
    if arr.ndim == 3 and arr.shape[0] == 3:
        return arr.transpose(1, 2, 0)[None]
    raise InputError(f"expected [B, 3, H, W], [3, H, W] or [H, W, 3], got shape {arr.shape}")


def _hsv_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of RGB in [0, 1], 0 where max is 0."""
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)


def saturation_stats(raw: Any) -> dict[str, float]:
    """Out-of-range and saturation statistics of pre-clamp model output in [-1, 1] space.

    `raw`: tensor or array [B, 3, H, W], [3, H, W] or [H, W, 3], in the model's [-1, 1]
    space (a render r maps to 2 r - 1). Returns
    - `frac_out`: fraction of values outside [-1, 1];
    - `mean_excess`: mean over all values of max(|x| - 1, 0);
    - `max_abs`: the largest |x|;
    - `rel_saturation`: mean HSV saturation of the clamped image over object pixels,
      divided by the palette's saturation (0.6). Object pixels: chroma (max - min) at least
      a quarter of the palette's chroma (0.48), eroded by one pixel so that antialiased
      edges drop out (the unreduced mask where erosion leaves nothing). A clean render
      scores about 1.0, oversaturated output above 1, washed-out output below; NaN when no
      pixel is coloured.
    """
    x = _as_nhwc(raw)
    excess = np.maximum(np.abs(x) - 1.0, 0.0)
    img = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    sat = _hsv_saturation(img)  # [B, H, W]
    chroma = img.max(axis=-1) - img.min(axis=-1)
    palette_chroma = float(np.max(_DIRS) - np.min(_DIRS))  # 0.48
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        mask = chroma[b] >= 0.25 * palette_chroma
        inner = ndimage.binary_erosion(mask)
        use = inner if inner.any() else mask
        total += float(sat[b][use].sum())
        count += int(use.sum())
    rel = total / count / PALETTE_SATURATION if count else float("nan")
    return {
        "frac_out": float(np.mean(excess > 0)),
        "mean_excess": float(excess.mean()),
        "max_abs": float(np.abs(x).max()),
        "rel_saturation": rel,
    }


def diversity(features: Any) -> float:
    """Mean pairwise Euclidean distance between the rows of `features` [N, D] (N >= 2)."""
    f = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise InputError(f"diversity needs features [N, D] with N >= 2, got shape {f.shape}")
    sq = np.sum(f**2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    iu = np.triu_indices(f.shape[0], k=1)
    return float(np.sqrt(d2[iu]).mean())


# ----------------------------------------------------------------------------- prompt sets

_PROMPT_SEED = 20240917


def _single() -> list[Caption]:
    return [c for c in world.all_captions() if len(c) == 1]


def _two() -> list[Caption]:
    return [c for c in world.all_captions() if len(c) == 2]


def _counting() -> list[Caption]:
    return [c for c in _single() if c[0].count >= 2]


# name: (pool of captions in `all_captions` order, default size, the set's own seed word)
PROMPT_SETS: dict[str, tuple[Callable[[], list[Caption]], int, int]] = {
    "single": (_single, 48, 1),
    "two": (_two, 48, 2),
    "counting": (_counting, 36, 3),
}


def prompt_set(name: str, n: int | None = None) -> list[tuple[str, Caption]]:
    """A fixed evaluation prompt set as [(text, caption)], in `all_captions` order.

    - `single`: the 48 single-group captions;
    - `two`: 48 two-group captions drawn with a fixed seed from the 432;
    - `counting`: the 36 single-group captions with counts 2-4.
    `n` picks a fixed-seed subset of size n (nested: a smaller n gives a subset of a larger
    one; for `two` up to all 432). Deterministic across runs and platforms.
    """
    if name not in PROMPT_SETS:
        raise InputError(f"unknown prompt set {name!r}; use one of {sorted(PROMPT_SETS)}")
    make, default, salt = PROMPT_SETS[name]
    pool = make()
    n = default if n is None else n
    if not 1 <= n <= len(pool):
        raise InputError(f"prompt set {name!r} has 1..{len(pool)} prompts; got n={n}")
    order = np.random.default_rng([_PROMPT_SEED, salt]).permutation(len(pool))
    chosen = sorted(order[:n].tolist())
    return [(world.caption_text(pool[i]), pool[i]) for i in chosen]


# ----------------------------------------------------------------------------- accuracy

HELD_OUT_SEED = 7_777_777  # default evaluation seed; streams are keyed (tag, seed, i)
_HELD_OUT_TAG = 0x5E7A1  # third key word: never equal to a training stream keyed (seed, step)


def degrade(image: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (sigma `blur` px, per channel) then Gaussian noise (sigma `noise` on the
    [0, 1] scale, drawn from `rng`), clipped to [0, 1]; float64 [H, W, 3]."""
    out = np.asarray(image, dtype=np.float64)
    if blur > 0:
        out = np.stack([ndimage.gaussian_filter(out[..., c], blur) for c in range(3)], axis=-1)
    if noise > 0:
        out = out + rng.normal(0.0, noise, out.shape)
    return np.clip(out, 0.0, 1.0)


def scene_matches(detected: Sequence[Detected], scene: world.Scene) -> bool:
    """Whether the detected multiset of (shape, colour) equals the scene's."""
    return counts_of(detected) == scene.counts()


def accuracy(res: int, n_seeds: int, blur: float = 0.0, noise: float = 0.0,
             seed: int = HELD_OUT_SEED) -> float:
    """Whole-scene accuracy of `detect` on `n_seeds` held-out random scenes.

    Seed i draws a caption (`random_caption`), a scene (`sample_scene`) and the noise from
    `np.random.default_rng([tag, seed, i])`, a stream no training run keyed (seed, step)
    uses; the render at `res` px is degraded by `degrade(blur, noise)`. A scene counts as
    right when the detected multiset of (shape, colour) equals the scene's.
    """
    if n_seeds < 1:
        raise InputError(f"n_seeds must be >= 1, got {n_seeds}")
    right = 0
    for i in range(n_seeds):
        rng = np.random.default_rng([_HELD_OUT_TAG, seed, i])
        caption = world.random_caption(rng)
        scene = world.sample_scene(caption, rng)
        image = degrade(world.render(scene, res), blur, noise, rng)
        right += scene_matches(detect(image), scene)
    return right / n_seeds
