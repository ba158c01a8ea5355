"""DynamicViT on ConvNeXt and Swin: official slow-path counts, published FLOPs, dense == backbone,
gathered == masked, one compilation per spec, and the two-stream training (batch sizes 1-3 and the
official logits: test_dynamicvit_spatial_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.flops import analytic_gmacs
from saitjax.models.core.spatial_routing import apply_route, route_by_score
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density

from model_fixtures import random_params


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


TEST_MODELS = {"dynamicvit_convnext_test": "convnext_test", "dynamicvit_swin_test_patch4_window4_64": "swin"}
SWIN = "swin_{}_patch4_window7_224"


def _backbone(model):
    """The dense backbone with the same geometry (its parameters are a subset of the model's)."""
    from saitjax.models.convnext import ConvNeXt
    from saitjax.models.swin import SwinTransformer

    cls = ConvNeXt if isinstance(model, ConvNeXt) else SwinTransformer
    fields = {f: getattr(model, f) for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
    return cls(**fields)


def _backbone_params(params):
    drop = lambda tree: {k: drop(v) if isinstance(v, dict) else v for k, v in tree.items()  # noqa: E731
                         if not k.startswith("predictor_") and k != "fast_path"}
    return drop(params)


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            model = saitjax.create_model(name)
            params = random_params(model)
            images = jnp.asarray(np.random.default_rng(3).normal(size=(3, 64, 64, 3)), jnp.float32)
            cache[name] = (model, params, images, jax.jit(model.apply, static_argnames=("train", "sparsity")))
        return cache[name]

    return get


# -- schedule and FLOPs (static, no forward) ------------------------------------------------------

@pytest.mark.parametrize("rho,counts", [(0.7, (137, 97, 58)), (0.9, (176, 137, 98)), (0.8, (156, 117, 78)),
                                        (0.5, (98, 58, 19))])
@pytest.mark.parametrize("name", ["dynamicvit_convnext_tiny", f"dynamicvit_{SWIN.format('small')}"])
def test_slow_path_counts_are_the_official_ones(name, rho, counts):
    # methods-more.md §7.3, run with the official float arithmetic: 0.7 - 0.2 = 0.49999999999999994 -> 97
    model = saitjax.create_model(name)
    spec = model.keep_schedule(rho)
    assert model.routed_locations == 196 and model.slow_counts(spec) == counts
    assert parse_density(spec.describe()) == spec  # the canonical string keeps the float arithmetic


# Published (DynamicViT README, "DynamicCNN and DynamicSwin" table): GFLOPs (= GMACs) at 224 px.
PUBLISHED = [("convnext_tiny", 0.7, 3.6), ("convnext_tiny", 0.9, 3.9), ("convnext_small", 0.7, 5.8),
             ("convnext_small", 0.9, 6.8), ("convnext_base", 0.7, 10.2), ("convnext_base", 0.9, 11.9),
             (SWIN.format("tiny"), 0.7, 4.0), (SWIN.format("small"), 0.7, 6.9), (SWIN.format("base"), 0.7, 12.1)]


@pytest.mark.parametrize("backbone,rho,gflops", PUBLISHED)
def test_analytic_flops_match_the_published_figures(backbone, rho, gflops):
    model = saitjax.create_model(f"dynamicvit_{backbone}")
    sparse = analytic_gmacs(model, model.keep_schedule(rho))
    # Published to one decimal (+-0.05), and the official Swin count adds LayerNorms: within 0.06; measured
    # ConvNeXt-T 0.7 3.579, 0.9 3.908; -S 5.771, 6.759; -B 10.177, 11.934; Swin-T 4.041, -S 6.846, -B 12.063.
    assert sparse == pytest.approx(gflops, abs=0.06)
    assert analytic_gmacs(model, SparsitySpec.dense()) == pytest.approx(
        analytic_gmacs(saitjax.create_model(backbone), SparsitySpec.dense()))


def test_placement_and_bad_specs():
    assert saitjax.create_model("dynamicvit_convnext_small").predictor_locations == (3, 6, 9)
    assert saitjax.create_model(f"dynamicvit_{SWIN.format('base')}").predictor_locations == (2, 4, 6)
    model = saitjax.create_model("dynamicvit_convnext_test")
    with pytest.raises(SparsityError, match=r"predictors before stage-3 blocks \(1, 2, 3\).*keep_schedule"):
        analytic_gmacs(model, SparsitySpec.topk((0.7, 0.5), (1, 2)))
    with pytest.raises(SparsityError, match="rule 'topk'.*sait"):
        model.check_spec(SparsitySpec.adaptive("mass", 0.9, (1,)))
    with pytest.raises(SparsityError, match="use rho > 0.4"):
        model.keep_schedule(0.4)
    with pytest.raises(ValueError, match=r"predictor_locations=\(1, 5\).*\[0, 3\]"):
        saitjax.create_model("dynamicvit_convnext_test", predictor_locations=(1, 5)).check_geometry()


# -- routing primitives ---------------------------------------------------------------------------

def test_gathered_route_equals_masked_route_and_runs_each_path_on_its_own_rows():
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    scores = jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)
    seen = []

    def slow(t):
        seen.append(("slow", t.shape[1]))
        return t * 2.0

    def fast(t):
        seen.append(("fast", t.shape[1]))
        return -t

    gathered = apply_route(u, route_by_score(scores, 4), slow, fast)
    masked = apply_route(u, route_by_score(scores, 4, gather=False), slow, fast)
    assert seen[:2] == [("slow", 4), ("fast", 5)] and seen[2:] == [("slow", 9), ("fast", 9)]
    np.testing.assert_array_equal(gathered, masked)
    top = np.argsort(-np.asarray(scores), axis=1)[:, :4]
    flat = np.asarray(gathered).reshape(2, 9, 4)
    for b in range(2):
        slow_rows = np.zeros(9, bool)
        slow_rows[top[b]] = True
        np.testing.assert_array_equal(flat[b, slow_rows], 2.0 * np.asarray(u).reshape(2, 9, 4)[b, slow_rows])
        np.testing.assert_array_equal(flat[b, ~slow_rows], -np.asarray(u).reshape(2, 9, 4)[b, ~slow_rows])
    all_fast = apply_route(u, route_by_score(scores, 0), slow, fast)  # k = 0 and k = N are legal
    np.testing.assert_array_equal(all_fast, -u)


# -- forwards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TEST_MODELS))
def test_dense_spec_is_bit_identical_to_the_backbone(built, name):
    model, params, images, apply = built(name)
    backbone = _backbone(model)
    expected = jax.jit(lambda p, x: backbone.apply({"params": p}, x)[0])(_backbone_params(params), images)
    got = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=SparsitySpec.dense())[0])(params, images)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("name", list(TEST_MODELS))
