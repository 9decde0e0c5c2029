"""Small CNNs of the shapes world: a two-headed classifier and a differentiable counter.

- `ShapesClassifier`: a convolutional trunk and a 64-d embedding (`features`, the feature
  space of the Frechet shapes distance in `flowkit.metrics`), with two linear heads over
  the 12 (shape, colour) groups of `shapes.GROUPS`: multi-label presence logits
  (`presence_logits`) and a softmax (`class_logits`, for gradient-free classifier
  guidance; on a multi-object scene its target is proportional to the group counts). A
  third head estimates the image's degradation (blur, noise, colour jitter): trained on
  the augmentation's own parameters, it keeps image quality in the features, so that the
  Frechet distance sees blur, noise and oversaturation as well as content.
- `ShapesCounter`: a density map per group on an 8x8 grid, softplus so it is non-negative,
  summed over the grid: 12 differentiable counts per image (counting guidance, rewards).

Both take images [B, 3, H, W] in [-1, 1] (the models' space), natively 32 px; any other
size is brought to 32 px first (adaptive average pooling for larger inputs, so a 64 px
render pools to nearly its 32 px render; bilinear for smaller ones).

Training data comes from the world on the fly (`training_batch`): empty scenes, the
world's captions, and free scenes that captions never ask for (same-shape or same-colour
pairs, three groups), rendered at 32 px and sometimes 64 px, then augmented (`augment`:
colour jitter, Gaussian blur up to 0.8 px, Gaussian noise up to 0.1) so that the nets
work on model outputs. The trained weights ship in `flowkit/weights/{classifier,counter}/`
(fp16 safetensors, a JSON config and a manifest of sha256 sums) and load offline and
strictly with `load_classifier()` / `load_counter()`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowkit.checksums import MANIFEST_FILE, verify_manifest, write_manifest
from flowkit.errors import InputError, WeightsError
from flowkit.worlds import shapes as world
from flowkit.worlds.shapes import Group

__all__ = [
    "N_GROUPS",
    "INPUT_SIZE",
    "ClassifierOutput",
    "DEGRADATIONS",
    "DEGRADATION_NEUTRAL",
    "DEGRADATION_SCALE",
    "Batch",
    "ShapesClassifier",
    "ShapesCounter",
    "to_input_size",
    "counts_vector",
    "random_groups",
    "augment",
    "training_batch",
    "held_out_batch",
    "held_out_accuracy",
    "HELD_OUT_SEED",
    "export_net",
    "load_net",
    "load_classifier",
    "load_counter",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "MANIFEST_FILE",
]

N_GROUPS = len(world.GROUPS)  # 12 (shape, colour) pairs, in `world.GROUPS` order
INPUT_SIZE = 32  # the nets' native resolution
_GROUP_INDEX = {g: i for i, g in enumerate(world.GROUPS)}
_WIDTHS = (32, 64, 96)
_GROUPS_PER_NORM = 8
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- networks


def to_input_size(x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] brought to [B, 3, 32, 32]: adaptive average pooling from larger
    sizes (an exact 2x2 box average from 64 px), bilinear from smaller ones."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) == (INPUT_SIZE, INPUT_SIZE):
        return x
    if h >= INPUT_SIZE and w >= INPUT_SIZE:
        return F.adaptive_avg_pool2d(x, INPUT_SIZE)
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_GROUPS_PER_NORM, cout), nn.SiLU()]


class _Trunk(nn.Module):
    """[B, 3, H, W] in [-1, 1] -> feature map [B, widths[-1], 8, 8] (two convs per stage,
    2x average pooling between stages; GroupNorm, so train and eval modes agree)."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.AvgPool2d(2))
            layers += _conv(cin, w) + _conv(w, w)
            cin = w
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_input_size(x))


