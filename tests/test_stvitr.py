"""STViT-R on Swin: parity with a PyTorch reference of the official code (converted through the CLI,
BatchNorm statistics included), semantic-token counts, features, parameter counts and FLOPs against
the official logs, training-mode BatchNorm, the variables API of the converter, and errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.convert import (ConversionError, convert_state_dict, convert_variables, guess_model_name, load_params,
                             load_variables, read_npz, read_npz_variables, save_params, save_variables,
                             stateful_collections)
from saitjax.convert.timm_deit import expected_param_shapes, expected_variable_shapes
from saitjax.flops import analytic_gmacs
from saitjax.models.stvitr import STViTRSwin, neighbourhood_starts
from saitjax.tools import convert as convert_cli

NAME = "stvitr_test_patch4_window7_224"
SIZES = ("tiny", "small", "base")
# XLA:CPU without its expensive passes: ~3x faster compiles of these 224-px models, same numbers
# to well within the tolerances (fp32 throughout).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _random_variables(model, seed=0):
    """Random params and non-trivial running statistics from NumPy (no init compilation)."""
    images = jnp.zeros((1, model.img_size, model.img_size, model.in_chans))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        key = path[-1].key
        if key in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
        if key.startswith("layer_scale"):
            return jnp.asarray(rng.uniform(0.3, 1.0, x.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.05, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


# -- geometry ------------------------------------------------------------------------------------

def test_neighbourhoods_are_the_official_unfold_at_224():
    # F.unfold(kernel 10, stride 4) on the 14x14 stage-3 map starts at 0 and 4 on each axis
    assert neighbourhood_starts(14, 7, 10) == tuple(range(0, 14 - 10 + 1, 4)) == (0, 4)
    # our generalisation elsewhere: a 10-box around each window, kept inside the map
    assert neighbourhood_starts(28, 7, 10) == (0, 6, 13, 18)
    assert neighbourhood_starts(7, 7, 10) == (0,)  # one window: the whole map


@pytest.mark.parametrize("sample,count", [(3, 36), (4, 64)])
def test_semantic_token_count_is_static_and_as_configured(sample, count):
    """9 (official build) or 16 (the paper's) semantic tokens per 7x7 window, 4 windows at 224 px."""
    model = saitjax.create_model("stvitr_swin_small_patch4_window7_224", sample_window_size=sample)
    assert model.num_semantic_tokens == count == 4 * sample ** 2
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    _, aux = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    assert [z.shape for z in aux["semantic_tokens"]] == [(2, count, 384)] * 3  # one per group of six layers
    assert [a.shape for a in aux["semantic_attention"]] == [(2, count, 14, 14)] * 3
    assert [a.shape for a in aux["semantic_global_attention"]] == [(2, count, 14, 14)] * 3
    assert [f.shape for f in aux["features"]] == [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384),
                                                  (2, 7, 7, 768)]
    assert aux["tokens"].shape == (2, 49, 768)


@pytest.mark.parametrize("size,count,published", [("small", 49_625_518, 49.6), ("base", 87_812_336, 87.8)])
def test_parameter_counts_equal_the_official_model(size, count, published):
    """The official logs' fvcore tables: 49.626M (log/small.txt), 87.812M (log/base.txt); README:
    49.6 M / 87.8 M. The reference's ``sum(p.numel())`` equals ours in the slow parity tests (T, S)."""
    model = saitjax.create_model(f"stvitr_swin_{size}_patch4_window7_224")
    shapes = expected_variable_shapes(model)
    assert sum(int(np.prod(s)) for s in shapes["params"].values()) == count
    assert round(count / 1e6, 1) == published
    assert set(shapes) == {"params", "batch_stats"} and stateful_collections(model) == ("batch_stats",)
    assert sum(int(np.prod(s)) for s in shapes["batch_stats"].values()) == 3 * model.embed_dim  # mean, var of C/2 + C
    assert expected_param_shapes(model) == shapes["params"]


