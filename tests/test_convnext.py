"""ConvNeXt backbone: features, parameter counts and FLOPs against the published figures, parity
with timm (random weights, layer scales included), both checkpoint layouts, compilations and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.convert import convert_state_dict, guess_model_name
from saitjax.flops import analytic_gmacs
from saitjax.models.convnext import CONVNEXT_TEST_GEOMETRY, ConvNeXt
from saitjax.sparsity import SparsitySpec

from model_fixtures import assert_dense_backbone_errors, param_count, random_params
from timm_reference import import_timm, max_logit_diff, randomised

NAME = "convnext_test"
SIZES = ("tiny", "small", "base")


@pytest.fixture(scope="module")
def tiny():
    # drop_path_rate only acts in train mode: the same params serve both modes
    model = saitjax.create_model(NAME, drop_path_rate=0.3)
    return model, random_params(model), jax.jit(model.apply, static_argnames=("train", "sparsity"))


# -- model -----------------------------------------------------------------------------------------

def test_features_tokens_and_one_compilation_per_shape(tiny):
    model, params, apply = tiny
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    logits, aux = apply({"params": params}, images)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert [f.shape for f in aux["features"]] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64), (2, 1, 1, 128)]
    assert aux["tokens"].shape == (2, 1, 128) and aux["keep_masks"] == () and aux["keep_indices"] == ()
    last = aux["features"][-1].reshape(2, 1, 128)  # the head's LayerNorm at every location
    normed = (last - last.mean(-1, keepdims=True)) / jnp.sqrt(last.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(aux["tokens"], normed * params["norm"]["scale"] + params["norm"]["bias"], atol=1e-5)
    with CompilationCounter() as compiled:
        apply({"params": params}, images * 3.0)
    assert compiled.of(apply) == 0  # one compilation per input shape and mode


def test_train_mode_is_stochastic_and_rates_are_linear(tiny):
    model, params, apply = tiny
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    a = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(0)})[0]
    b = apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})[0]
    assert bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)  # stochastic depth per rng
    rates = model.drop_path_rates()
    assert [len(r) for r in rates] == [1, 1, 2, 1] and rates[0] == (0.0,)
    assert rates[1][0] == pytest.approx(0.3 / 4) and rates[-1][-1] == pytest.approx(0.3)  # linear over 5 blocks


@pytest.mark.parametrize("size,count", zip(SIZES, (28_589_128, 50_223_688, 88_591_464)))
def test_parameter_counts_equal_timm(size, count):
    """timm 1.0.31 ``sum(p.numel() for p in timm.create_model(f"convnext_{size}").parameters())``
    (also timm's model cards: 28.6M / 50.2M / 88.6M)."""
    model = saitjax.create_model(f"convnext_{size}")
    assert param_count(model) == count


@pytest.mark.parametrize("size,published", zip(SIZES, (4.5, 8.7, 15.4)))
def test_analytic_flops_match_published(size, published):
    """ConvNeXt paper (Liu et al. 2022), Table 1/Table 11 and timm's model cards: 4.5 / 8.7 / 15.4 GFLOPs
    (MACs, fvcore) at 224 px, to one decimal, hence the tolerance 0.05. Ours count convs and linears
    (the zoo's convention): 4.456 / 8.684 / 15.355; fvcore also counts each LayerNorm element (5) and
    the pooled elements (1), which brings the same shapes to 4.470 / 8.705 / 15.384."""
    model = saitjax.create_model(f"convnext_{size}")
    assert abs(analytic_gmacs(model) - published) <= 0.05
    assert analytic_gmacs(model, SparsitySpec.dense()) == analytic_gmacs(model)
    r, c = model.stage_resolutions, model.dims
    norm_elements = r[0] ** 2 * c[0] + sum(d * r[i] ** 2 * c[i] for i, d in enumerate(model.depths)) \
        + sum(r[i - 1] ** 2 * c[i - 1] for i in range(1, 4)) + c[-1]
    fvcore = analytic_gmacs(model) + (5 * norm_elements + r[-1] ** 2 * c[-1]) / 1e9
    assert fvcore == pytest.approx({"tiny": 4.470, "small": 8.705, "base": 15.384}[size], abs=5e-4)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"img_size=200 is not a multiple of .* = 32.*e\.g\. 192"):
        saitjax.create_model("convnext_tiny", img_size=200).analytic_macs()
    with pytest.raises(ValueError, match=r"dims=\(16, 32\) needs one entry per stage"):
        saitjax.create_model(NAME, dims=(16, 32)).analytic_macs()
    assert_dense_backbone_errors(saitjax.create_model(NAME))


def test_registry_and_zoo_attributes():
    assert saitjax.list_models("convnext_*") == ["convnext_base", "convnext_small", "convnext_test", "convnext_tiny"]
    assert NAME not in saitjax.list_models(tag="test")  # ViT-only invariants must not pick it up
    assert saitjax.list_models(tag="convnext_test") == [NAME]
    entry = saitjax.model_entry("convnext_small")
    assert entry.timm_name == "convnext_small" and "convnext" in entry.tags
    model = saitjax.create_model(NAME, num_classes=5)
    assert (model.patch_size, model.num_patches, model.num_prefix_tokens, model.distilled, model.depth,
            model.embed_dim, model.num_features, model.num_classes) == (4, 64, 0, False, 5, 16, 128, 5)
    assert model.default_sparsity().is_dense and isinstance(model, ConvNeXt)
    assert model.stage_resolutions == (8, 4, 2, 1) and CONVNEXT_TEST_GEOMETRY["img_size"] == 32


