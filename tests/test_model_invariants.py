"""Invariants every registered test-size model keeps, whatever its reduction method.

One parametrized test per invariant over ``list_models(tag="test")``, so a new method is checked
by registering its test size:

* the dense setting is bit-identical to the plain DeiT with the same backbone weights;
* every original patch lives in exactly one token or is discarded: the sizes of the tokens
  still alive add up to the patches whose ``source`` is not ``-1``;
* masked == gathered, where a method has both paths;
* one compilation per spec, whatever the inputs;
* the fused attention kernel gives the explicit kernel's logits, CLS attention and kept tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.sparsity import SparsitySpec, parse_density


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


TEST_MODELS = saitjax.list_models(tag="test")

# A reducing spec per method family (the test models have 4 blocks and 64 patches).
REDUCING = {"sait": "mass:0.7@1/2", "asvit": None, "dynamicvit": None, "evit": None, "tome": None,
            "stvit": None, "": "topk:0.5@1/2"}
HAS_MASK_MODE = ("sait", "asvit", "dynamicvit", "")


def _family(name: str) -> str:
    tags = saitjax.model_entry(name).tags
    return next((t for t in ("sait", "asvit", "dynamicvit", "evit", "tome", "stvit") if t in tags), "")


def _reducing_spec(model, name: str) -> SparsitySpec:
    text = REDUCING[_family(name)]
    return model.default_sparsity() if text is None else parse_density(text, buckets=(0.25, 0.5, 1.0))


def _sharpen(params):
    """Peaky attention, so that scores (and per-image counts) differ clearly between tokens."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v * 8.0 if "qkv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
        else v, params)


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            model = saitjax.create_model(name)
            images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * jnp.array([0.5, 1.0, 1.5, 2.0])[:, None, None, None]
            params = _sharpen(jax.jit(model.init)(jax.random.key(0), images[:1])["params"])
            cache[name] = (model, params, images)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TEST_MODELS)
def test_dense_setting_is_bit_identical_to_plain_deit(built, name):
    model, params, images = built(name)
    dense = saitjax.create_model("vit_test_distilled_patch4_32" if model.distilled else "vit_test_patch4_32")
    backbone = {k: v for k, v in params.items() if not k.startswith(("predictor", "score_predictor", "semantic_init"))}
    expected = jax.jit(lambda p, x: dense.apply({"params": p}, x)[0])(backbone, images)
    for spec in (SparsitySpec.dense(), parse_density({"evit": "evit:1@1", "tome": "tome:0"}.get(_family(name), "dense"))):
        got = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec)[0])(params, images)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_every_patch_is_in_one_live_token_or_discarded(built, name):
    model, params, images = built(name)
    spec = _reducing_spec(model, name)
    _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))(params, images)
    p = model.num_prefix_tokens
    source, size = np.asarray(aux["source"]), np.asarray(aux["token_size"])
    assert source.shape == (4, model.num_patches)
    live = source >= 0
    # each live patch points at a patch token, and token sizes account for exactly those patches
    assert np.all(source[live] >= p)
    for b in range(4):
        holders, counts = np.unique(source[b][live[b]], return_counts=True)
        np.testing.assert_allclose(size[b, holders], counts)
    if _family(name) in ("tome", "evit", "stvit"):  # merging, fusing and clustering discard nothing
        assert live.all()
        np.testing.assert_allclose(size[:, p:].sum(-1), model.num_patches)
    if not spec.is_adaptive:  # fixed counts: the static schedule is what ran
        assert aux["tokens"].shape[1] == model.block_token_counts(spec)[-1][1]


@pytest.mark.parametrize("name", [n for n in TEST_MODELS if _family(n) in HAS_MASK_MODE])
def test_masked_forward_equals_gathered_forward(built, name):
    model, params, images = built(name)
    spec = _reducing_spec(model, name)
    gathered, g_aux = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))(params, images)
    masked, m_aux = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec.with_mode("mask")))(params, images)
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(masked), atol=1e-5)
    for g, m in zip(g_aux["keep_masks"], m_aux["keep_masks"]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(m))


@pytest.mark.parametrize("name", TEST_MODELS)
def test_one_compilation_per_spec(built, name):
    model, params, images = built(name)
    spec = _reducing_spec(model, name)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec)[0])
    with CompilationCounter() as compiled:
        for scale in (1.0, 3.0, 0.2):
            jax.block_until_ready(fn(params, images * scale))
    assert compiled.of(fn) == 1


@pytest.mark.parametrize("name", TEST_MODELS)
def test_fused_attention_equals_explicit_attention(built, name):
    """Logits, CLS attention (the fused path's O(N) row) and kept tokens agree at the reducing spec
    (dense blocks first) and, where the method has one, its masked form (the keep mask as the
    fused kernel's mask)."""
    model, params, images = built(name)
    spec = _reducing_spec(model, name)
    specs = [spec] + ([spec.with_mode("mask")] if _family(name) in HAS_MASK_MODE else [])
    for spec in specs:
        out = {impl: jax.jit(lambda p, x, m=model.clone(attention=impl): m.apply({"params": p}, x, sparsity=spec))(
            params, images) for impl in ("explicit", "fused")}
        (explicit, e_aux), (fused, f_aux) = out["explicit"], out["fused"]
        np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(f_aux["cls_attn"]), np.asarray(e_aux["cls_attn"]), atol=1e-6, rtol=0)
        for f, e in zip(f_aux["keep_masks"], e_aux["keep_masks"]):
            np.testing.assert_array_equal(np.asarray(f), np.asarray(e))
