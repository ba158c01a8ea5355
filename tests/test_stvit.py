"""STViT on DeiT: pooling bins, the semantic forward against a hand-built reference, counts, loading."""

from __future__ import annotations

import math

import flax.linen as nn
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.flops import analytic_gmacs, xla_flops
from saitjax.models.core import token_ops
from saitjax.models.vit import Block
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density

from timm_reference import import_timm


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


NAME = "stvit_test_patch4_32"  # 8x8 patches, 4 blocks, 9 semantic tokens from block 1


@pytest.fixture(scope="module")
def tiny():
    model = saitjax.create_model(NAME)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    # A trained G is not zero: make it visible, so the reference checks where it is added.
    g = 0.5 * jax.random.normal(jax.random.key(2), params["semantic_init"]["embedding"].shape)
    params = {**params, "semantic_init": {"embedding": g}}
    return model, params, images


def test_pooling_bins_are_pytorchs():
    assert token_ops.adaptive_pool_bins(14, 4) == ((0, 4), (3, 7), (7, 11), (10, 14))
    assert token_ops.adaptive_pool_bins(7, 3) == ((0, 3), (2, 5), (4, 7))
    assert token_ops.adaptive_pool_bins(8, 4) == ((0, 2), (2, 4), (4, 6), (6, 8))
    with pytest.raises(ValueError, match="cannot pool"):
        token_ops.adaptive_pool_bins(3, 4)


@pytest.mark.torch
@pytest.mark.parametrize("size_in,size_out", [(14, 4), (7, 3), (8, 3), (14, 14), (24, 5)])
def test_adaptive_max_pool_equals_torch(size_in, size_out):
    torch, _ = import_timm()
    grid = np.random.default_rng(0).normal(size=(2, size_in, size_in, 5)).astype(np.float32)
    expected = torch.nn.functional.adaptive_max_pool2d(torch.from_numpy(grid).permute(0, 3, 1, 2), size_out)
    got = token_ops.adaptive_max_pool(jnp.asarray(grid), size_out, size_out)
    np.testing.assert_array_equal(np.asarray(got), expected.permute(0, 2, 3, 1).numpy())


def _reference_forward(model, params, images, tokens: int, location: int, updates: int):
    """STViT written out with plain self-attention blocks: a query subset's cross-attention to
    ``[queries; image tokens]`` is the first rows of self-attention over the concatenation."""
    block = lambda i, x: Block(model.num_heads).apply({"params": params[f"blocks_{i}"]}, x, None, False)[0]  # noqa: E731
    x = model.apply({"params": params}, images, False, method=lambda m, im, train: m.embed(im, train))
    p, g = model.num_prefix_tokens, model.grid_size
    for i in range(location):
        x = block(i, x)
    side = math.isqrt(tokens)
    patches = x[:, p:]
    grid = patches.reshape(x.shape[0], g, g, -1)
    bins = token_ops.adaptive_pool_bins(g, side)
    centres = jnp.stack([grid[:, a:b, c:d].max(axis=(1, 2)) for a, b in bins for c, d in bins], axis=1)
    queries = jnp.concatenate([x[:, :p], centres], axis=1)
    init = params["semantic_init"]["embedding"]
    if init.shape[1] != tokens:
        init = jax.image.resize(init.reshape(math.isqrt(init.shape[1]), -1, init.shape[-1]),
                                (side, side, init.shape[-1]), "linear").reshape(1, tokens, -1)
    for i in range(location, location + 1 + updates):
        if i > location:
            queries = queries.at[:, p:].add(init)
        queries = block(i, jnp.concatenate([queries, patches], axis=1))[:, :p + tokens]
    x = queries
    for i in range(location + 1 + updates, model.depth):
        x = block(i, x)
    x = nn.LayerNorm(1e-6).apply({"params": params["norm"]}, x)
    return nn.Dense(model.num_classes).apply({"params": params["head"]}, x[:, 0])


@pytest.mark.parametrize("density,tokens,location,updates", [
    (None, 9, 1, 1), ("semantic:4@1", 4, 1, 1), ("semantic:16@1,update=0", 16, 1, 0), ("semantic:9@2,update=0", 9, 2, 0),
    ("semantic:9@1,update=2", 9, 1, 2)])  # the image tokens read to the last block
def test_semantic_forward_equals_written_out_reference(tiny, density, tokens, location, updates):
    model, params, images = tiny
    spec = parse_density(density) if density else None
    logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec))(params, images)
    reference = jax.jit(lambda p, x: _reference_forward(model, p, x, tokens, location, updates))
    expected = reference(params, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=2e-5, rtol=0)
    # static token count as configured; the semantic attention covers every image token
    assert aux["tokens"].shape == (2, model.num_prefix_tokens + tokens, model.embed_dim)
    attention = aux["semantic_attention"][0]
    assert attention.shape == (2, tokens, model.num_patches)


def test_counts_flops_and_one_compilation(tiny):
    model, params, images = tiny
    spec = model.default_sparsity()
    assert spec.describe() == "semantic:9@1" and spec.locations == (1, 2, 3)
    assert model.block_token_counts(spec) == ((65, 65), (10, 10), (10, 10), (10, 10))
    assert model.block_context_tokens(spec) == (0, 64, 64, 0)
    # the executed computation is the analytic one: XLA's count scales like the MAC count
    dense = parse_density("dense")
    fn = lambda s: jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=s)[0]).lower(params, images).compile()  # noqa: E731
    xla_ratio = xla_flops(fn(spec)) / xla_flops(fn(dense))
    assert xla_ratio == pytest.approx(analytic_gmacs(model, spec) / analytic_gmacs(model, dense), rel=0.05)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=spec)[0])
    with CompilationCounter() as compiled:
        for scale in (1.0, 5.0):
            run(params, images * scale)
    assert compiled.of(run) == 1


