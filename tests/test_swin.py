"""Swin backbone: window helpers, features, parameter counts and FLOPs against the published
figures, parity with timm (random weights), both checkpoint layouts, compilations and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.compilations import CompilationCounter
from saitjax.convert import ConversionError, convert_state_dict, guess_model_name, load_params
from saitjax.flops import analytic_gmacs
from saitjax.models.core import token_ops
from saitjax.models.swin import SWIN_TEST_GEOMETRY, SwinTransformer
from saitjax.sparsity import SparsitySpec
from saitjax.tools import convert as convert_cli

from model_fixtures import assert_dense_backbone_errors, param_count, random_params
from timm_reference import import_timm, max_logit_diff, randomised

NAME = "swin_test_patch4_window4_32"
SIZES = ("tiny", "small", "base")




@pytest.fixture(scope="module")
def tiny():
    model = saitjax.create_model(NAME)
    return model, random_params(model), jax.jit(model.apply, static_argnames=("train", "sparsity"))


# -- window helpers --------------------------------------------------------------------------------

def test_window_partition_round_trip_and_order():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    windows = token_ops.window_partition(x, 4)
    assert windows.shape == (2, 4, 4, 4, 3)
    np.testing.assert_array_equal(windows[:, 1], x[:, 0:4, 4:8])  # windows row-major: top-right second
    np.testing.assert_array_equal(windows[:, 2], x[:, 4:8, 0:4])
    np.testing.assert_array_equal(token_ops.window_reverse(windows, 8, 8), x)


def test_relative_position_index_is_the_offset_table_row():
    w = 3
    index = token_ops.relative_position_index(w)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = i // w - j // w, i % w - j % w
            assert index[i, j] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
    assert index.min() == 0 and index.max() == (2 * w - 1) ** 2 - 1


def test_shifted_window_mask_separates_wrapped_regions():
    assert token_ops.shifted_window_mask(8, 4, 0) is None
    mask = token_ops.shifted_window_mask(8, 4, 2)
    assert mask.shape == (4, 16, 16) and set(np.unique(mask)) == {0.0, -100.0}
    assert not mask[0].any()  # the top-left window holds one region only
    # bottom-right window: 4 regions of 2x2 tokens; a token sees only the 4 of its own region
    np.testing.assert_array_equal((mask[3] == 0).sum(axis=1), np.full(16, 4))
    assert token_ops.effective_window(7, 7, 3) == (7, 0) and token_ops.effective_window(2, 4, 2) == (2, 0)
    assert token_ops.effective_window(14, 7, 3) == (7, 3)


# -- model -----------------------------------------------------------------------------------------

def test_features_tokens_and_one_compilation_per_shape(tiny):
    model, params, apply = tiny
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    logits, aux = apply({"params": params}, images)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert [f.shape for f in aux["features"]] == [(2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128), (2, 1, 1, 256)]
    assert aux["tokens"].shape == (2, 1, 256) and aux["keep_masks"] == ()
    # the last feature map is the last stage before the final norm; tokens are after it
    assert not np.allclose(aux["features"][-1].reshape(2, 1, 256), aux["tokens"])
    with CompilationCounter() as compiled:
        for scale in (3.0, 0.5):
            apply({"params": params}, images * scale)
        apply({"params": params}, images[:1])
    assert compiled.of(apply) == 1  # one compilation per input shape: only batch 1 is new


def test_stage_shapes_of_swin_tiny_at_224():
    model = saitjax.create_model("swin_tiny_patch4_window7_224")
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    assert [f.shape for f in out[1]["features"]] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384),
                                                     (1, 7, 7, 768)]
    assert out[1]["tokens"].shape == (1, 49, 768) and model.num_patches == 3136


@pytest.mark.parametrize("size,count", zip(SIZES, (28_288_354, 49_606_258, 87_768_224)))
def test_parameter_counts_equal_timm(size, count):
    """timm 1.0 ``sum(p.numel() for p in model.parameters())`` (index and masks are buffers)."""
    model = saitjax.create_model(f"swin_{size}_patch4_window7_224")
    assert param_count(model) == count


@pytest.mark.parametrize("size,published", zip(SIZES, (4.5, 8.7, 15.4)))
def test_analytic_flops_match_published(size, published):
    """Swin paper Table 1 (also timm's model card): 4.5 / 8.7 / 15.4 GFLOPs (MACs, fvcore),
    given to one decimal, hence the tolerance 0.05. Ours: 4.49 / 8.74 / 15.43."""
    model = saitjax.create_model(f"swin_{size}_patch4_window7_224")
    assert abs(analytic_gmacs(model) - published) <= 0.05
    assert analytic_gmacs(model, SparsitySpec.dense()) == analytic_gmacs(model)


def test_train_mode_is_stochastic_and_rates_are_linear():
    # two stages (maps 8 and 4) keep the compilation short; dropout and drop-path on every block
    model = saitjax.create_model(NAME, depths=(2, 2), num_heads=(2, 4), drop_path_rate=0.2, drop_rate=0.1)
    assert model.stage_resolutions == (8, 4)
    params = random_params(model)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    train = jax.jit(lambda p, rng: model.apply({"params": p}, images, train=True, rngs={"dropout": rng})[0])
    a, b = train(params, jax.random.key(0)), train(params, jax.random.key(1))
    assert bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)  # stochastic depth / dropout per rng
    assert model.drop_path_rates()[0] == (0.0, pytest.approx(0.2 / 3))  # linear over all 4 blocks
    assert model.drop_path_rates()[-1][-1] == pytest.approx(0.2)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"img_size=256: stage 0 runs on a 64x64 map.*window_size=7.*multiple of .*= 224"):
        jax.eval_shape(lambda: saitjax.create_model("swin_tiny_patch4_window7_224", img_size=256).init(
            jax.random.key(0), jnp.zeros((1, 256, 256, 3))))
    with pytest.raises(ValueError, match=r"img_size=200 gives a 50x50 patch grid.*cannot halve.*= 224"):
        saitjax.create_model("swin_tiny_patch4_window7_224", img_size=200).analytic_macs()
    with pytest.raises(ValueError, match="img_size=30 is not a multiple of patch_size=4"):
        saitjax.create_model(NAME, img_size=30).analytic_macs()
    assert_dense_backbone_errors(saitjax.create_model(NAME))


def test_registry_and_zoo_attributes():
    assert saitjax.list_models("swin_*") == ["swin_base_patch4_window7_224", "swin_demo_patch2_window4_64",
                                             "swin_small_patch4_window7_224", "swin_test_patch4_window4_32",
                                             "swin_tiny_patch4_window7_224"]
    assert NAME not in saitjax.list_models(tag="test")  # ViT-only invariants must not pick it up
    assert saitjax.list_models(tag="swin_test") == [NAME]
    entry = saitjax.model_entry("swin_small_patch4_window7_224")
    assert entry.timm_name == "swin_small_patch4_window7_224" and "swin" in entry.tags
    model = saitjax.create_model(NAME, num_classes=5)
    assert (model.patch_size, model.num_patches, model.num_prefix_tokens, model.distilled, model.depth,
            model.embed_dim, model.num_classes) == (4, 64, 0, False, 8, 32, 5)
    assert model.default_sparsity().is_dense and isinstance(model, SwinTransformer)
    assert model.stage_resolutions == (8, 4, 2, 1) and SWIN_TEST_GEOMETRY["window_size"] == 4


def test_guess_model_name_from_swin_keys():
    def keys(dim, third):
        sd = {"patch_embed.proj.weight": np.zeros((dim, 3, 4, 4), np.float32),
              "layers.0.blocks.0.attn.relative_position_bias_table": np.zeros((169, 3), np.float32)}
        sd.update({f"layers.2.blocks.{j}.norm1.weight": np.zeros((1,), np.float32) for j in range(third)})
        return sd

    assert guess_model_name(keys(96, 6)) == "swin_tiny_patch4_window7_224"
    assert guess_model_name(keys(96, 18)) == "swin_small_patch4_window7_224"
    assert guess_model_name(keys(128, 18)) == "swin_base_patch4_window7_224"
    assert guess_model_name(keys(64, 6)) is None


# -- parity with timm and both checkpoint layouts ----------------------------------------------------

def _official_layout(state_dict):
    """timm keys -> the microsoft layout: PatchMerging at the end of the previous stage, ``head.weight``,
    plus the buffers the official code saves (which the converter must skip)."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[re.sub(r"^head\.fc\.", "head.", key)] = value
    out["layers.0.blocks.1.attn_mask"] = np.zeros((4, 16, 16), np.float32)
    out["layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
    return out


@pytest.mark.torch
def test_parity_with_timm_tiny():
    """A tiny timm Swin with random weights, converted: logits within 1e-4 (fp32, batch 2; measured
    4e-7). At 64 px with window 4 the maps are 16/8/4/2: stages 0-1 run shifted, masked windows,
    stage 2's window equals its map, stage 3's shrinks to it."""
    torch, timm = import_timm()
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    size = 64
    torch.manual_seed(size)
    g = SWIN_TEST_GEOMETRY
    reference = randomised(TimmSwin(img_size=size, patch_size=4, window_size=g["window_size"],
                                     embed_dim=g["embed_dim"], depths=g["depths"],
                                     num_heads=g["num_heads"], num_classes=g["num_classes"]))
    model = saitjax.create_model(NAME, img_size=size)
    params = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, model)
    assert max_logit_diff(reference, model, params, size) < 1e-4


@pytest.mark.torch
def test_official_layout_converts_identically(tmp_path):
    torch, timm = import_timm()
    from safetensors.numpy import save_file
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    torch.manual_seed(3)
    g = SWIN_TEST_GEOMETRY
    reference = randomised(TimmSwin(img_size=32, patch_size=4, window_size=4, embed_dim=g["embed_dim"],
                                     depths=g["depths"], num_heads=g["num_heads"], num_classes=10))
    timm_sd = {k: v.numpy() for k, v in reference.state_dict().items()}
    official = _official_layout(timm_sd)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    model = saitjax.create_model(NAME)
    expected = convert_state_dict(timm_sd, model)
    jax.tree.map(np.testing.assert_array_equal, expected, convert_state_dict(official, model))
    # the same through the CLI (safetensors: no torch needed to read it)
    save_file(official, str(tmp_path / "official.safetensors"))
    out = str(tmp_path / "swin.npz")
    assert convert_cli.main(["--src", str(tmp_path / "official.safetensors"), "--model", NAME, "--out", out]) == 0
    jax.tree.map(np.testing.assert_array_equal, expected, load_params(out))
    # a mixed-up checkpoint (official stage indices without the official marker) fails with a list
    broken = {k: v for k, v in official.items() if not k.startswith("layers.0.downsample.")}
    with pytest.raises(ConversionError, match="layers_2/downsample"):
        convert_state_dict(broken, model)


@pytest.mark.torch
@pytest.mark.extended  # full width / full size: pytest -m extended
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"])
def test_parity_with_timm_224(name):
    """timm.create_model(name) with random weights: logits within 1e-4 (measured 8e-7 / 1e-6); ~15 s each."""
    torch, timm = import_timm()
    torch.manual_seed(0)
    reference = randomised(timm.create_model(name, pretrained=False))
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert guess_model_name(state_dict) == name
    model = saitjax.create_model(name)
    params = convert_state_dict(state_dict, model, model_name=name)
    assert max_logit_diff(reference, model, params, 224) < 1e-4