def test_gathered_equals_masked_with_static_counts(built, name):
    model, params, images, apply = built(name)
    spec = model.default_sparsity()
    counts = model.slow_counts(spec)
    assert counts == (11, 7, 4)  # 16 stage-3 locations at 0.7 / 0.5 / 0.3
    logits, aux = apply({"params": params}, images, sparsity=spec)
    masked, aux_m = apply({"params": params}, images, sparsity=spec.with_mode("mask"))
    np.testing.assert_allclose(logits, masked, atol=1e-5)
    assert [tuple(np.asarray(m).sum(-1)) for m in aux["keep_masks"]] == [(c,) * 3 for c in counts]
    for m, m2, idx, c in zip(aux["keep_masks"], aux_m["keep_masks"], aux["slow_indices"], counts):
        np.testing.assert_array_equal(m, m2)
        assert idx.shape == (3, c) and bool(jnp.all(jnp.take_along_axis(m, idx, 1) == 1))
    assert not np.allclose(logits, apply({"params": params}, images, sparsity=SparsitySpec.dense())[0], atol=1e-4)
    # batch 1 (and 2, where the official Swin model fails): test_dynamicvit_spatial_parity.py
    with CompilationCounter() as compiled:
        apply({"params": params}, images * 2.0, sparsity=spec)
        apply({"params": params}, images - 1.0, sparsity=spec)
    assert compiled.of(apply) == 0  # new values, same spec and shape: no new compilation


@pytest.mark.parametrize("name", [pytest.param("dynamicvit_convnext_test", marks=pytest.mark.extended),
                                  "dynamicvit_swin_test_patch4_window4_64"])
def test_training_samples_two_streams_and_trains_the_predictors(built, name):
    model, params, images, apply = built(name)
    spec = model.default_sparsity().with_mode("mask")
    with pytest.raises(ValueError, match="needs the 'gumbel' rng"):
        apply({"params": params}, images, train=True, sparsity=spec, rngs={"dropout": jax.random.key(0)})

    def loss(p, key):
        logits, aux = model.apply({"params": p}, images, train=True, sparsity=spec,
                                  rngs={"gumbel": key, "dropout": key})
        return jnp.sum(logits ** 2) + sum(jnp.sum(d) for d in aux["decisions"]), aux

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, jax.random.key(1))
    assert [d.shape for d in aux["decisions"]] == [(3, 16)] * 3
    for d in aux["decisions"]:
        assert set(np.unique(np.asarray(d))) <= {0.0, 1.0}  # hard values, straight-through gradients
    for s in range(3):
        assert float(jnp.abs(grads[f"predictor_{s}"]["out_fc3"]["kernel"]).sum()) > 0
    fast = [k for k in jax.tree_util.tree_flatten_with_path(grads)[0] if "fast_path" in jax.tree_util.keystr(k[0])]
    assert fast and any(float(jnp.abs(g).sum()) > 0 for _, g in fast)


@pytest.mark.parametrize("name", list(TEST_MODELS))
def test_two_streams_with_every_location_slow_reduce_to_the_dense_forward(built, name):
    """A predictor that always says "slow" makes the slow stream the whole map: the training
    forward (no drop path) must then be the dense one -- the two-stream algebra, checked."""
    model, params, images, apply = built(name)
    always = jax.tree_util.tree_map(lambda v: v, params)
    for s in range(3):
        bias = always[f"predictor_{s}"]["out_fc3"]["bias"]
        always[f"predictor_{s}"]["out_fc3"]["bias"] = bias + jnp.array([1e4, -1e4])
    got, aux = apply({"params": always}, images, train=True, sparsity=model.default_sparsity().with_mode("mask"),
                     rngs={"gumbel": jax.random.key(0), "dropout": jax.random.key(0)})
    assert all(bool(jnp.all(d == 1)) for d in aux["decisions"])
    dense = apply({"params": always}, images, sparsity=SparsitySpec.dense())[0]
    np.testing.assert_allclose(got, dense, atol=1e-5)