def test_deit_small_flops_and_parameters():
    """methods-more.md 5.2 [calc]: 4 dense blocks + 2 generation layers + 6 blocks on 17 tokens =
    1.93 GMACs (dense 4.60: 58 % fewer; the abstract says "about 60 %"). Parameters: DeiT-S plus
    the 16 x 384 global initialisation (only the dense setting runs without it)."""
    model = saitjax.create_model("stvit_deit_small_patch16_224")
    assert analytic_gmacs(model, model.default_sparsity()) == pytest.approx(1.935, abs=0.005)
    assert analytic_gmacs(model, SparsitySpec.dense()) == pytest.approx(4.599, abs=0.005)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(shapes))
    assert count == 22_050_664 + 16 * 384  # timm's deit_small_patch16_224 has 22,050,664
    dense_only = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                                   sparsity=SparsitySpec.dense()))["params"]
    assert "semantic_init" not in dense_only


def test_bad_settings_fail_clearly(tiny):
    model, params, images = tiny
    with pytest.raises(SparsityError, match="pooling grid does not fit"):
        model.apply({"params": params}, images, sparsity=parse_density("semantic:81@1"))
    with pytest.raises(SparsityError, match="rule 'semantic'"):
        model.apply({"params": params}, images, sparsity=parse_density("topk:0.5@1"))
    with pytest.raises(SparsityError, match="square number"):
        SparsitySpec.semantic(10, 1)
    with pytest.raises(SparsityError, match="need 5 <= depth"):
        model.apply({"params": params}, images, sparsity=parse_density("semantic:9@3,update=1"))
    with pytest.raises(SparsityError, match="semantic:<tokens>@<block>"):
        parse_density("semantic:9")


def test_dense_deit_export_initialises_stvit(tmp_path, tiny):
    """Fine-tuning starts from a dense checkpoint: everything but G loads, and it runs both ways."""
    from saitjax.convert import save_params
    from saitjax.train import load_pretrained
    from train_fixtures import tiny_config

    model, params, images = tiny
    dense = saitjax.create_model("vit_test_patch4_32")
    dense_params = jax.jit(dense.init)(jax.random.key(5), images)["params"]
    path = save_params(str(tmp_path / "dense.npz"), dense_params, model="vit_test_patch4_32")
    config = tiny_config(**{"model": NAME, "model_kwargs.num_classes": 10})
    loaded, fresh = load_pretrained(params, path, config)
    assert fresh == ["semantic_init/embedding"]
    expected = jax.jit(dense.apply)({"params": dense_params}, images)[0]
    run = jax.jit(lambda p, x, spec=None: model.apply({"params": p}, x, sparsity=spec)[0], static_argnums=2)
    np.testing.assert_array_equal(np.asarray(run(loaded, images, SparsitySpec.dense())), np.asarray(expected))
    assert np.isfinite(np.asarray(run(loaded, images))).all()


@pytest.mark.torch
def test_timm_deit_converts_into_stvit():
    """A timm DeiT-Ti state dict loads non-strictly; the dense setting reproduces timm."""
    torch, timm = import_timm()
    from saitjax.convert import convert_state_dict

    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    model = saitjax.create_model("stvit_deit_tiny_patch16_224")
    params = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, model, strict=False)
    assert "semantic_init" not in params
    params["semantic_init"] = {"embedding": jnp.zeros((1, 16, 192))}
    images = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    dense = jax.jit(lambda p, x: model.apply({"params": p}, x, sparsity=SparsitySpec.dense())[0])(params, images)
    np.testing.assert_allclose(np.asarray(dense), expected, atol=1e-4, rtol=0)
    semantic, aux = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    assert np.isfinite(np.asarray(semantic)).all() and aux["tokens"].shape == (1, 17, 192)


def test_sweep_draws_semantic_groups_and_attention(tmp_path, tiny):
    from saitjax.sweep import run_sweep

    model, params, images = tiny
    batch = {"image": jnp.concatenate([images] * 4), "label": jnp.arange(8) % 10, "valid": jnp.ones(8)}
    densities = [(d, parse_density(d)) for d in ("dense", "semantic:9@1", "semantic:4@1")]
    rows = run_sweep(model, params, [batch], densities, str(tmp_path), timing_batch_sizes=(2,), timing_images=4,
                     picture_images=2)
    assert [r["kept_tokens"] for r in rows] == [64.0, 9.0, 4.0]
    assert rows[1]["gmacs"] == pytest.approx(analytic_gmacs(model, densities[1][1]))
    for name in ("sweep.md", "kept_tokens.png", "semantic_attention_9at1.png", "semantic_attention_4at1.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize("name, arg", [("stvit_demo", "init=dense.npz"), ("stvit_deit_imagenet", "model=base,init=deit_b.npz"),
                                       ("stvit_deit_imagenet", "model=tiny,tokens=9")])
def test_configs_build_and_validate(name, arg):
    from train_fixtures import load_config

    config = load_config(name, arg)
    assert config.model.startswith("stvit_") and config.method == "supervised"
    assert (config.teacher == "init") == ("init=" in arg and "imagenet" in name)
    spec = parse_density(config.eval.densities[2])
    assert spec.rule == "semantic" and spec.semantic_tokens == config.model_kwargs.semantic_tokens