def _fvcore_norm_elements(model) -> int:
    """Elements normalised in one forward, per LayerNorm/BatchNorm call of the official code (fvcore
    counts 5 FLOPs per element with affine; our MACs, like Swin's, leave norms out)."""
    c0, res = model.embed_dim, model.stage_resolutions
    total = (c0 // 2) * (model.img_size // 2) ** 2 + c0 * res[0] ** 2  # the stem's two BNs
    for i, (r, c, depth) in enumerate(zip(res, model.stage_dims, model.depths)):
        n = r * r
        total += n * 2 * c if i else 0  # PatchMerging LayerNorm(4 C_{i-1})
        if i != 2:
            total += depth * 2 * n * c
            continue
        s, ns, nw = model.num_semantic_tokens, model.sample_window_size ** 2, (r // 7) ** 2
        group = (2 * n  # Swin block
                 + s + nw * (ns + 100) + s  # generation: norm1(Z0), norm1([Z0; unfold]), norm2
                 + s + (s + n) + s  # global update: norm1(Z), norm1([Z; X]), norm2
                 + 2 * s  # local: norm1, norm2
                 + 3 * s  # global: norm1(x), norm1(y) (called twice), norm2
                 + n + s + n)  # recovery: norm1(X), norm1(Z), norm2
        total += depth // 6 * group * c
    return total + res[-1] ** 2 * model.stage_dims[-1]  # final norm


@pytest.mark.parametrize("size,published", [("small", 5.826), ("base", 10.264)])
def test_analytic_flops_match_the_official_fvcore_count(size, published):
    """Official logs (fvcore FlopCountAnalysis, 224 px): 5.826 G (log/small.txt), 10.264 G
    (log/base.txt); README 5.83 / 10.26. Our analytic MACs (convs, linear layers, attention
    products) are 5.799 / 10.227; the difference is exactly the norms fvcore also counts (to the
    log's three decimals), so every matmul term is accounted for."""
    model = saitjax.create_model(f"stvitr_swin_{size}_patch4_window7_224")
    gmacs = analytic_gmacs(model)
    assert abs(gmacs - published) < 0.05
    assert abs(gmacs + 5 * _fvcore_norm_elements(model) / 1e9 - published) < 5e-4
    swin = analytic_gmacs(saitjax.create_model(f"swin_{size}_patch4_window7_224"))
    assert gmacs / swin < 0.68  # Swin-S 8.74 -> 5.80, Swin-B 15.43 -> 10.23


def test_other_resolutions_and_clear_errors():
    # 448 px: a 28x28 stage-3 map, 16 windows; the neighbourhoods are our generalisation
    model = saitjax.create_model(NAME, img_size=448)
    assert model.num_semantic_tokens == 16 * 9
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0][1],
                         jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32))
    assert out["semantic_tokens"][0].shape == (1, 144, 128)
    with pytest.raises(ValueError, match=r"groups of 6 layers.*depths=\(2, 2, 4, 2\)"):
        saitjax.create_model(NAME, depths=(2, 2, 4, 2)).analytic_macs()
    with pytest.raises(ValueError, match=r"sample_window_size=8 must lie in \[1, 7\]"):
        saitjax.create_model(NAME, sample_window_size=8).analytic_macs()
    with pytest.raises(ValueError, match=r"img_size=256.*multiple of .*= 224"):
        saitjax.create_model(NAME, img_size=256).analytic_macs()


def test_registry():
    assert saitjax.list_models("stvitr_*") == ["stvitr_swin_base_patch4_window7_224",
                                               "stvitr_swin_small_patch4_window7_224",
                                               "stvitr_swin_tiny_patch4_window7_224", NAME]
    assert saitjax.list_models(tag="stvitr_test") == [NAME] and NAME not in saitjax.list_models(tag="test")
    model = saitjax.create_model("stvitr_swin_small_patch4_window7_224")
    assert isinstance(model, STViTRSwin) and (model.sample_window_size, model.use_global) == (3, False)


# -- training mode ---------------------------------------------------------------------------------

