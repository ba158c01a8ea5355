"""SaiT model: dense equality, masked == gathered, per-image counts, capacity buckets, compilations."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.models.core import token_ops
from saitjax.models.sait import adaptive_counts
from saitjax.sparsity import SparsitySpec, parse_density


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


def _peaky(params, scale=8.0):
    """Sharpen attention so that CLS attention, and hence the per-image counts, vary a lot."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v * scale if "qkv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
        else v, params)


@pytest.fixture(scope="module")
def setup():
    model = saitjax.create_model("sait_test_patch4_32")
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    params = _peaky(model.init(jax.random.key(0), images)["params"])
    return model, params, images


def test_no_new_parameters_dense_checkpoints_load():
    dense = saitjax.create_model("vit_test_patch4_32")
    sait = saitjax.create_model("sait_test_patch4_32")
    x = jnp.zeros((1, 32, 32, 3))
    shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x)["params"])  # noqa: E731
    assert shapes(dense) == shapes(sait)


@pytest.mark.parametrize("spec", [SparsitySpec.dense(), parse_density("mass:1.0@1")])
def test_density_one_is_bit_identical_to_dense(setup, spec):
    model, params, images = setup
    dense = saitjax.create_model("vit_test_patch4_32")
    expected = jax.jit(lambda p, x: dense.apply({"params": p}, x)[0])(params, images)
    got = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec)[0])(params, images)
    assert spec.is_dense
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("text", ["mass:0.7@1", "mass:0.5@1/2", "value:1.0@1/3", "mass:0.6[0.2-0.8]@2",
                                  "topk:0.5@1"])
def test_masked_forward_equals_gathered_forward(setup, text):
    model, params, images = setup
    spec = parse_density(text, buckets=(0.25, 0.5, 0.75, 1.0))
    gathered, g_aux = model.apply({"params": params}, images, sparsity=spec)
    masked, m_aux = model.apply({"params": params}, images, sparsity=spec.with_mode("mask"))
    np.testing.assert_allclose(gathered, masked, atol=1e-5)
    for g, m in zip(g_aux["keep_masks"], m_aux["keep_masks"]):
        np.testing.assert_array_equal(g, m)
    for g, m in zip(g_aux["kept_counts"], m_aux["kept_counts"]):
        np.testing.assert_array_equal(g, m)
        assert np.all(np.asarray(g) >= 1)
    # the counts are the per-image number of kept patches on the grid
    for counts, mask in zip(g_aux["kept_counts"], g_aux["keep_masks"]):
        np.testing.assert_array_equal(counts, np.asarray(mask).sum(-1))


def test_adaptive_counts_follow_the_rules():
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.full(20, 0.3), size=5).astype(np.float32)
    alive = np.ones_like(scores)
    for m in (0.5, 0.8, 0.95):
        spec = parse_density(f"mass:{m}@1")
        got = np.asarray(adaptive_counts(jnp.asarray(scores), jnp.asarray(alive), spec, (1, 20)))
        for b in range(5):
            csum = np.cumsum(np.sort(scores[b])[::-1])
            assert got[b] == np.argmax(csum >= m - 1e-6) + 1
    value = parse_density("value:1.5@1")
    got = np.asarray(adaptive_counts(jnp.asarray(scores), jnp.asarray(alive), value, (1, 20)))
    np.testing.assert_array_equal(got, (scores >= 1.5 / 20).sum(-1))
    # the clamp [K_min, K_max], and never more than the alive tokens
    clamped = np.asarray(adaptive_counts(jnp.asarray(scores), jnp.asarray(alive),
                                         parse_density("mass:0.99@1"), (3, 6)))
    assert clamped.max() <= 6 and clamped.min() >= 3
    half_alive = alive.copy()
    half_alive[:, 10:] = 0
    capped = np.asarray(adaptive_counts(jnp.asarray(scores * half_alive), jnp.asarray(half_alive),
                                        parse_density("mass:0.999@1"), (1, 20)))
    assert capped.max() <= 10


def test_min_max_keep_clamp_in_the_model(setup):
    model, params, images = setup
    spec = parse_density("mass:0.3[0.25-0.5]@1")
    lo, hi = spec.count_bounds(model.num_patches)
    _, aux = model.apply({"params": params}, images, sparsity=spec)
    counts = np.asarray(aux["kept_counts"][0])
    assert counts.min() >= lo == 16 and counts.max() <= hi == 32


def test_one_compilation_per_spec_whatever_the_batch():
    model = saitjax.create_model("sait_test_patch4_32")
    params = _peaky(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], 20.0)
    spec = parse_density("mass:0.85@1", buckets=(0.25, 0.5, 0.75, 1.0))
    capacities = spec.bucket_capacities(model.num_patches)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))
    seen = set()
    with CompilationCounter() as compiled:
        for i in range(8):
            x = jax.random.normal(jax.random.key(10 + i), (1, 32, 32, 3)) * (0.3 + i)
            _, aux = fn(params, x)
            counts = np.asarray(aux["kept_counts"][0])
            cap = int(aux["capacity"][0])
            seen.add(cap)
            # the batch ran in the smallest bucket that holds its largest image
            assert cap == min(c for c in capacities if c >= counts.max())
            assert aux["tokens"].shape == (1, 1 + model.num_patches, model.embed_dim)
    assert len(seen) >= 2, f"test inputs should exercise several buckets, saw {seen}"
    assert compiled.of(fn) == 1 <= len(capacities)


def test_distilled_prefix_and_importance_weighting():
    model = saitjax.create_model("sait_test_distilled_patch4_32", head_weighting="importance")
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    params = _peaky(model.init(jax.random.key(0), x)["params"])
    spec = parse_density("mass:0.7@2")
    gathered, aux = model.apply({"params": params}, x, sparsity=spec)
    masked, _ = model.apply({"params": params}, x, sparsity=spec.with_mode("mask"))
    np.testing.assert_allclose(gathered, masked, atol=1e-5)
    assert aux["tokens"].shape[1] == 2 + model.num_patches
    np.testing.assert_allclose(np.asarray(aux["token_scores"][0]).sum(-1), 1.0, rtol=1e-5)


def test_head_importance_matches_numpy():
    heads = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
    norms = np.linalg.norm(heads, axis=-1)
    np.testing.assert_allclose(token_ops.head_importance(jnp.asarray(heads)),
                               norms / (norms.sum(1, keepdims=True) + 1e-8), rtol=1e-5)


def test_adaptive_rules_registered_for_every_size():
    names = saitjax.list_models("sait_deit_*")
    assert {"sait_deit_tiny_patch16_224", "sait_deit_small_patch16_224", "sait_deit_base_patch16_224"} <= set(names)
    assert saitjax.model_entry("sait_deit_small_patch16_224").timm_name == "deit_small_patch16_224"
