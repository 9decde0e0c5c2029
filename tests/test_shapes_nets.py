"""The shapes world's classifier and counter (shipped weights), FSD/KID, and the training
targets `classifier`, `counter` and `shapes` (tiny) on the resumable loop."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flowkit import metrics
from flowkit.errors import WeightsError
from flowkit.loading import sha256_file, weights_dir
from flowkit.train import TrainConfig, target, train
from flowkit.train.loop import step_generators
from flowkit.worlds import shapes_nets as N

KINDS = ("classifier", "counter")
LOADERS = {"classifier": N.load_classifier, "counter": N.load_counter}
TEST_SEED = 424_242  # held-out scenes none of the reported measurements used


@pytest.fixture(scope="module")
def classifier():
    return N.load_classifier()


@pytest.fixture(scope="module")
def counter():
    return N.load_counter()


# ----------------------------------------------------------------------------- shipped weights


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_weights_load_strictly_offline(kind, no_network):
    folder = weights_dir() / kind
    sums = json.loads((folder / N.MANIFEST_FILE).read_text())
    assert set(sums) == {N.WEIGHTS_FILE, N.CONFIG_FILE}
    for name, digest in sums.items():
        assert sha256_file(folder / name) == digest, name
    state = load_file(str(folder / N.WEIGHTS_FILE))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert (folder / N.WEIGHTS_FILE).stat().st_size <= 1 << 20
    net = LOADERS[kind]()
    assert set(state) == set(net.state_dict())  # nothing missing, nothing unexpected
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) <= 300_000
    x = torch.zeros(2, 3, 32, 32)
    if kind == "classifier":
        out = net(x)
        assert out.features.shape == (2, 64) and out.presence_logits.shape == out.class_logits.shape == (2, 12)
        assert out.degradation.shape == (2, len(N.DEGRADATIONS))
    else:
        assert net(x).shape == (2, 12) and bool((net(x) >= 0).all())


def _copy(kind, tmp_path):
    dst = tmp_path / kind
    shutil.copytree(weights_dir() / kind, dst)
    return dst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [N.WEIGHTS_FILE, N.CONFIG_FILE])
def test_damaged_file_is_named(kind, name, tmp_path):
    folder = _copy(kind, tmp_path)
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged") as e:
        LOADERS[kind](folder)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [N.WEIGHTS_FILE, N.CONFIG_FILE, N.MANIFEST_FILE])
def test_missing_file_is_named(kind, name, tmp_path):
    folder = _copy(kind, tmp_path)
    (folder / name).unlink()
    with pytest.raises(WeightsError, match="missing") as e:
        LOADERS[kind](folder)
    assert str(folder / name) in str(e.value)


def test_unexpected_key_or_wrong_kind_is_refused(tmp_path):
    folder = _copy("counter", tmp_path)
    path = folder / N.WEIGHTS_FILE
    state = load_file(str(path))
    state["extra.weight"] = torch.zeros(1, dtype=torch.float16)
    save_file(state, str(path))
    sums = json.loads((folder / N.MANIFEST_FILE).read_text())
    sums[N.WEIGHTS_FILE] = sha256_file(path)  # a consistent manifest: the strict load must catch it
    (folder / N.MANIFEST_FILE).write_text(json.dumps(sums))
    with pytest.raises(WeightsError, match="does not fit") as e:
        N.load_counter(folder)
    assert str(path) in str(e.value)
    with pytest.raises(WeightsError, match="expected 'classifier'"):
        N.load_classifier(weights_dir() / "counter")


# ----------------------------------------------------------------------------- accuracy

# Measured on 1,000 held-out scenes (the training mixture; `held_out_accuracy`), at 32 and
# 64 px, clean and under blur 0.5 px + noise 0.05: presence >= 0.9999, exact set >= 0.999,
# softmax top-1 on single-group scenes 1.0, exact counts (all 12 groups) >= 0.998, every
# group's count >= 0.999. The thresholds sit a little below (200 scenes per test).
THRESHOLDS = {
    "presence": 0.995, "exact_set": 0.97, "top1_single": 0.97,  # classifier
    "count_exact": 0.97, "count_group_min": 0.98,  # counter
}


@pytest.mark.parametrize("res,blur,noise", [(32, 0.0, 0.0), (32, 0.5, 0.05), (64, 0.0, 0.0)])
def test_accuracy_on_fresh_held_out_renders(classifier, counter, res, blur, noise):
    acc = N.held_out_accuracy(classifier, counter, n=200, res=res, blur=blur, noise=noise, seed=TEST_SEED)
    for key in ("presence", "exact_set", "top1_single", "count_exact"):
        assert acc[key] >= THRESHOLDS[key], (key, acc)
    assert min(acc["count_per_group"]) >= THRESHOLDS["count_group_min"], acc


def test_counter_gradient_wrt_the_image(counter):
    x, counts = N.held_out_batch(4, seed=TEST_SEED)
    x = x.clone().requires_grad_(True)
    g = int(counts.sum(dim=0).argmax())  # a group present in the batch
    counter(x)[:, g].sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert float(x.grad.abs().max()) > 0
    # more of a group -> a higher count: the nets rank one and three red circles
    from flowkit.worlds import shapes as W

    imgs = [W.render(W.sample_scene(W.parse_caption(t), np.random.default_rng(1)), 32)
            for t in ("a red circle", "three red circles")]
    x2 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2) * 2 - 1
    red_circle = W.GROUPS.index(("circle", "red"))
    c = counter(x2)[:, red_circle]
    assert abs(float(c[0]) - 1) < 0.5 and abs(float(c[1]) - 3) < 0.5


def test_inputs_of_other_sizes_are_pooled(classifier):
    x, _ = N.held_out_batch(8, res=64, seed=TEST_SEED)
    x32, _ = N.held_out_batch(8, res=32, seed=TEST_SEED)
    assert N.to_input_size(x).shape == (8, 3, 32, 32)
    # a 64 px render pools to nearly its 32 px render (same scene)
    assert float((N.to_input_size(x) - x32).abs().mean()) < 0.02
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        classifier(torch.zeros(3, 32, 32))


# ----------------------------------------------------------------------------- FSD, KID


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(4000, 3)) * [2.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    from scipy import linalg

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
           - 2 * np.trace(linalg.sqrtm(ca @ cb).real))
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # singular covariances (fewer samples than dimensions) stay finite and >= 0
    assert 0 <= metrics.frechet_distance(rng.normal(size=(5, 64)), rng.normal(size=(7, 64))) < np.inf
    with pytest.raises(ValueError, match="feature dimensions"):
        metrics.frechet_distance(a, b[:, :2])


@pytest.fixture(scope="module")
def feature_sets(classifier):
    n = 400
    renders, _ = N.held_out_batch(n, seed=TEST_SEED)
    fresh, _ = N.held_out_batch(n, seed=TEST_SEED + 1)
    blurred, _ = N.held_out_batch(n, blur=1.0, seed=TEST_SEED + 1)  # the fresh scenes, blurred
    return {k: metrics.features(v, classifier) for k, v in
            (("renders", renders), ("fresh", fresh), ("blurred", blurred))}


def test_fsd_sanity(feature_sets):
    f = feature_sets
    assert f["renders"].shape == (400, 64) and f["renders"].dtype == np.float64
    same_world = metrics.frechet_distance(f["renders"], f["fresh"])
    blurred = metrics.frechet_distance(f["renders"], f["blurred"])
    assert same_world < 0.75 * blurred, (same_world, blurred)  # measured 1.82 and 3.81


def test_kid(feature_sets):
    f = feature_sets
    kw = dict(subset_size=200, n_subsets=20)
    fresh = metrics.kernel_inception_distance(f["renders"], f["fresh"], **kw)
    blurred = metrics.kernel_inception_distance(f["renders"], f["blurred"], **kw)
    assert abs(fresh.mean) < 0.5 * blurred.mean, (fresh, blurred)  # measured 0.025 and 0.124
    assert fresh == metrics.kernel_inception_distance(f["renders"], f["fresh"], **kw)  # seeded
    # Identical sets: with whole-set subsets the estimate is exactly
    # -2 (mean k(x, x) - mean_{i != j} k(x_i, x_j)) / m, about 0 (it vanishes as 1/m).
    x = f["renders"]
    m, d = x.shape
    k = (x @ x.T / d + 1.0) ** 3
    expected = -2 * (np.trace(k) / m - (k.sum() - np.trace(k)) / (m * (m - 1))) / m
    same = metrics.kernel_inception_distance(x, x, subset_size=m, n_subsets=2)
    assert same.mean == pytest.approx(expected, rel=1e-9, abs=1e-12) and same.std < 1e-9
    assert abs(same.mean) < 0.5 * blurred.mean, (same, blurred)


def test_degradation_head_sees_blur_and_noise(classifier):
    settings = ((0, 0), (0.6, 0), (1.0, 0), (0, 0.08))
    x = [N.held_out_batch(100, blur=b, noise=s, seed=TEST_SEED)[0] for b, s in settings]
    blur, noise = zip(*[classifier.degradation(v).mean(dim=0)[:2].tolist() for v in x])  # px, sigma
    assert blur[0] + 0.05 < blur[1] and blur[1] + 0.1 < blur[2], blur  # measured 0.14, 0.25, 0.45
    assert noise[0] < 0.02 and 0.05 < noise[3] < 0.11, noise  # measured 0.003, 0.077


def test_features_accept_every_image_layout(classifier):
    x, _ = N.held_out_batch(3, seed=TEST_SEED)
    ref = metrics.features(x, classifier)
    arr = ((x.permute(0, 2, 3, 1).numpy() + 1) / 2).astype(np.float64)
    assert np.allclose(metrics.features(arr, classifier), ref, atol=1e-5)
    assert np.allclose(metrics.features(list(arr), classifier), ref, atol=1e-5)
    assert np.allclose(metrics.features(list(x), classifier), ref, atol=1e-5)
    assert np.allclose(metrics.features(x, classifier, batch_size=2), ref, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        metrics.features(torch.zeros(2, 32, 32), classifier)


# ----------------------------------------------------------------------------- training targets


class _FixedBatch:
    """A task trained on one fixed batch: every step sees the data of one fixed (seed, step)."""

    def __init__(self, task):
        self.task, self.name = task, task.name

    def build(self):
        return self.task.build()

    def loss(self, model, step, batch_size, rng, gen):
        return self.task.loss(model, 0, batch_size, *step_generators(2024, 0))

    def export(self, model, out_dir):
        return self.task.export(model, out_dir)


def _tiny_shapes():
    from flowkit.train.shapes import ShapesTask

    return ShapesTask(size="tiny", total_steps=20), TrainConfig(steps=20, batch_size=4, lr=1e-3)


TRAIN_TARGETS = {
    "classifier": lambda: (target("classifier")[0], TrainConfig(steps=20, batch_size=8, lr=2e-3)),
    "counter": lambda: (target("counter")[0], TrainConfig(steps=20, batch_size=8, lr=2e-3)),
    "shapes": _tiny_shapes,
}


@pytest.mark.parametrize("name", sorted(TRAIN_TARGETS))
def test_train_target_learns_and_resumes_exactly(name, tmp_path):
    task, cfg = TRAIN_TARGETS[name]()
    cfg = dataclasses.replace(cfg, warmup=1, ckpt_every=10, seed=5)
    fixed = train(_FixedBatch(task), cfg, tmp_path / "fixed", progress=False)
    assert len(fixed) == 20 and fixed[-1] < 0.9 * fixed[0], fixed
    # the per-step data: an uninterrupted run of 11 steps against 10 steps, stop, resume
    cfg = dataclasses.replace(cfg, steps=11)
    full = train(task, cfg, tmp_path / "full", progress=False)
    first = train(task, dataclasses.replace(cfg, steps=10), tmp_path / "resumed", progress=False)
    rest = train(task, cfg, tmp_path / "resumed", progress=False)  # resumes from the step-10 checkpoint
    assert first == full[:10]
    assert rest == [full[10]]  # bit for bit
    if name in KINDS:  # the export loads strictly
        net = LOADERS[name](tmp_path / "full" / "export")
        assert isinstance(net, N.ShapesClassifier if name == "classifier" else N.ShapesCounter)
