"""Dense backbone: parameter counts, outputs, bad input, and pruning invariants."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.sparsity import SparsityError, SparsitySpec


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


# Verified once against timm 1.0 (`sum(p.numel() for p in timm.create_model(name).parameters())`).
PARAM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
}


def _init_shapes(model):
    images = jnp.zeros((1, model.img_size, model.img_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts_match_timm(name):
    params = _init_shapes(saitjax.create_model(name))
    assert sum(x.size for x in jax.tree.leaves(params)) == PARAM_COUNTS[name]


def test_param_names_are_stable():
    params = _init_shapes(saitjax.create_model("deit_small_patch16_224"))
    assert set(params) >= {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_11", "norm", "head"}
    assert params["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, 384)
    assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (384, 1152)
    assert params["pos_embed"].shape == (1, 197, 384)


@pytest.fixture(scope="module")
def tiny():
    model = saitjax.create_model("vit_test_patch4_32")
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    return model, params, images


def test_forward_outputs(tiny):
    model, params, images = tiny
    logits, aux = model.apply({"params": params}, images)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert aux["tokens"].shape == (3, 65, 32) and aux["cls_attn"].shape == (3, 2, 65)
    assert aux["keep_masks"] == () and aux["keep_indices"] == ()
    np.testing.assert_allclose(aux["cls_attn"].sum(-1), 1.0, atol=1e-5)


def test_distilled_averages_both_heads():
    model = saitjax.create_model("vit_test_distilled_patch4_32")
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    logits, aux = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)))
    np.testing.assert_allclose(logits, (aux["logits_cls"] + aux["logits_dist"]) / 2, rtol=1e-6)
    logits_s, aux_s = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)),
                                  sparsity=SparsitySpec.topk((0.5,), (2,)))
    assert aux_s["tokens"].shape == (2, 2 + 32, 32)  # both prefix tokens survive pruning


def test_dense_spec_is_bit_identical(tiny):
    model, params, images = tiny
    a, _ = model.apply({"params": params}, images)
    for spec in (SparsitySpec.dense(), SparsitySpec.topk((1.0, 1.0), (1, 2))):
        b, _ = model.apply({"params": params}, images, sparsity=spec)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["vit_test_patch4_32", "vit_test_distilled_patch4_32"])
def test_masked_forward_equals_gathered_forward(name):
    model = saitjax.create_model(name)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    spec = SparsitySpec.topk((0.6, 0.3, 0.15), (1, 2, 3))
    apply = jax.jit(lambda p, x, s: model.apply({"params": p}, x, sparsity=s), static_argnums=2)  # eager: ~4x slower
    gathered, g_aux = apply(params, images, spec)
    masked, m_aux = apply(params, images, spec.with_mode("mask"))
    np.testing.assert_allclose(gathered, masked, atol=1e-5, rtol=0)
    for g, m, k in zip(g_aux["keep_masks"], m_aux["keep_masks"], spec.keep_counts(64)):
        np.testing.assert_array_equal(g, m)
        np.testing.assert_array_equal(np.asarray(g).sum(-1), k)
    # kept sets are nested: a pruned token stays pruned
    masks = [np.asarray(m) for m in g_aux["keep_masks"]]
    assert all(np.all(later <= earlier) for earlier, later in zip(masks, masks[1:]))


def test_token_schedule_and_gathered_lengths(tiny):
    model, params, images = tiny
    spec = SparsitySpec.topk((0.5, 0.25), (1, 3))
    assert model.token_schedule(spec) == (65, 33, 33, 17)
    _, aux = model.apply({"params": params}, images, sparsity=spec)
    assert [i.shape for i in aux["keep_indices"]] == [(3, 32), (3, 16)]
    assert aux["tokens"].shape == (3, 17, 32)


def test_one_compilation_per_spec(tiny):
    model, params, _ = tiny
    traces = []

    def forward(p, x, spec):
        traces.append(spec)
        return model.apply({"params": p}, x, sparsity=spec)[0]

    fn = jax.jit(forward, static_argnums=2)
    specs = [SparsitySpec.dense(), SparsitySpec.hierarchical(0.5, (1, 2, 3))]
    for step in range(4):
        x = jax.random.normal(jax.random.key(step), (2, 32, 32, 3))
        for spec in specs:
            fn(params, x, spec)
    fn(params, x, SparsitySpec.hierarchical(0.5, (1, 2, 3)))  # equal spec, new object: cache hit
    assert len(traces) == len(specs)


def test_dropout_and_drop_path_need_rng_and_change_outputs():
    model = saitjax.create_model("vit_test_patch4_32", drop_rate=0.1, drop_path_rate=0.2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    x = jnp.ones((2, 32, 32, 3))
    a, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    b, _ = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply({"params": params}, x)[0], model.apply({"params": params}, x)[0])


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 32, 32), "channels-first"),
    ((2, 28, 28, 3), "Resize/crop them to 32 px"),
    ((2, 32, 32, 1), "expects 3 channels"),
    ((32, 32, 3), "expected images of shape"),
])
def test_bad_images_name_the_problem(tiny, shape, message):
    model, params, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, jnp.zeros(shape))


def test_bad_sparsity_for_model(tiny):
    model, params, images = tiny
    with pytest.raises(SparsityError, match="do not fit a 4-block model"):
        model.apply({"params": params}, images, sparsity=SparsitySpec.hierarchical(0.7))
    with pytest.raises(SparsityError, match=r"sait_\* family"):
        model.apply({"params": params}, images, sparsity=SparsitySpec.adaptive("mass", 0.9, (2,)))
