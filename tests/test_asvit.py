"""AS-ViT model: learned thresholds, per-image counts through buckets, the batch rules, compilations.

Shared invariants (dense == DeiT, masked == gathered, one compilation per spec) run in
test_model_invariants.py; parity with the official forward in test_peer_parity.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.models.asvit import threshold_params
from saitjax.optim import DEFAULT_NO_WEIGHT_DECAY
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


BUCKETS = (0.25, 0.5, 0.75, 1.0)


def _peaky(params, scale=6.0):
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v * scale if "qkv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
        else v, params)


def run(model, params, images, spec=None):
    """``model.apply`` jitted (much faster than eager for these small models)."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))(params, images)


@pytest.fixture(scope="module")
def setup():
    # thresholds around the uniform score 1/64, so that every stage keeps some tokens and drops some
    model = saitjax.create_model("asvit_test_patch4_32", threshold_init=(0.012, 0.016, 0.02), buckets=BUCKETS)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * jnp.array([0.5, 1.0, 1.5, 2.0])[:, None, None, None]
    params = _peaky(jax.jit(model.init)(jax.random.key(0), images[:1])["params"])
    return model, params, images


def test_thresholds_are_0d_parameters_without_weight_decay(setup):
    model, params, _ = setup
    thresholds = threshold_params(params)
    assert sorted(thresholds) == ["score_predictor_0", "score_predictor_1", "score_predictor_2"]
    assert all(np.shape(t) == () for t in thresholds.values())
    np.testing.assert_allclose([float(thresholds[f"score_predictor_{s}"]) for s in range(3)], (0.012, 0.016, 0.02))
    assert any(re.search(r, "score_predictor_1/keep_threshold") for r in DEFAULT_NO_WEIGHT_DECAY)
    # the backbone is DeiT's: dense checkpoints load, the thresholds are the only new weights
    dense = saitjax.create_model("vit_test_patch4_32")
    dense_shapes = jax.eval_shape(dense.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert set(params) - set(dense_shapes) == set(thresholds)


def test_batch_one_keeps_exactly_the_tokens_above_the_threshold(setup):
    model, params, images = setup
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    thresholds = [float(t) for t in threshold_params(params).values()]
    pruned_somewhere = False
    for b in range(len(images)):
        _, aux = fn(params, images[b:b + 1])
        prev = np.ones(model.num_patches, bool)
        for s, theta in enumerate(thresholds):
            scores = np.asarray(aux["token_scores"][s][0])
            kept = np.asarray(aux["keep_masks"][s][0]) > 0
            np.testing.assert_array_equal(kept, (scores > theta) & prev)
            assert int(aux["kept_counts"][s][0]) == kept.sum()
            pruned_somewhere |= 0 < kept.sum() < prev.sum()
            prev = kept
    assert pruned_somewhere, "the thresholds should prune some tokens of these images"


@pytest.mark.parametrize("chunks", [1, pytest.param(2, marks=pytest.mark.extended), 4])  # 2: ~10 s, between 1 and 4
def test_an_image_gives_the_same_logits_alone_and_in_any_batch(setup, chunks):
    model, params, images = setup
    spec = model.default_sparsity().with_chunks(chunks)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))
    logits, aux = fn(params, images)
    alone = [fn(params, images[i:i + 1]) for i in range(len(images))]
    np.testing.assert_allclose(np.asarray(logits), np.concatenate([np.asarray(a[0]) for a in alone]), atol=2e-5)
    counts = np.asarray(aux["kept_counts"][0])
    np.testing.assert_array_equal(counts, [int(a[1]["kept_counts"][0][0]) for a in alone])
    assert len(set(counts.tolist())) > 1, f"the images should keep different counts, got {counts}"


