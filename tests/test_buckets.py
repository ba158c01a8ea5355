"""The shared capacity-bucket runner: sorted micro-batches, per-image capacities, compilations."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.flops import per_image_gmacs
from saitjax.models.core.buckets import effective_chunks
from saitjax.sparsity import SparsityError, parse_density


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


BUCKETS = (0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def setup():
    model = saitjax.create_model("sait_test_patch4_32")
    # inputs of very different contrast -> very different per-image counts
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)) * jnp.linspace(0.3, 5.0, 8)[:, None, None, None]
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 20.0 if "qkv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
        else v, model.init(jax.random.key(0), images[:1])["params"])
    return model, params, images


def test_effective_chunks_divide_the_batch():
    assert effective_chunks(32, 4) == 4 and effective_chunks(6, 4) == 3 and effective_chunks(1, 8) == 1
    assert effective_chunks(7, 4) == 1 and effective_chunks(8, 16) == 8


@pytest.mark.parametrize("chunks", [1, pytest.param(2, marks=pytest.mark.extended), 4])  # 2: ~10 s, between 1 and 4
def test_micro_batches_give_the_logits_of_each_image_alone(setup, chunks):
    model, params, images = setup
    spec = parse_density(f"mass:0.85@1/2,chunks={chunks}", buckets=BUCKETS)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))
    with CompilationCounter() as compiled:
        logits, aux = fn(params, images)
        alone = np.concatenate([np.asarray(fn(params, images[i:i + 1])[0]) for i in range(len(images))])
    np.testing.assert_allclose(np.asarray(logits), alone, atol=2e-5)
    masked, _ = model.apply({"params": params}, images, sparsity=spec.with_mode("mask"))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(masked), atol=2e-5)
    assert compiled.of(fn) == 2  # batch 8 and batch 1: one compilation each, all buckets inside


def test_sorted_chunks_run_each_image_in_its_chunk_bucket(setup):
    model, params, images = setup
    capacities = parse_density("mass:0.85@1", buckets=BUCKETS).bucket_capacities(model.num_patches)
    one = parse_density("mass:0.85@1", buckets=BUCKETS)
    four = one.with_chunks(4)
    _, aux1 = model.apply({"params": params}, images, sparsity=one)
    _, aux4 = model.apply({"params": params}, images, sparsity=four)
    counts = np.asarray(aux4["kept_counts"][0])
    np.testing.assert_array_equal(counts, np.asarray(aux1["kept_counts"][0]))
    assert len(set(counts.tolist())) >= 3, f"inputs should spread the counts, got {counts}"
    # one chunk: every image pays for the largest; sorted chunks of two: each pair its own maximum
    fits = lambda n: min(c for c in capacities if c >= n)  # noqa: E731
    assert set(np.asarray(aux1["capacity"]).tolist()) == {fits(counts.max())}
    order = np.argsort(counts, kind="stable")
    expected = np.empty(8, int)
    for part in np.split(order, 4):
        expected[part] = fits(counts[part].max())
    np.testing.assert_array_equal(np.asarray(aux4["capacity"]), expected)
    # executed cost: between the per-image ideal and the batch-max bucket
    ideal = per_image_gmacs(model, four, aux4["kept_counts"])
    ran4 = per_image_gmacs(model, four, [aux4["capacity"]])
    ran1 = per_image_gmacs(model, one, [aux1["capacity"]])
    assert np.all(ideal <= ran4 + 1e-12) and float(ran4.mean()) < float(ran1.mean())


def test_chunks_only_for_adaptive_rules():
    with pytest.raises(SparsityError, match="chunks"):
        parse_density("topk:0.5@1,chunks=4")
    with pytest.raises(SparsityError, match="unknown option"):
        parse_density("mass:0.8@1,chunk=4")
    assert parse_density("mass:0.8@1,chunks=4").describe() == "mass:0.8@1,chunks=4"
