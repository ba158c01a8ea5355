"""Token operations against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops as ops

RNG = np.random.default_rng(0)


def test_topk_and_gather_match_numpy():
    scores = RNG.normal(size=(3, 20)).astype(np.float32)
    x = RNG.normal(size=(3, 20, 5)).astype(np.float32)
    idx = np.asarray(ops.topk_indices(jnp.asarray(scores), 7))
    np.testing.assert_array_equal(idx, np.argsort(-scores, axis=1)[:, :7])
    gathered = np.asarray(ops.batched_gather(jnp.asarray(x), jnp.asarray(idx)))
    np.testing.assert_array_equal(gathered, np.stack([x[b, idx[b]] for b in range(3)]))
    with pytest.raises(ValueError, match="must lie in"):
        ops.topk_indices(jnp.asarray(scores), 21)
    with pytest.raises(TypeError, match="Python int"):
        ops.topk_indices(jnp.asarray(scores), jnp.int32(3))


def test_select_tokens_keeps_prefix_and_scatter_inverts_gather():
    x = RNG.normal(size=(2, 2 + 10, 4)).astype(np.float32)
    idx = np.array([[9, 0, 4], [1, 2, 3]])
    out = np.asarray(ops.select_tokens(jnp.asarray(x), jnp.asarray(idx), num_prefix=2))
    np.testing.assert_array_equal(out[:, :2], x[:, :2])
    np.testing.assert_array_equal(out[0, 2:], x[0, 2 + idx[0]])
    grid = np.asarray(ops.scatter_to_grid(jnp.asarray(out[:, 2:]), jnp.asarray(idx), 10, fill=-1.0))
    ref = np.full((2, 10, 4), -1.0, np.float32)
    for b in range(2):
        ref[b, idx[b]] = x[b, 2 + idx[b]]
    np.testing.assert_array_equal(grid, ref)
    mask = np.asarray(ops.indices_to_mask(jnp.asarray(idx), 10, valid=jnp.array([[1, 1, 0], [1, 0, 0]])))
    assert mask.sum(1).tolist() == [2.0, 1.0] and mask[0, 9] == 1 and mask[0, 4] == 0


def _np_masked_softmax(logits, keep):
    n = logits.shape[-1]
    g = keep[:, None, :] + (1 - keep[:, None, :]) * np.eye(n)[None]
    e = np.exp(logits - logits.max(-1, keepdims=True)) * g[:, None]
    return e / e.sum(-1, keepdims=True)


def test_masked_softmax_matches_reference_and_equals_restricted_softmax():
    logits = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32) * 3
    keep = np.array([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], np.float32)
    out = np.asarray(ops.masked_softmax(jnp.asarray(logits), jnp.asarray(keep)))
    np.testing.assert_allclose(out, _np_masked_softmax(logits, keep), atol=1e-6)
    # a kept query's row equals the plain softmax over the kept keys only
    kept = np.flatnonzero(keep[0])
    sub = logits[0][:, kept][:, :, kept]
    ref = np.exp(sub - sub.max(-1, keepdims=True))
    np.testing.assert_allclose(out[0][:, kept][:, :, kept], ref / ref.sum(-1, keepdims=True), atol=1e-6)
    # a pruned query sees the kept keys and itself, never another pruned key; no row is empty
    assert np.all(out[1, :, 3, [2, 4, 5]] == 0) and np.all(out[1, :, 3, [0, 1, 3]] > 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-6)


def test_masked_softmax_survives_huge_masked_logits_and_passes_gradient_to_keep():
    logits = jnp.zeros((1, 1, 3, 3)).at[..., 2].set(1e4)  # key 2 dominates but is pruned
    keep = jnp.array([[1.0, 1.0, 0.0]])
    out = ops.masked_softmax(logits, keep)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out[0, 0, 0], [0.5, 0.5, 0.0], atol=1e-6)
    grad = jax.grad(lambda k: ops.masked_softmax(jnp.ones((1, 1, 3, 3)), k)[0, 0, 0, 1])(keep)
    assert float(jnp.abs(grad).sum()) > 0  # the keep mask is differentiable (straight-through use)


def test_straight_through_estimators():
    logits = jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8]]))
    hard = ops.gumbel_softmax_hard(jax.random.key(0), logits)
    np.testing.assert_array_equal(np.asarray(hard).sum(-1), [1.0, 1.0])
    assert set(np.unique(np.asarray(hard))) <= {0.0, 1.0}
    g = jax.grad(lambda l: ops.gumbel_softmax_hard(jax.random.key(0), l)[:, 0].sum())(logits)
    assert float(jnp.abs(g).sum()) > 0
    scores = jnp.array([0.1, 0.3, 0.5])
    out = ops.sigmoid_threshold_hard(scores, 0.3 + 1e-6, tau=1e-2)
    np.testing.assert_array_equal(np.asarray(out), [0.0, 0.0, 1.0])
    gt = jax.grad(lambda t: ops.sigmoid_threshold_hard(scores, t, tau=0.1).sum())(0.3)
    assert float(gt) < 0  # raising the threshold lowers the kept count


def _np_mass_counts(scores, mass):
    p = scores / scores.sum(-1, keepdims=True)
    out = []
    for row in p:
        s = np.sort(row)[::-1]
        out.append(int(np.searchsorted(np.cumsum(s), mass - 1e-7) + 1))
    return np.array(out)


def test_adaptive_counts_match_numpy():
    scores = RNG.random(size=(5, 30)).astype(np.float32) ** 4
    for mass in (0.3, 0.6, 0.9):
        np.testing.assert_array_equal(np.asarray(ops.mass_keep_counts(jnp.asarray(scores), mass)),
                                      _np_mass_counts(scores, mass))
    assert np.asarray(ops.mass_keep_counts(jnp.asarray(scores), 1.0)).tolist() == [30] * 5
    p = scores / scores.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(ops.value_keep_counts(jnp.asarray(scores), 1.5)),
                                  (p >= 1.5 / 30).sum(-1))


def test_capacity_select_and_bucket_choice():
    scores = RNG.normal(size=(3, 12)).astype(np.float32)
    counts = jnp.array([2, 5, 4])
    idx, valid = ops.capacity_select(jnp.asarray(scores), counts, 6)
    np.testing.assert_array_equal(np.asarray(idx), np.argsort(-scores, 1)[:, :6])
    np.testing.assert_array_equal(np.asarray(valid).sum(1), [2, 5, 4])
    caps = (4, 8, 12)
    assert int(ops.choose_bucket(counts, caps)) == 1       # max count 5 -> capacity 8
    assert int(ops.choose_bucket(jnp.array([4, 1]), caps)) == 0
    assert int(ops.choose_bucket(jnp.array([13]), caps)) == 2  # beyond the last -> last bucket
    assert int(jax.jit(ops.choose_bucket, static_argnums=1)(jnp.array([9]), caps)) == 2


def test_evit_fusion_matches_numpy():
    x = RNG.normal(size=(2, 8, 3)).astype(np.float32)
    a = RNG.random(size=(2, 8)).astype(np.float32)
    keep = np.array([[0, 3, 5], [7, 6, 1]])
    fused = np.asarray(ops.fuse_inattentive(jnp.asarray(x), jnp.asarray(a), jnp.asarray(keep)))
    for b in range(2):
        dropped = np.setdiff1d(np.arange(8), keep[b])
        np.testing.assert_allclose(fused[b, 0], (a[b, dropped, None] * x[b, dropped]).sum(0), atol=1e-5)