class ClassifierOutput(NamedTuple):
    features: torch.Tensor  # [B, feature_dim]
    presence_logits: torch.Tensor  # [B, 12]
    class_logits: torch.Tensor  # [B, 12]
    degradation: torch.Tensor  # [B, 5] in natural units (see `DEGRADATIONS`)


# The augmentation's parameters, as (name, neutral value, scale), at the nets' 32 px: the
# degradation head's linear output z maps to neutral + scale * z, so that z is about
# [-1, 1] over the augmentation's ranges (the training loss is measured in z).
DEGRADATIONS: tuple[tuple[str, float, float], ...] = (
    ("blur", 0.0, 0.8), ("noise", 0.0, 0.1), ("saturation", 1.0, 0.35), ("contrast", 1.0, 0.15),
    ("brightness", 0.0, 0.05),
)
DEGRADATION_NEUTRAL = torch.tensor([d[1] for d in DEGRADATIONS])  # [5]
DEGRADATION_SCALE = torch.tensor([d[2] for d in DEGRADATIONS])  # [5]


class ShapesClassifier(nn.Module):
    """Presence (multi-label) and softmax classifier over the 12 groups, with 64-d features.

    `features(x)` [B, feature_dim]: a linear map of the trunk's mean- and max-pooled
    feature map and of the log energy of its first convolution's responses (before any
    normalisation, so the sharpness, noise and contrast that GroupNorm divides out stay
    visible), layer-normalised (zero mean, unit variance over its dimensions, so the
    polynomial kernel of KID sees a fixed scale). Three linear heads read it: presence,
    the softmax, and `degradation` (blur, noise and colour jitter, trained on the
    augmentation's own parameters), which keeps image quality in the features so that a
    Frechet distance on them sees blur, noise and oversaturation, not only content.
    Images [B, 3, H, W] in [-1, 1].
    """

    kind = "classifier"

    def __init__(self, widths: Sequence[int] = _WIDTHS, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = {"widths": list(widths), "feature_dim": int(feature_dim)}
        self.trunk = _Trunk(widths)
        self.embed = nn.Linear(2 * widths[-1] + widths[0], feature_dim)
        self.presence_head = nn.Linear(feature_dim, N_GROUPS)
        self.class_head = nn.Linear(feature_dim, N_GROUPS)
        self.degradation_head = nn.Linear(feature_dim, len(DEGRADATIONS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = to_input_size(x)
        h = self.trunk.net(x)  # [B, C, 8, 8]
        energy = torch.log(self.trunk.net[0](x).pow(2).mean(dim=(2, 3)) + 1e-4)  # [B, C0]
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), energy], dim=1)  # [B, 2C + C0]
        return F.layer_norm(self.embed(pooled), (self.embed.out_features,))

    def presence_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.presence_head(self.features(x))

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_head(self.features(x))

    def _degradation(self, f: torch.Tensor) -> torch.Tensor:
        z = self.degradation_head(f)
        return DEGRADATION_NEUTRAL.to(z) + DEGRADATION_SCALE.to(z) * z

    def degradation(self, x: torch.Tensor) -> torch.Tensor:
        """Estimated degradation [B, 5] at the nets' 32 px, in `DEGRADATIONS` order: blur sigma
        (px), noise sigma ([0, 1] scale), saturation factor, contrast factor, brightness shift
        (trained within the augmentation's ranges)."""
        return self._degradation(self.features(x))

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        f = self.features(x)
        return ClassifierOutput(f, self.presence_head(f), self.class_head(f), self._degradation(f))


class ShapesCounter(nn.Module):
    """Differentiable count of each of the 12 groups: `forward(x)` [B, 12] >= 0.

    A softplus density map per group on the trunk's 8x8 grid (`density`), summed over the
    grid. Smooth in the input, so `counts.sum().backward()` gives image gradients.
    """

    kind = "counter"

    def __init__(self, widths: Sequence[int] = _WIDTHS) -> None:
        super().__init__()
        self.config = {"widths": list(widths)}
        self.trunk = _Trunk(widths)
        c = widths[-1]
        self.head = nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU(), nn.Conv2d(c, N_GROUPS, 1))
        with torch.no_grad():  # start near zero counts: softplus(-5) * 64 cells ~ 0.4
            self.head[-1].bias.fill_(-5.0)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.head(self.trunk(x)))  # [B, 12, 8, 8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.density(x).sum(dim=(2, 3))