def test_train_mode_updates_batch_stats():
    model = saitjax.create_model(NAME, drop_path_rate=0.1)
    variables = _random_variables(model)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 224, 224, 3)), jnp.float32)

    def train_forward(v, rng):
        return model.apply(v, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng})

    (logits, aux), updates = _compiled(train_forward, variables, jax.random.key(0))(variables, jax.random.key(0))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert aux["semantic_tokens"][0].shape == (2, 36, 128)
    old, new = variables["batch_stats"]["patch_embed"], updates["batch_stats"]["patch_embed"]
    for conv in ("proj_0", "proj_2"):
        for stat in ("mean", "var"):
            assert new[conv]["bn"][stat].shape == old[conv]["bn"][stat].shape
            assert not np.allclose(new[conv]["bn"][stat], old[conv]["bn"][stat])
    # PyTorch's momentum 0.1: running mean <- 0.9 running mean + 0.1 batch mean of the conv output
    kernel = variables["params"]["patch_embed"]["proj_0"]["c"]["kernel"]
    conv = jax.lax.conv_general_dilated(images, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(new["proj_0"]["bn"]["mean"], 0.9 * old["proj_0"]["bn"]["mean"]
                               + 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="batch_stats"):
        model.apply({"params": variables["params"]}, images)  # eval needs the statistics


# -- conversion API ----------------------------------------------------------------------------------

def test_variables_api_and_npz_storage(tmp_path):
    model = saitjax.create_model(NAME)
    variables = jax.tree.map(np.asarray, _random_variables(model))
    path = save_variables(str(tmp_path / "v.npz"), variables, model=NAME)
    restored, meta = read_npz_variables(path)
    assert meta["collections"] == ["params", "batch_stats"]
    jax.tree.map(np.testing.assert_array_equal, variables, restored)
    jax.tree.map(np.testing.assert_array_equal, variables, load_variables(path))
    assert set(read_npz(path)[0]) == set(variables["params"])  # params only, as before
    with pytest.raises(ConversionError, match="load_variables"):
        load_params(path)  # would drop the statistics
    # a params-only file of a BN model: strict load names the missing statistics
    save_params(str(tmp_path / "p.npz"), variables["params"], model=NAME)
    with pytest.raises(ConversionError, match="missing batch_stats entry patch_embed/proj_0/bn/mean"):
        load_variables(str(tmp_path / "p.npz"))
    assert load_variables(str(tmp_path / "p.npz"), strict=False)["batch_stats"] == {}
    # params-only models: old files and API unchanged
    vit = saitjax.create_model("vit_test_patch4_32")
    params = jax.tree.map(np.asarray, _random_variables(vit)["params"])
    old = save_params(str(tmp_path / "vit.npz"), params, model="vit_test_patch4_32")
    assert "collections" not in read_npz(old)[1] and set(load_variables(old)) == {"params"}
    jax.tree.map(np.testing.assert_array_equal, params, load_params(old))


def test_convert_state_dict_refuses_bn_models_and_lists_missing_stats():
    model = saitjax.create_model(NAME)
    with pytest.raises(ConversionError, match=r"batch_stats.*convert_variables"):
        convert_state_dict({}, model, model_name=NAME)
    state_dict = {"patch_embed.proj.0.bn.weight": np.ones(16, np.float32),
                  "patch_embed.proj.0.bn.running_mean": np.zeros(16, np.float32),
                  "patch_embed.proj.0.bn.num_batches_tracked": np.zeros((), np.int64)}
    with pytest.raises(ConversionError) as err:
        convert_variables(state_dict, model, model_name=NAME)
    assert "batch_stats:patch_embed/proj_2/bn/var" in str(err.value) or "more" in str(err.value)
    partial = convert_variables(state_dict, model, strict=False)
    assert set(partial["batch_stats"]["patch_embed"]["proj_0"]["bn"]) == {"mean"}
    assert set(partial["params"]["patch_embed"]["proj_0"]["bn"]) == {"scale"}


# -- parity with the PyTorch reference ------------------------------------------------------------------

def _reference(torch, model, seed=0, use_global=False):
    """The reference at ``model``'s geometry with every parameter random, layer scales far from
    1e-5 (so the semantic branch matters) and non-trivial BN running statistics."""
    from stvitr_reference import STViTR

    torch.manual_seed(seed)
    ref = STViTR(img_size=model.img_size, embed_dim=model.embed_dim, depths=tuple(model.depths),
                 num_heads=tuple(model.num_heads), num_classes=model.num_classes,
                 sample_window_size=model.sample_window_size, use_global=use_global)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.3, 1.0)
            else:
                p.add_(torch.randn_like(p) * 0.02)
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return ref.eval()


