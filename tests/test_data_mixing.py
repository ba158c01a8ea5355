"""Mixup / CutMix (pure JAX) against a NumPy reference of timm's batch-mode semantics."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saitjax.data.mixing import cutmix_box, mixup_cutmix, smooth_one_hot

B, H, W, K = 6, 12, 10, 5


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, H, W, 3)).astype(np.float32)
    labels = rng.integers(0, K, B).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(labels)


def _np_targets(labels, lam, smoothing):
    off = smoothing / K
    y = np.full((B, K), off, np.float32)
    y[np.arange(B), labels] = 1 - smoothing + off
    return lam * y + (1 - lam) * y[::-1]


def test_smooth_one_hot():
    y = smooth_one_hot(jnp.array([0, 3]), 4, 0.1)
    np.testing.assert_allclose(y, [[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.025, 0.925]],
                               rtol=1e-6)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(smooth_one_hot(jnp.array([1]), 3), [[0, 1, 0]])
    with pytest.raises(ValueError):
        smooth_one_hot(jnp.array([1]), 3, 1.0)


def test_both_alphas_zero_is_smoothed_one_hot():
    images, labels = _batch()
    out, targets = mixup_cutmix(jax.random.key(0), images, labels, num_classes=K,
                                mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, _np_targets(np.asarray(labels), 1.0, 0.1), rtol=1e-6)
    out, targets = mixup_cutmix(jax.random.key(0), images, labels, num_classes=K, prob=0.0)
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_only_matches_reference(seed):
    images, labels = _batch(seed)
    out, targets, info = mixup_cutmix(jax.random.key(seed), images, labels, num_classes=K,
                                      cutmix_alpha=0.0, label_smoothing=0.1, return_info=True)
    lam = float(info["lam"])
    assert 0.0 < lam < 1.0 and not bool(info["use_cutmix"])
    x = np.asarray(images)
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, _np_targets(np.asarray(labels), lam, 0.1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_only_matches_reference(seed):
    images, labels = _batch(seed)
    out, targets, info = mixup_cutmix(jax.random.key(seed), images, labels, num_classes=K,
                                      mixup_alpha=0.0, label_smoothing=0.0, return_info=True)
    assert bool(info["use_cutmix"])
    y0, y1, x0, x1 = np.asarray(info["box"]).tolist()
    assert 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W
    x = np.asarray(images)
    ref = x.copy()
    ref[:, y0:y1, x0:x1] = x[::-1, y0:y1, x0:x1]
    np.testing.assert_array_equal(out, ref)
    lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)               # corrected by the real box area
    np.testing.assert_allclose(float(info["lam"]), lam, rtol=1e-6)
    np.testing.assert_allclose(targets, _np_targets(np.asarray(labels), lam, 0.0), rtol=1e-5)
    # Pixels actually taken from the partner (where partners differ) = 1 - lam of the image.
    taken = np.all(np.asarray(out)[0] == x[-1], axis=-1).mean()
    np.testing.assert_allclose(taken, 1 - lam, atol=1e-6)


def test_cutmix_box_reference():
    """timm rand_bbox: side floor(S * sqrt(1 - lam)), centred at a random pixel, clipped."""
    for seed in range(20):
        lam = jnp.float32(np.random.default_rng(seed).uniform(0.05, 0.95))
        box, lam_c = cutmix_box(jax.random.key(seed), lam, 32, 24)
        y0, y1, x0, x1 = np.asarray(box).tolist()
        cut_h, cut_w = int(32 * np.sqrt(1 - lam)), int(24 * np.sqrt(1 - lam))
        assert y1 - y0 <= 2 * (cut_h // 2) and x1 - x0 <= 2 * (cut_w // 2)
        if 0 < y0 and y1 < 32:
            assert y1 - y0 == 2 * (cut_h // 2)
        if 0 < x0 and x1 < 24:
            assert x1 - x0 == 2 * (cut_w // 2)
        np.testing.assert_allclose(float(lam_c), 1 - (y1 - y0) * (x1 - x0) / (32 * 24), rtol=1e-6)


def test_switch_and_lambda_statistics():
    images, labels = _batch()
    fn = jax.jit(functools.partial(mixup_cutmix, num_classes=K, return_info=True))
    infos = [fn(jax.random.key(i), images, labels)[2] for i in range(200)]
    cut = np.array([bool(i["use_cutmix"]) for i in infos])
    assert 0.3 < cut.mean() < 0.7                          # switch_prob=0.5
    lam_mix = np.array([float(i["lam"]) for i in infos])[~cut]
    assert 0.4 < lam_mix.mean() < 0.6                      # Beta(0.8, 0.8) is symmetric
    always = jax.jit(functools.partial(mixup_cutmix, num_classes=K, switch_prob=1.0,
                                       return_info=True))
    assert all(bool(always(jax.random.key(i), images, labels)[2]["use_cutmix"])
               for i in range(10))
    never = jax.jit(functools.partial(mixup_cutmix, num_classes=K, prob=0.0, return_info=True))
    out, _, info = never(jax.random.key(1), images, labels)
    assert float(info["lam"]) == 1.0
    np.testing.assert_array_equal(out, images)


def test_jit_matches_eager_and_targets_sum_to_one():
    images, labels = _batch(3)
    fn = functools.partial(mixup_cutmix, num_classes=K, label_smoothing=0.1)
    for i in range(6):
        key = jax.random.key(i)
        e_out, e_t = fn(key, images, labels)
        j_out, j_t = jax.jit(fn)(key, images, labels)
        np.testing.assert_allclose(e_out, j_out, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(e_t, j_t, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(j_t).sum(-1), 1.0, rtol=1e-5)
        assert j_out.shape == images.shape and j_t.shape == (B, K)


def test_mixing_does_not_import_tensorflow():
    code = ("import sys, saitjax.data.mixing, saitjax.data.object_masks, saitjax.data; "
            "from saitjax.data import mixup_cutmix, patch_mask; "
            "assert 'tensorflow' not in sys.modules, 'TF imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