def test_mean_batch_rule_gives_every_image_the_floor_of_the_mean(setup):
    model, params, images = setup
    per_image = np.asarray(run(model, params, images)[1]["kept_counts"][0])
    mean_model = model.clone(batch_rule="mean")
    logits, aux = jax.jit(lambda p, x: mean_model.apply({"params": p}, x))(params, images)
    counts = np.asarray(aux["kept_counts"][0])
    np.testing.assert_array_equal(counts, np.full(len(images), per_image.sum() // len(images)))
    # each image keeps its own best tokens
    scores = np.asarray(aux["token_scores"][0])
    for b in range(len(images)):
        kept = np.flatnonzero(np.asarray(aux["keep_masks"][0][b]))
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-scores[b], kind="stable")[:counts[b]]))
    masked, _ = run(mean_model, params, images, mean_model.default_sparsity().with_mode("mask"))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(masked), atol=1e-5)
    # at batch 1 the mean rule is the per-image rule
    one = run(mean_model, params, images[:1])[0]
    np.testing.assert_allclose(np.asarray(one), np.asarray(run(model, params, images[:1])[0]), atol=1e-6)
    with pytest.raises(SparsityError, match="chunks do not apply"):
        mean_model.apply({"params": params}, images, sparsity=mean_model.default_sparsity().with_chunks(2))


def test_one_compilation_per_density_across_bucket_changes(setup):
    model, params, _ = setup
    spec = SparsitySpec.learned(1.2, (1, 2, 3), BUCKETS)
    capacities = spec.bucket_capacities(model.num_patches)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))
    seen = set()
    with CompilationCounter() as compiled:
        for i in range(8):  # flat images score every patch alike (all kept); texture spreads the scores
            x = 0.5 + jax.random.normal(jax.random.key(20 + i), (1, 32, 32, 3)) * (0.02 * 2 ** i)
            _, aux = fn(params, x)
            cap = int(aux["capacity"][0])
            assert cap == min(c for c in capacities if c >= int(aux["kept_counts"][0][0]))
            seen.add(cap)
    assert len(seen) >= 2, f"test inputs should exercise several buckets, saw {seen}"
    assert compiled.of(fn) == 1


def test_scaling_the_thresholds_trades_tokens_for_speed(setup):
    model, params, images = setup
    kept = []
    for scale in (0.5, 1.0, 2.0):
        spec = parse_density(f"learned:{scale}@1/2/3", buckets=BUCKETS)
        assert spec == SparsitySpec.learned(scale, (1, 2, 3), BUCKETS) and parse_density(spec.describe(), buckets=BUCKETS) == spec
        _, aux = run(model, params, images, spec)
        kept.append(int(np.asarray(aux["kept_counts"][0]).sum()))
    assert kept[0] > kept[1] > kept[2]


def test_no_token_above_the_threshold_keeps_the_prefix_only(setup):
    model, params, images = setup
    spec = SparsitySpec.learned(100.0, (1, 2, 3), BUCKETS)
    logits, aux = run(model, params, images, spec)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(np.asarray(aux["kept_counts"][0]), 0)
    masked, _ = run(model, params, images, spec.with_mode("mask"))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(masked), atol=1e-5)


def test_specs_it_cannot_run_are_refused_with_the_fix(setup):
    model, params, images = setup
    with pytest.raises(SparsityError, match=r"'learned:1.0@1/2/3'\) or fixed counts"):
        model.apply({"params": params}, images, sparsity=parse_density("mass:0.7@1"))
    fixed, aux = run(model, params, images, SparsitySpec.topk((0.5, 0.25, 0.125), (1, 2, 3)))
    assert aux["tokens"].shape[1] == 1 + 8  # fixed counts on the same scores: a baseline
    with pytest.raises(SparsityError, match="thresholds before blocks"):
        model.apply({"params": params}, images, sparsity=SparsitySpec.learned(1.0, (1, 2)))
    sait = saitjax.create_model("sait_test_patch4_32")
    with pytest.raises(SparsityError, match=r"asvit_\* family"):
        sait.apply({"params": params}, images, sparsity=SparsitySpec.learned(1.0, (1, 2, 3)))
    with pytest.raises(SparsityError, match="must be positive"):
        SparsitySpec.learned(0.0)