_NETS: dict[str, type[nn.Module]] = {"classifier": ShapesClassifier, "counter": ShapesCounter}


# ----------------------------------------------------------------------------- data


def counts_vector(groups: Sequence[Group]) -> np.ndarray:
    """Object count of each of the 12 groups (float32 [12], `world.GROUPS` order)."""
    out = np.zeros(N_GROUPS, dtype=np.float32)
    for g in groups:
        out[_GROUP_INDEX[g.key]] += g.count
    return out


def random_groups(rng: np.random.Generator, p_empty: float = 0.05, p_free: float = 0.25) -> tuple[Group, ...]:
    """The groups of one training scene: empty (`p_empty`), free (`p_free`: two or three
    distinct groups of any shapes and colours, 2-4 objects in all, the attribute leaks a
    model can make), else a caption of the world (`random_caption`, single or two-group)."""
    u = rng.random()
    if u < p_empty:
        return ()
    if u < p_empty + p_free:
        k = int(rng.integers(2, 4))
        chosen = rng.choice(N_GROUPS, size=k, replace=False)
        counts = np.ones(k, dtype=int)
        for _ in range(int(rng.integers(k, world.MAX_OBJECTS + 1)) - k):
            counts[rng.integers(k)] += 1
        return tuple(Group(int(n), world.GROUPS[i][1], world.GROUPS[i][0]) for i, n in zip(chosen, counts))
    return world.random_caption(rng)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with one sigma (px) per image; sigma ~ 0 is
    the identity. Replicate padding (the border is background)."""
    B, C, H, W = x.shape
    d = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (d[None, :] / sigma.clamp_min(1e-2)[:, None]) ** 2)  # [B, K]
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # [B*C, K]
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def augment(x: torch.Tensor, gen: torch.Generator, *, max_blur: float = 0.8, max_noise: float = 0.1,
            p_jitter: float = 0.8, p_blur: float = 0.5, p_noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade images [B, 3, H, W] in [0, 1] like model outputs: (images in [0, 1], clamped;
    parameters [B, 5] in `DEGRADATIONS` order, in the images' own pixels).

    Per image, in this order: colour jitter (probability `p_jitter`: brightness +-0.05,
    contrast x[0.85, 1.15], saturation x[0.75, 1.35]), Gaussian blur (`p_blur`: sigma
    U(0, max_blur) px), Gaussian noise (`p_noise`: sigma U(0, max_noise)). Every random
    number is drawn from `gen` in a fixed order, whatever the coins say.
    """
    B = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, generator=gen)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(B, generator=gen) < p).float()

    jit = coin(p_jitter)
    bright = uniform(-0.05, 0.05) * jit
    contrast = 1 + (uniform(0.85, 1.15) - 1) * jit
    saturation = 1 + (uniform(0.75, 1.35) - 1) * jit
    blur = uniform(0.0, max_blur) * coin(p_blur)
    noise_sigma = uniform(0.0, max_noise) * coin(p_noise)
    noise = torch.randn(x.shape, generator=gen)

    v = lambda t: t.view(B, 1, 1, 1)  # noqa: E731
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # [B, 1, H, W]
    x = grey + (x - grey) * v(saturation)
    mean = grey.mean(dim=(2, 3), keepdim=True)
    x = mean + (x - mean) * v(contrast) + v(bright)
    x = _blur(x, blur, radius=math.ceil(3 * max_blur))
    x = x + noise * v(noise_sigma)
    params = torch.stack([blur, noise_sigma, saturation, contrast, bright], dim=1)  # [B, 5]
    return x.clamp(0.0, 1.0), params


