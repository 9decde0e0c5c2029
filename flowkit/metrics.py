"""Distribution metrics on the shapes classifier's features: FSD (Frechet) and KID.

- `features(images)`: the 64-d embedding of `ShapesClassifier.features`, batched;
- `frechet_distance(a, b)`: the Frechet distance between Gaussians fitted to two feature
  sets (Heusel et al. 2017, "GANs trained by a two time-scale update rule"), with the
  matrix square root taken through symmetric eigendecompositions (stable, real);
  on the classifier's features it is the Frechet shapes distance (`fsd`);
- `kernel_inception_distance(a, b)`: the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets (Binkowski et al. 2018,
  "Demystifying MMD GANs"); unbiased, so it can be slightly negative.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from scipy import linalg

from flowkit.errors import InputError

__all__ = ["KID", "features", "frechet_distance", "kernel_inception_distance", "fsd", "kid"]


@functools.lru_cache(maxsize=1)
def _default_classifier():
    from flowkit.worlds.shapes_nets import load_classifier

    return load_classifier()


def _as_image_batch(images: Any) -> torch.Tensor:
    """Images as float32 [N, 3, H, W] in [-1, 1], clamped (the images a user sees).

    Accepts a tensor [N, 3, H, W] in [-1, 1] (model space), a numpy array [N, H, W, 3]
    (float in [0, 1] or uint8), or a sequence of anything `shapes_eval.to_numpy_image`
    takes (PIL images, [H, W, 3] arrays, [3, H, W] tensors); a sequence of mixed sizes is
    brought to the classifier's 32 px image by image.
    """
    from flowkit.worlds.shapes_eval import to_numpy_image
    from flowkit.worlds.shapes_nets import to_input_size

    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"expected image tensors [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        return images.detach().float().clamp(-1.0, 1.0)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[-1] != 3:
            raise InputError(f"expected an image array [N, H, W, 3] in [0, 1], got shape {images.shape}")
        arr = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        return (torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2) * 2 - 1).clamp(-1.0, 1.0)
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or len(images) == 0:
        raise InputError("expected images: a tensor [N, 3, H, W], an array [N, H, W, 3] or a non-empty list")
    batch = [torch.from_numpy(to_numpy_image(im).astype(np.float32)).permute(2, 0, 1) * 2 - 1 for im in images]
    if len({tuple(b.shape) for b in batch}) > 1:
        batch = [to_input_size(b[None])[0] for b in batch]
    return torch.stack(batch)


@torch.no_grad()
def features(images: Any, classifier: Any = None, batch_size: int = 256) -> np.ndarray:
    """Classifier features of `images` (see `_as_image_batch` for the layouts), float64 [N, D].

    `classifier`: a `ShapesClassifier` (default: the shipped one, loaded once). Runs on the
    classifier's device, in batches of `batch_size`.
    """
    net = _default_classifier() if classifier is None else classifier
    x = _as_image_batch(images)
    device = next(net.parameters()).device
    out = [net.features(x[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _as_features(f: Any, name: str) -> np.ndarray:
    arr = np.asarray(f.detach().cpu().numpy() if hasattr(f, "detach") else f, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise InputError(f"{name}: expected features [N, D] with N >= 2, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: features contain NaN or inf")
    return arr


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from round-off clipped to 0)."""
    w, v = linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D].

    d^2 = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)), with
    tr((C_a C_b)^(1/2)) = tr((S C_b S)^(1/2)) for S = C_a^(1/2): both roots are of
    symmetric PSD matrices, taken by `eigh`, so the result is real and stable even for
    singular covariances (N <= D). Computed in float64; clipped at 0.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # [D, D]
    s = _sqrt_psd(c_a)
    m = s @ c_b @ s
    eig = linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu_a - mu_b
    return max(float(diff @ diff + np.trace(c_a) + np.trace(c_b) - 2.0 * tr_covmean), 0.0)


class KID(NamedTuple):
    """Kernel distance: the mean and standard deviation of the unbiased MMD^2 over subsets."""

    mean: float
    std: float


def kernel_inception_distance(feats_a: Any, feats_b: Any, *, subset_size: int = 1000, n_subsets: int = 100,
                              degree: int = 3, seed: int = 0) -> KID:
    """Unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / D + 1)^degree.

    Each of `n_subsets` rounds draws m = min(subset_size, N, M) rows of each set without
    replacement (from `np.random.default_rng(seed)`) and computes
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j).
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subset_size < 2 or n_subsets < 1:
        raise InputError(f"need subset_size >= 2 and n_subsets >= 1, got {subset_size}, {n_subsets}")
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.empty(n_subsets)
    for r in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / d + 1.0) ** degree
        k_yy = (y @ y.T / d + 1.0) ** degree
        k_xy = (x @ y.T / d + 1.0) ** degree
        off = m * (m - 1)
        values[r] = ((k_xx.sum() - np.trace(k_xx)) / off + (k_yy.sum() - np.trace(k_yy)) / off
                     - 2.0 * k_xy.mean())
    return KID(float(values.mean()), float(values.std()))


def fsd(images_a: Any, images_b: Any, classifier: Any = None) -> float:
    """Frechet shapes distance: `frechet_distance` of the classifier features of two image sets."""
    return frechet_distance(features(images_a, classifier), features(images_b, classifier))


def kid(images_a: Any, images_b: Any, classifier: Any = None, *, subset_size: int = 1000, n_subsets: int = 100,
        degree: int = 3, seed: int = 0) -> KID:
    """`kernel_inception_distance` of the classifier features of two image sets."""
    return kernel_inception_distance(features(images_a, classifier), features(images_b, classifier),
                                     subset_size=subset_size, n_subsets=n_subsets, degree=degree, seed=seed)