def _keys(dim, third, official=False):
    """A minimal timm (or official) ConvNeXt state dict: stem, one depthwise conv, stage-3 blocks."""
    z = np.zeros((1,), np.float32)
    if official:
        sd = {"downsample_layers.0.0.weight": np.zeros((dim, 3, 4, 4), np.float32), "stages.0.0.dwconv.weight": z}
        sd.update({f"stages.2.{j}.norm.weight": z for j in range(third)})
        return sd
    sd = {"stem.0.weight": np.zeros((dim, 3, 4, 4), np.float32), "stages.0.blocks.0.conv_dw.weight": z}
    sd.update({f"stages.2.blocks.{j}.norm.weight": z for j in range(third)})
    return sd


def test_guess_model_name_from_convnext_keys():
    for official in (False, True):
        assert guess_model_name(_keys(96, 9, official)) == "convnext_tiny"
        assert guess_model_name(_keys(96, 27, official)) == "convnext_small"
        assert guess_model_name(_keys(128, 27, official)) == "convnext_base"
        assert guess_model_name(_keys(64, 9, official)) is None


# -- parity with timm and both checkpoint layouts ----------------------------------------------------

def _small_timm(torch, timm, seed):
    torch.manual_seed(seed)
    g = CONVNEXT_TEST_GEOMETRY
    return randomised(timm.create_model("convnext_tiny", pretrained=False, depths=g["depths"],
                                         dims=g["dims"], num_classes=g["num_classes"]))


def _official_layout(state_dict):
    """timm keys -> the facebookresearch layout (what timm's checkpoint_filter_fn undoes)."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"downsample_layers.{m.group(1)}.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        for new, old in (("dwconv", "conv_dw"), ("pwconv1", "mlp.fc1"), ("pwconv2", "mlp.fc2")):
            key = key.replace(f".{old}.", f".{new}.")
        out[re.sub(r"^head\.fc\.", "head.", re.sub(r"^head\.norm\.", "norm.", key))] = value
    return out


@pytest.mark.torch
def test_parity_with_timm_small():
    """A small timm ConvNeXt (depths 1/1/2/1, dims 16..128) with random weights and layer scales,
    converted: logits within 1e-4 (fp32, batch 2, 64 px: maps 16/8/4/2; measured 3e-7)."""
    torch, timm = import_timm()
    reference = _small_timm(torch, timm, 64)
    model = saitjax.create_model(NAME, img_size=64)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = convert_state_dict(state_dict, model)
    assert params["stages_1"]["blocks_0"]["conv_dw"]["kernel"].shape == (7, 7, 1, 32)  # [C,1,7,7] -> HWIO, groups=C
    np.testing.assert_array_equal(params["stages_2"]["blocks_1"]["gamma"], state_dict["stages.2.blocks.1.gamma"])
    assert max_logit_diff(reference, model, params, 64) < 1e-4


@pytest.mark.torch
def test_official_layout_converts_identically():
    torch, timm = import_timm()
    timm_sd = {k: v.numpy() for k, v in _small_timm(torch, timm, 3).state_dict().items()}
    official = _official_layout(timm_sd)
    assert "downsample_layers.1.1.weight" in official and "stages.2.1.pwconv1.weight" in official
    assert "head.weight" in official and "norm.weight" in official
    model = saitjax.create_model(NAME)
    jax.tree.map(np.testing.assert_array_equal, convert_state_dict(timm_sd, model), convert_state_dict(official, model))


@pytest.mark.torch
@pytest.mark.extended  # full size: pytest -m extended
def test_parity_with_timm_convnext_tiny_224():
    """timm.create_model("convnext_tiny") with random weights and layer scales: logits within 1e-4
    (measured 2e-6; ~9 s)."""
    torch, timm = import_timm()
    torch.manual_seed(0)
    reference = randomised(timm.create_model("convnext_tiny", pretrained=False))
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert guess_model_name(state_dict) == "convnext_tiny"
    model = saitjax.create_model("convnext_tiny")
    params = convert_state_dict(state_dict, model, model_name="convnext_tiny")
    assert max_logit_diff(reference, model, params, 224) < 1e-4


def test_depthwise_conv_ways_agree_in_value_and_gradient():
    """The CPU formulation (shifted adds with a written-out gradient) is the grouped convolution."""
    from saitjax.models.convnext import DepthwiseConv, depthwise_shifted

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 9, 11, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(7, 7, 1, 5)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, 9, 11, 5)), jnp.float32)

    def grouped(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=5)

    np.testing.assert_allclose(depthwise_shifted(x, kernel), grouped(x, kernel), atol=1e-5)
    ours = jax.grad(lambda a, k: jnp.sum(depthwise_shifted(a, k) * weights), argnums=(0, 1))(x, kernel)
    ref = jax.grad(lambda a, k: jnp.sum(grouped(a, k) * weights), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=2e-5)
    conv = DepthwiseConv(7, "grouped")
    variables = conv.init(jax.random.key(0), x)
    np.testing.assert_allclose(DepthwiseConv(7, "shifted").apply(variables, x), conv.apply(variables, x), atol=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        DepthwiseConv(7, "fft").init(jax.random.key(0), x)