def _render_batch(groups: Sequence[tuple[Group, ...]], res: int, rng: np.random.Generator) -> torch.Tensor:
    images = [world.render(world.sample_scene(g, rng), res) for g in groups]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [B, 3, res, res] in [0, 1]


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, res, res] in [-1, 1]
    counts: torch.Tensor  # [B, 12]
    degradation: torch.Tensor  # [B, 5] the augmentation's parameters at 32 px (see DEGRADATIONS)


def training_batch(batch_size: int, rng: np.random.Generator, gen: torch.Generator, p64: float = 0.2) -> Batch:
    """One augmented training batch.

    res is 64 with probability `p64`, else 32 (one resolution per batch); scenes from
    `random_groups(rng)`, augmentation from `gen`. Blur and noise parameters are given at
    the nets' 32 px (a 64 px image pools 2x2: blur and noise sigma halve).
    """
    res = 64 if rng.random() < p64 else 32
    groups = [random_groups(rng) for _ in range(batch_size)]
    x, params = augment(_render_batch(groups, res, rng), gen)
    params[:, :2] *= INPUT_SIZE / res
    counts = torch.from_numpy(np.stack([counts_vector(g) for g in groups]))
    return Batch(x * 2 - 1, counts, params)


HELD_OUT_SEED = 31_337
_HELD_OUT_TAG = 0xC1A55  # first key word: never equal to a training stream keyed (seed, step)