def _compare(torch, ref, model, variables, seed=0):
    images = np.random.default_rng(seed).normal(size=(2, model.img_size, model.img_size, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    apply = _compiled(model.apply, variables, images)
    logits, aux = apply(variables, images)
    return float(np.abs(np.asarray(logits) - expected).max()), images, logits, aux, apply


@pytest.mark.torch
def test_parity_with_the_reference_through_the_cli(tmp_path, capsys):
    """An official-layout ``{"model": state_dict}`` .pth of the test size converts through the CLI
    (params and BN statistics) and gives the reference's logits within 1e-4 (measured 2e-7)."""
    from timm_reference import import_timm

    torch, _ = import_timm()
    model = saitjax.create_model(NAME)
    ref = _reference(torch, model)
    state_dict = ref.state_dict()
    assert {"patch_embed.proj.0.c.weight", "patch_embed.proj.2.bn.running_var", "layers.2.blocks.1.attn.q.weight",
            "layers.2.blocks.3.attn.kv.weight", "layers.2.blocks.5.layer_scale_2", "layers.1.downsample.norm.weight",
            "layers.0.blocks.1.attn_mask", "patch_embed.proj.0.bn.num_batches_tracked"} <= set(state_dict)
    torch.save({"model": state_dict, "epoch": 299}, tmp_path / "stvitr.pth")
    out = str(tmp_path / "stvitr.npz")
    assert convert_cli.main(["--src", str(tmp_path / "stvitr.pth"), "--model", NAME, "--out", out]) == 0
    assert f"{NAME}, 3,086,638 parameters, 96 batch_stats values" in capsys.readouterr().out
    assert sum(p.numel() for p in ref.parameters()) == 3_086_638
    variables = load_variables(out)
    np.testing.assert_array_equal(variables["batch_stats"]["patch_embed"]["proj_2"]["bn"]["var"],
                                  state_dict["patch_embed.proj.2.bn.running_var"].numpy())
    diff, images, logits, aux, apply = _compare(torch, ref, model, variables)
    assert diff < 1e-4

    # what the semantic tokens attend to: the global update's attention equals the reference's ...
    probs = ref.layers[2].semantic_probs[0].mean(1)[:, :, 36:].numpy()
    np.testing.assert_allclose(np.asarray(aux["semantic_global_attention"][0]).reshape(2, 36, 196), probs, atol=1e-6)
    # ... and the generation layer's lies on each window's official 10x10 unfold patch
    gen = ref.layers[2].blocks[1].attn.last_probs.mean(1)[:, :, 9:].numpy()  # [B*4, 9, 100]
    maps = np.asarray(aux["semantic_attention"][0]).reshape(2, 2, 3, 2, 3, 14, 14).transpose(0, 1, 3, 2, 4, 5, 6)
    patches = torch.nn.functional.unfold(torch.from_numpy(maps.reshape(2 * 4 * 9, 1, 14, 14)), 10, stride=4)
    patches = patches.numpy().reshape(2, 4, 9, 100, 4)
    picked = np.stack([patches[:, w, :, :, w] for w in range(4)], axis=1).reshape(8, 9, 100)
    np.testing.assert_allclose(picked, gen, atol=1e-6)
    np.testing.assert_allclose(maps.sum((-1, -2)).reshape(8, 9), gen.sum(-1), atol=1e-6)

    # the semantic branch matters: without the generation layer's output the logits move
    params = jax.tree.map(lambda x: x, variables["params"])
    params["layers_2"]["blocks_1"]["layer_scale_1"] = jnp.zeros_like(params["layers_2"]["blocks_1"]["layer_scale_1"])
    moved = apply({**variables, "params": params}, images)[0]
    assert float(np.abs(np.asarray(moved) - np.asarray(logits)).max()) > 1e-2
    assert guess_model_name({k: v.numpy() for k, v in state_dict.items()}) is None  # test width: not registered


@pytest.mark.torch
@pytest.mark.extended  # full width / full size: pytest -m extended
def test_parity_with_16_tokens_per_window_and_global_init():
    """``sample_window_size=4`` (the paper's 16 per window; local attention on 4x4 groups of an 8x8
    grid) with ``use_global=True`` (``layers.2.semantic_token2`` on the first update's queries)."""
    from timm_reference import import_timm

    torch, _ = import_timm()
    model = saitjax.create_model(NAME, sample_window_size=4, use_global=True)
    ref = _reference(torch, model, seed=1, use_global=True)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert state_dict["layers.2.semantic_token2"].shape == (1, 64, 128)
    diff = _compare(torch, ref, model, convert_variables(state_dict, model), seed=1)[0]
    assert diff < 1e-4


@pytest.mark.torch
@pytest.mark.extended  # full width / full size: pytest -m extended
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_parity_at_full_width(size):
    """Swin-T (one group) and Swin-S (three groups) layouts at full width, random weights: logits
    within 1e-4 (measured 1.5e-6 / 1.3e-6, logits up to 2.4); the reference's parameter count."""
    from timm_reference import import_timm

    torch, _ = import_timm()
    name = f"stvitr_swin_{size}_patch4_window7_224"
    model = saitjax.create_model(name)
    ref = _reference(torch, model, seed=2)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert guess_model_name(state_dict) == name
    count = sum(p.numel() for p in ref.parameters())
    assert count == sum(int(np.prod(s)) for s in expected_param_shapes(model).values())
    assert count == {"tiny": 28_320_214, "small": 49_625_518}[size]
    diff = _compare(torch, ref, model, convert_variables(state_dict, model, model_name=name))[0]
    print(f"{name}: {count:,} parameters, max |logit diff| {diff:.2e}")
    assert diff < 1e-4
