"""DynamicViT model: predictors, masked vs gathered pruning, Gumbel training decisions,
conversion of official checkpoints, and the published FLOPs."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import saitjax
from saitjax.convert import convert_state_dict, load_params
from saitjax.flops import analytic_gmacs
from saitjax.models.core.predictors import Predictor, predictor_macs
from saitjax.sparsity import SparsityError, SparsitySpec
from saitjax.tools import convert as convert_cli

from model_fixtures import random_params


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


NAME = "dynamicvit_test_patch4_32"
SPEC = SparsitySpec.hierarchical(0.7, (1, 2, 3))  # keeps 44, 31, 21 of 64




def _apply(model):
    """Jitted ``model.apply``; ``sparsity`` and ``train`` are static."""
    return jax.jit(model.apply, static_argnames=("sparsity", "train"))


def _spread_predictors(params, seed=5, scale=0.5):
    """Random predictor weights large enough that keep scores have no near-ties."""
    rng = np.random.default_rng(seed)
    out = dict(params)
    for name in [n for n in params if n.startswith("predictor_")]:
        out[name] = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, scale, a.shape), jnp.float32),
                                 params[name])
    return out


@pytest.fixture(scope="module")
def tiny():
    model = saitjax.create_model(NAME)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    return model, _spread_predictors(random_params(model)), images


def test_predictor_param_count_deit_small():
    shapes = jax.eval_shape(lambda: Predictor().init(jax.random.key(0), jnp.zeros((1, 196, 384)),
                                                     jnp.ones((1, 196))))["params"]
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 241_250
    model = saitjax.create_model("dynamicvit_deit_small_patch16_224")
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
    assert {f"predictor_{s}" for s in range(3)} <= set(params)
    assert sum(x.size for x in jax.tree.leaves(params)) == 22_050_664 + 3 * 241_250


def test_registered_names():
    names = saitjax.list_models(tag="dynamicvit")
    assert {"dynamicvit_deit_tiny_patch16_224", "dynamicvit_deit_small_patch16_224",
            "dynamicvit_deit_base_patch16_224", NAME, "dynamicvit_demo_patch8_64"} <= set(names)
    entry = saitjax.models.model_entry("dynamicvit_deit_base_patch16_224")
    assert entry.timm_name == "deit_base_patch16_224"
    demo = saitjax.create_model("dynamicvit_demo_patch8_64")
    assert (demo.embed_dim, demo.depth, demo.num_heads, demo.num_patches) == (96, 4, 3, 64)
    assert demo.predictor_locations == (1, 2, 3)


@pytest.mark.parametrize("distilled", [False, True])
def test_masked_forward_equals_gathered_forward(distilled, tiny):
    """With the deterministic rule the kept sets agree, so masked and gathered logits agree."""
    if distilled:
        model = saitjax.create_model(NAME, distilled=True)
        params = _spread_predictors(random_params(model))
    else:
        model, params, _ = tiny
    images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    apply = _apply(model)
    gathered, g_aux = apply({"params": params}, images, sparsity=SPEC)
    masked, m_aux = apply({"params": params}, images, sparsity=SPEC.with_mode("mask"))
    np.testing.assert_allclose(gathered, masked, atol=1e-5, rtol=0)
    assert SPEC.keep_counts(64) == (44, 31, 21)
    for g, m, k in zip(g_aux["keep_masks"], m_aux["keep_masks"], SPEC.keep_counts(64)):
        np.testing.assert_array_equal(g, m)
        np.testing.assert_array_equal(np.asarray(g).sum(-1), k)
    masks = [np.asarray(m) for m in g_aux["keep_masks"]]
    assert all(np.all(later <= earlier) for earlier, later in itertools.pairwise(masks))
    p = model.num_prefix_tokens
    assert [i.shape for i in g_aux["keep_indices"]] == [(4, 44), (4, 31), (4, 21)]
    assert g_aux["tokens"].shape == (4, p + 21, 32) and m_aux["tokens"].shape == (4, p + 64, 32)


def test_default_spec_is_keep_rho_and_dense_is_the_backbone(tiny):
    model, params, images = tiny
    apply = _apply(model)
    default, aux = apply({"params": params}, images)
    explicit, _ = apply({"params": params}, images, sparsity=SPEC)
    np.testing.assert_array_equal(default, explicit)
    assert aux["tokens"].shape == (4, 1 + 21, 32)
    assert saitjax.create_model(NAME, keep_rho=0.5).default_sparsity() == SparsitySpec.hierarchical(0.5, (1, 2, 3))
    # the dense spec never calls a predictor: it is exactly the plain ViT with the same weights
    vit = saitjax.create_model("vit_test_patch4_32")
    backbone = {k: v for k, v in params.items() if not k.startswith("predictor_")}
    dense, _ = apply({"params": backbone}, images, sparsity=SparsitySpec.dense())
    np.testing.assert_array_equal(dense, _apply(vit)({"params": backbone}, images)[0])
    # ... and initialising at the dense spec still creates every predictor
    init_dense = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1],
                                                   sparsity=SparsitySpec.dense()))["params"]
    assert jax.tree.map(jnp.shape, init_dense) == jax.tree.map(jnp.shape, params)


def test_gumbel_decisions_are_hierarchical_and_reach_the_predictors(tiny):
    model, params, images = tiny
    spec = SPEC.with_mode("mask")

    @jax.jit
    def forward(p, key):
        return model.apply({"params": p}, images, train=True, sparsity=spec, rngs={"gumbel": key})

    _, aux = forward(params, jax.random.key(3))
    decisions = [np.asarray(d) for d in aux["decisions"]]
    assert len(decisions) == 3 and all(d.shape == (4, 64) for d in decisions)
    for d, mask in zip(decisions, aux["keep_masks"]):
        assert set(np.unique(d)) <= {0.0, 1.0}
        np.testing.assert_array_equal(d, mask)
    assert all(np.all(later <= earlier) for earlier, later in itertools.pairwise(decisions))
    assert aux["tokens"].shape == (4, 65, 32)  # training keeps every token
    _, other = forward(params, jax.random.key(4))
    assert not np.array_equal(decisions[0], other["decisions"][0])  # sampled, not a fixed rule
    # straight-through decisions pass gradient to every predictor through the masked attention
    grads = jax.grad(lambda p: jnp.sum(forward(p, jax.random.key(3))[0] ** 2))(params)
    for s in range(3):
        norm = optax_norm(grads[f"predictor_{s}"])
        assert np.isfinite(norm) and norm > 0, (s, norm)


def test_gumbel_sampling_follows_train_not_the_rng(tiny):
    """Sampling is decided by ``train``: training without the ``gumbel`` rng is an error (not a
    silent fall-back to the deterministic rule), and eval never samples even when an rng is
    passed (it equals the deterministic masked forward, whatever the key)."""
    model, params, images = tiny
    spec = SPEC.with_mode("mask")
    apply = _apply(model)
    with pytest.raises(ValueError, match="needs the 'gumbel' rng"):
        apply({"params": params}, images, train=True, sparsity=spec, rngs={"dropout": jax.random.key(0)})
    plain, plain_aux = apply({"params": params}, images, train=False, sparsity=spec)
    for key in (3, 4):
        out, aux = apply({"params": params}, images, train=False, sparsity=spec,
                         rngs={"gumbel": jax.random.key(key)})
        np.testing.assert_array_equal(out, plain)
        for d, ref in zip(aux["decisions"], plain_aux["decisions"]):
            np.testing.assert_array_equal(d, ref)
    # the deterministic rule keeps exactly the scheduled counts; a sample would not (in general)
    assert [int(n) for n in np.asarray(plain_aux["decisions"][-1]).sum(-1)] == [SPEC.keep_counts(64)[-1]] * 4


def optax_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


def test_bad_specs_are_refused(tiny):
    model, params, images = tiny
    with pytest.raises(SparsityError, match=r"sait_\* family"):
        jax.eval_shape(lambda: model.apply({"params": params}, images,
                                           sparsity=SparsitySpec.adaptive("mass", 0.9, (1, 2, 3))))
    with pytest.raises(SparsityError, match=r"predictors before blocks \(1, 2, 3\)"):
        jax.eval_shape(lambda: model.apply({"params": params}, images,
                                           sparsity=SparsitySpec.hierarchical(0.7, (1, 2))))


# ----------------------------------------------------------------------------------------------
# Conversion of the official checkpoint format (methods.md §4.10), at the test size
# ----------------------------------------------------------------------------------------------


def _official_state_dict(c=32, depth=4, patch=4, tokens=65, classes=10, stages=3, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.normal(0, 0.5, shape).astype(np.float32)

    sd = {"cls_token": r(1, 1, c), "pos_embed": r(1, tokens, c), "patch_embed.proj.weight": r(c, 3, patch, patch),
          "patch_embed.proj.bias": r(c), "norm.weight": r(c), "norm.bias": r(c), "head.weight": r(classes, c),
          "head.bias": r(classes)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(c), b + "norm1.bias": r(c), b + "attn.qkv.weight": r(3 * c, c),
                   b + "attn.qkv.bias": r(3 * c), b + "attn.proj.weight": r(c, c), b + "attn.proj.bias": r(c),
                   b + "norm2.weight": r(c), b + "norm2.bias": r(c), b + "mlp.fc1.weight": r(4 * c, c),
                   b + "mlp.fc1.bias": r(4 * c), b + "mlp.fc2.weight": r(c, 4 * c), b + "mlp.fc2.bias": r(c)})
    for s in range(stages):
        p = f"score_predictor.{s}."
        sd.update({p + "in_conv.0.weight": r(c), p + "in_conv.0.bias": r(c),
                   p + "in_conv.1.weight": r(c, c), p + "in_conv.1.bias": r(c),
                   p + "out_conv.0.weight": r(c // 2, c), p + "out_conv.0.bias": r(c // 2),
                   p + "out_conv.2.weight": r(c // 4, c // 2), p + "out_conv.2.bias": r(c // 4),
                   p + "out_conv.4.weight": r(2, c // 4), p + "out_conv.4.bias": r(2)})
    return sd


def _numpy_predictor(sd, s, x, policy):
    """PredictorLG in NumPy with the PyTorch weight layout (``y = x W^T + b``)."""

    def w(name):
        return sd[f"score_predictor.{s}.{name}"]

    def gelu(v):
        return 0.5 * v * (1 + erf(v / math.sqrt(2)))

    x = x.astype(np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    z = (x - mu) / np.sqrt(var + 1e-5) * w("in_conv.0.weight") + w("in_conv.0.bias")
    z = gelu(z @ w("in_conv.1.weight").T + w("in_conv.1.bias"))
    c = z.shape[-1]
    pol = policy[..., None]
    g = (z[..., c // 2:] * pol).sum(1, keepdims=True) / pol.sum(1, keepdims=True)
    h = np.concatenate([z[..., : c // 2], np.broadcast_to(g, z[..., c // 2:].shape)], -1)
    h = gelu(h @ w("out_conv.0.weight").T + w("out_conv.0.bias"))
    h = gelu(h @ w("out_conv.2.weight").T + w("out_conv.2.bias"))
    logits = h @ w("out_conv.4.weight").T + w("out_conv.4.bias")
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_official_checkpoint_converts_with_the_right_layout():
    model = saitjax.create_model(NAME)
    sd = _official_state_dict()
    params = convert_state_dict(sd, model, model_name=NAME, strict=True)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 64, 32)).astype(np.float32)
    policy = (rng.random((2, 64)) < 0.6).astype(np.float32)
    for s in range(3):
        p = params[f"predictor_{s}"]
        np.testing.assert_array_equal(p["in_norm"]["scale"], sd[f"score_predictor.{s}.in_conv.0.weight"])
        ours = jax.jit(Predictor().apply)({"params": p}, jnp.asarray(x), jnp.asarray(policy))
        np.testing.assert_allclose(ours, _numpy_predictor(sd, s, x, policy), atol=1e-4, rtol=1e-4)
    logits, _ = _apply(model)({"params": params}, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_convert_cli_accepts_an_official_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    sd = _official_state_dict(seed=3)
    src = tmp_path / "dynamicvit_official.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "dyvit.npz"
    assert convert_cli.main(["--src", str(src), "--model", NAME, "--out", str(out)]) == 0
    params = load_params(str(out))  # strict: every parameter, predictors included, is present
    np.testing.assert_array_equal(params["predictor_2"]["out_fc3"]["kernel"],
                                  sd["score_predictor.2.out_conv.4.weight"].T)
    # a checkpoint missing a predictor is refused in strict mode
    del sd["score_predictor.1.out_conv.2.weight"]
    save_file(sd, str(src))
    assert convert_cli.main(["--src", str(src), "--model", NAME, "--out", str(tmp_path / "x.npz")]) == 2


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def test_predictor_macs_and_dense_spec():
    model = saitjax.create_model("dynamicvit_deit_small_patch16_224")
    assert predictor_macs(384) == 384 * 384 + 384 * 192 + 192 * 96 + 96 * 2
    assert model.extra_macs(SparsitySpec.dense()) == 0.0 and model.extra_macs(None) == 0.0
    assert round(analytic_gmacs(model, SparsitySpec.dense()), 2) == 4.60
    spec = SparsitySpec.hierarchical(0.7, (3, 6, 9))
    # predictors run on the tokens present at their stage: 196, 137, 96
    assert model.extra_macs(spec) == (196 + 137 + 96) * predictor_macs(384)
    assert model.extra_macs(spec.with_mode("mask")) == 3 * 196 * predictor_macs(384)


def test_deit_small_rho_07_schedule_is_exact_and_gmacs_near_published():
    """DynamicViT-DeiT-S at rho=0.7 against the published figure.

    Source: DynamicViT README (raoyongming/DynamicViT, model table: DynamicViT-DeiT-S, rho 0.7,
    79.32 top-1, 2.9 GFLOPs); the same figure on Papers-with-Code (79.3 / 2.9 G). Collected in
    shared/docs/methods.md (DynamicViT results) and methods-more.md section 8, which also
    gives the schedule: 137 / 96 / 67 patch tokens kept before blocks 3 / 6 / 9.

    The schedule is checked exactly. The GMACs are compared with a tolerance fixed in advance:
    |ours - 2.9| <= 0.1 GMACs, because the published figure has one decimal (+-0.05) and the
    official count does not state how it treats the predictor MLPs (~0.1 GMACs here) and the
    non-matmul ops. Our count (backbone 2.88 + predictors 0.10 = 2.98) is not rounded or
    truncated to make it match.
    """
    model = saitjax.create_model("dynamicvit_deit_small_patch16_224")
    spec = SparsitySpec.hierarchical(0.7, (3, 6, 9))
    assert spec.keep_counts(196) == (137, 96, 67)
    # tokens processed by blocks 0..11, CLS included
    assert model.token_schedule(spec) == (197,) * 3 + (138,) * 3 + (97,) * 3 + (68,) * 3
    published, tolerance = 2.9, 0.1
    gmacs = analytic_gmacs(model, spec)
    assert abs(gmacs - published) <= tolerance, gmacs


@pytest.mark.parametrize("rho, published", [(0.9, 4.0), (0.8, 3.4)])
def test_deit_small_other_rhos_near_published(rho, published):
    """Same source and the same advance tolerance (0.1 GMACs) as the rho=0.7 test above."""
    gmacs = analytic_gmacs(saitjax.create_model("dynamicvit_deit_small_patch16_224"),
                           SparsitySpec.hierarchical(rho, (3, 6, 9)))
    assert abs(gmacs - published) <= 0.1, gmacs