def held_out_batch(n: int, res: int = 32, blur: float = 0.0, noise: float = 0.0,
                   seed: int = HELD_OUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` held-out scenes (the training mixture of `random_groups`), each drawn with its
    noise from `np.random.default_rng([tag, seed, i])`, rendered at `res` px and degraded by
    `shapes_eval.degrade(blur, noise)`: (images [n, 3, res, res] in [-1, 1], counts [n, 12])."""
    from flowkit.worlds.shapes_eval import degrade

    images, counts = [], []
    for i in range(n):
        rng = np.random.default_rng([_HELD_OUT_TAG, seed, i])
        groups = random_groups(rng)
        img = world.render(world.sample_scene(groups, rng), res)
        images.append(degrade(img, blur, noise, rng).astype(np.float32))
        counts.append(counts_vector(groups))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x * 2 - 1, torch.from_numpy(np.stack(counts))


@torch.no_grad()
def held_out_accuracy(classifier: ShapesClassifier | None, counter: ShapesCounter | None, n: int = 1000,
                      res: int = 32, blur: float = 0.0, noise: float = 0.0, seed: int = HELD_OUT_SEED,
                      batch_size: int = 250) -> dict[str, Any]:
    """Held-out accuracy of the nets on `held_out_batch(n, res, blur, noise, seed)`.

    Classifier: `presence` (mean over images and groups of sigmoid > 0.5 == present),
    `presence_per_group` [12], `exact_set` (all 12 presence bits right), `top1_single`
    (softmax argmax on images of exactly one group) and `n_single`. Counter: `count_exact`
    (all 12 rounded counts right), `count_per_group` [12] (rounded count right),
    `count_mae` (mean absolute error of the raw counts).
    """
    x, counts = held_out_batch(n, res, blur, noise, seed)
    out: dict[str, Any] = {"n": n, "res": res, "blur": blur, "noise": noise}
    if classifier is not None:
        pres = torch.cat([classifier.presence_logits(x[i:i + batch_size]) for i in range(0, n, batch_size)])
        cls = torch.cat([classifier.class_logits(x[i:i + batch_size]) for i in range(0, n, batch_size)])
        right = (pres > 0) == (counts > 0)  # [n, 12]
        single = (counts > 0).sum(dim=1) == 1
        out["presence"] = float(right.float().mean())
        out["presence_per_group"] = [round(float(v), 4) for v in right.float().mean(dim=0)]
        out["exact_set"] = float(right.all(dim=1).float().mean())
        out["top1_single"] = float((cls[single].argmax(1) == counts[single].argmax(1)).float().mean())
        out["n_single"] = int(single.sum())
    if counter is not None:
        pred = torch.cat([counter(x[i:i + batch_size]) for i in range(0, n, batch_size)])
        right = pred.round() == counts
        out["count_exact"] = float(right.all(dim=1).float().mean())
        out["count_per_group"] = [round(float(v), 4) for v in right.float().mean(dim=0)]
        out["count_mae"] = float((pred - counts).abs().mean())
    return out


# ----------------------------------------------------------------------------- weights


def export_net(model: nn.Module, folder: str | Path) -> list[Path]:
    """Write `model` (a ShapesClassifier or ShapesCounter) to `folder`: fp16 safetensors
    (`model.safetensors`), its config (`config.json`) and their sha256 (`manifest.json`)."""
    from safetensors.torch import save_file

    kind = getattr(model, "kind", None)
    if kind not in _NETS:
        raise InputError(f"export_net takes a ShapesClassifier or ShapesCounter, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(weights), metadata={"format": "pt", "kind": kind})
    config = folder / CONFIG_FILE
    config.write_text(json.dumps({
        "kind": kind, "format": FORMAT_VERSION, "args": model.config, "input_size": INPUT_SIZE,
        "input_range": [-1, 1], "groups": [list(g) for g in world.GROUPS],
    }, indent=2) + "\n")
    return [weights, config, write_manifest(folder, (weights, config))]


def load_net(folder: str | Path, kind: str | None = None) -> nn.Module:
    """A net from an `export_net` folder, offline and strictly, in eval mode and frozen.

    Every file of `manifest.json` must exist and match its sha256; the state dict must fit
    the config exactly (no missing or unexpected keys, same shapes). Any failure raises
    `WeightsError` naming the file. `kind` ('classifier' or 'counter') checks the config.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    verify_manifest(folder, (WEIGHTS_FILE, CONFIG_FILE),
                    hint=f"reinstall flowkit or retrain with `flowkit train {kind or 'classifier'}`")
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
        net_kind, args = config["kind"], config["args"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"weights config {config_path} is unreadable ({e!r})") from None
    if net_kind not in _NETS or (kind is not None and net_kind != kind):
        raise WeightsError(f"weights config {config_path} is for {net_kind!r}, expected {kind or sorted(_NETS)!r}")
    if [tuple(g) for g in config.get("groups", [])] != list(world.GROUPS):
        raise WeightsError(f"weights config {config_path} lists other groups than shapes.GROUPS")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"cannot read weights file {weights}: {e}") from None
    try:
        model = _NETS[net_kind](**args)
    except TypeError as e:
        raise WeightsError(f"weights config {config_path} has bad arguments: {e}") from None
    expected = model.state_dict()
    problems = [f"{label} {sorted(keys)[:5]}" for label, keys in (
        ("missing keys", expected.keys() - state.keys()), ("unexpected keys", state.keys() - expected.keys()),
        ("wrong shapes", {k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape}),
    ) if keys]
    if problems:
        raise WeightsError(f"weights file {weights} does not fit its config {config_path}: {'; '.join(problems)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def _shipped(kind: str) -> Path:
    from flowkit.storage import weights_dir

    return weights_dir() / kind


def load_classifier(folder: str | Path | None = None) -> ShapesClassifier:
    """The shipped classifier (or one from an `export_net` folder), strictly; see `load_net`."""
    return load_net(_shipped("classifier") if folder is None else folder, "classifier")  # type: ignore[return-value]


def load_counter(folder: str | Path | None = None) -> ShapesCounter:
    """The shipped counter (or one from an `export_net` folder), strictly; see `load_net`."""
    return load_net(_shipped("counter") if folder is None else folder, "counter")  # type: ignore[return-value]
