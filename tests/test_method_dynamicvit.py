"""DynamicViT method: each loss term against NumPy, config checks, and training on 8 devices."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import random_params
from train_fixtures import load_config, tiny_config, tiny_data

import saitjax
from saitjax import parallel, train
from saitjax.convert import save_params
from saitjax.methods import build_method
from saitjax.methods.dynamicvit import DynamicViTMethod, ratio_loss, token_distill_loss
from saitjax.sparsity import SparsitySpec

NAME = "dynamicvit_test_patch4_32"


def _config(**overrides):
    c = tiny_config(**{"model": NAME, "method": "dynamicvit", "init": "teacher.npz", "teacher": "init",
                       **overrides})
    c.method_kwargs.locations = (1, 2, 3)
    c.eval.densities = ("dense", "topk:0.7@1/2/3")
    return c


def _random_params(model, seed=0):
    """Random params from NumPy (no init compilation: faster on 2 cores)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        scale = path[-1].key == "scale"
        return rng.normal(1.0 if scale else 0.0, 0.1 if scale else 0.05, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _loss_and_outputs(method, model, params, teacher, images, targets, spec):
    """The method's loss and metrics, plus the same student and teacher forwards as inside the
    loss (same rngs), to recompute every term by hand."""
    key = jax.random.key(3)

    @jax.jit
    def run(p, t):
        loss, metrics = method.loss(p, images, targets, spec=spec, rng=key, teacher_params=t)
        dropout_rng, gumbel_rng = jax.random.split(key)
        student = model.apply({"params": p}, images, train=True, sparsity=spec,
                              rngs={"dropout": dropout_rng, "gumbel": gumbel_rng})
        return loss, metrics, student, model.apply({"params": t}, images, sparsity=SparsitySpec.dense())

    return run(params, teacher)


# ----------------------------------------------------------------------------------------------
# Pure loss terms
# ----------------------------------------------------------------------------------------------


def test_ratio_loss_matches_numpy():
    d1 = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)
    d2 = np.array([[1, 0, 0, 1], [0, 0, 0, 0]], np.float32)
    # stage 1: kept fractions 0.75, 0.25 vs 0.7; stage 2: 0.5, 0.0 vs 0.49
    expected = (((0.75 - 0.7) ** 2 + (0.25 - 0.7) ** 2) / 2 + ((0.5 - 0.49) ** 2 + (0.0 - 0.49) ** 2) / 2) / 2
    got = ratio_loss([jnp.asarray(d1), jnp.asarray(d2)], (0.7, 0.49))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="one keep ratio per stage"):
        ratio_loss([jnp.asarray(d1)], (0.7, 0.49))


def test_token_distill_loss_matches_numpy_and_ignores_pruned_tokens():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 3)).astype(np.float32), rng.normal(size=(2, 5, 3)).astype(np.float32)
    keep = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], np.float32)
    sq = ((s - t) ** 2).mean(-1)
    expected = (sq[0, 0] + sq[0, 2] + sq[1, 3]) / 3
    np.testing.assert_allclose(token_distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(keep)),
                               expected, rtol=1e-6)
    assert float(token_distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.zeros((2, 5)))) == 0.0
    g_s, g_t = jax.grad(token_distill_loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t), jnp.asarray(keep))
    assert not np.any(np.asarray(g_t))  # the teacher is a constant
    np.testing.assert_array_equal(np.abs(np.asarray(g_s)).sum(-1) > 0, keep > 0)


# ----------------------------------------------------------------------------------------------
# The method's loss, term by term
# ----------------------------------------------------------------------------------------------


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_method_loss_terms_equal_numpy():
    config = _config()
    model = saitjax.create_model(NAME, num_classes=4)
    method = build_method(config, model)
    assert isinstance(method, DynamicViTMethod) and method.uses_teacher
    images = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
    params = _random_params(model)
    rng = np.random.default_rng(9)  # a teacher that differs from the student, without predictors
    teacher = {k: jax.tree.map(lambda a: a + rng.normal(0, 0.05, a.shape).astype(np.float32), v)
               for k, v in params.items() if not k.startswith("predictor_")}
    targets = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 0, 1]), 4) * 0.9 + 0.1 / 4
    spec = method.train_sparsity(0)
    assert spec == SparsitySpec.hierarchical(0.7, (1, 2, 3), mode="mask")
    loss, metrics, (logits, aux), (t_logits, t_aux) = _loss_and_outputs(method, model, params, teacher, images,
                                                                        targets, spec)
    logits, t_logits, y = np.asarray(logits, np.float64), np.asarray(t_logits, np.float64), np.asarray(targets)
    cls = -(y * _log_softmax(logits)).sum(-1).mean()
    d = [np.asarray(x) for x in aux["decisions"]]
    ratio = np.mean([((x.mean(-1) - r) ** 2).mean() for x, r in zip(d, (0.7, 0.49, 0.343))])
    p_t = np.exp(_log_softmax(t_logits))
    kd = (p_t * (_log_softmax(t_logits) - _log_softmax(logits))).sum(-1).mean()
    sq = ((np.asarray(aux["tokens"])[:, 1:] - np.asarray(t_aux["tokens"])[:, 1:]) ** 2).mean(-1)
    tok = (sq * d[-1]).sum() / d[-1].sum()
    assert kd > 1e-4 and tok > 1e-4  # the teacher really differs
    np.testing.assert_allclose(metrics["loss_cls"], cls, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_ratio"], ratio, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_kd"], kd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["loss_token"], tok, rtol=1e-5)
    np.testing.assert_allclose(loss, cls + 2.0 * ratio + 0.5 * kd + 0.5 * tok, rtol=1e-5)
    for s in range(3):
        np.testing.assert_allclose(metrics[f"kept_fraction_{s}"], d[s].mean(), rtol=1e-6)


def test_method_config_errors():
    model = saitjax.create_model(NAME, num_classes=4)
    c = _config()
    c.method_kwargs.locations = (3, 6, 9)
    with pytest.raises(ValueError, match=r"locations=\(3, 6, 9\) but the model has predictors before blocks \(1, 2, 3\)"):
        build_method(c, model)
    with pytest.raises(ValueError, match="needs a DynamicViT model"):
        build_method(_config(), saitjax.create_model("vit_test_patch4_32"))
    with pytest.raises(ValueError, match="need a teacher"):
        build_method(_config(teacher=""), model)
    c = _config(teacher="")
    c.method_kwargs.update(distill_weight=0.0, token_distill_weight=0.0)
    assert not build_method(c, model).uses_teacher
    with pytest.raises(ValueError, match="not fields of method 'dynamicvit'"):
        c.method_kwargs.keep_rate = 0.7
        build_method(c, model)


def test_eval_densities_use_the_method_locations():
    c = _config()
    c.eval.densities = ("dense", "topk:0.7")
    method = build_method(c, saitjax.create_model(NAME, num_classes=4))
    assert [label for label, _ in method.eval_densities()] == ["dense", "topk:0.7/0.49/0.343@1/2/3"]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_xla")
def test_trains_on_eight_devices_from_a_dense_teacher(tmp_path):
    """A few steps on 8 devices, initialised from (and distilled by) a dense .npz; then evaluation."""
    assert jax.device_count() == 8
    dense = saitjax.create_model("vit_test_patch4_32", num_classes=4)
    dense_params = _random_params(dense, seed=7)
    teacher = save_params(str(tmp_path / "teacher.npz"), dense_params, model="vit_test_patch4_32")
    config = _config(init=teacher)
    config.model_kwargs.drop_path_rate = 0.0
    config.optim.lr_multipliers = ((r"^(?!predictor_)", 0.0),)  # only the predictors move
    mesh = parallel.make_mesh()
    run = train.Run(config, str(tmp_path / "w"), data=tiny_data(mesh, config), mesh=mesh)
    state = run.restore_or_init()
    start = jax.device_get(state.params)
    np.testing.assert_array_equal(start["blocks_1"]["attn"]["qkv"]["kernel"],
                                  dense_params["blocks_1"]["attn"]["qkv"]["kernel"])
    teacher_params = run.teacher_params()
    assert "predictor_0" not in teacher_params
    step_fn = run.jitted_train_step(donate=False)
    batches = run.data.train_batches(0)
    for step in range(3):
        state, metrics = step_fn(state, next(batches), teacher_params, run.method.train_sparsity(step))
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
    assert {"loss_cls", "loss_ratio", "loss_kd", "loss_token", "kept_fraction_0", "kept_fraction_2"} <= set(metrics)
    params = jax.device_get(state.params)
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"],
                                  start["blocks_1"]["attn"]["qkv"]["kernel"])
    assert not np.array_equal(params["predictor_0"]["in_fc"]["kernel"], start["predictor_0"]["in_fc"]["kernel"])
    evals = run.evaluate(state.params, 3)
    assert set(evals) == {"dense", "topk:0.7/0.49/0.343@1/2/3"}
    assert evals["topk:0.7/0.49/0.343@1/2/3"]["kept_fraction"] == pytest.approx(21 / 64)
    assert evals["dense"]["count"] == 40
    run.ckpt.close()


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def test_demo_config_needs_dense_weights():
    with pytest.raises(ValueError, match=r"configs/demo_dense.py.*init=DIR/export/params_step1560.npz"):
        load_config("dynamicvit_demo")
    c = load_config("dynamicvit_demo", "init=/tmp/dense.npz,epochs=1")
    assert (c.model, c.method, c.teacher) == ("dynamicvit_demo_patch8_64", "dynamicvit", "init")
    assert tuple(c.eval.densities) == ("dense", "topk:0.7@1/2/3")


@pytest.mark.parametrize("size", ["small", "base"])
def test_imagenet_config_recipe(size):
    from saitjax.optim import OptimizerConfig, param_groups_summary

    scratch = load_config("dynamicvit_deit_imagenet", f"model={size}")
    assert scratch.teacher == "" and scratch.method_kwargs.distill_weight == 0.0
    c = load_config("dynamicvit_deit_imagenet", f"model={size},init=deit.npz,rho=0.8")
    assert c.model == f"dynamicvit_deit_{size}_patch16_224" and c.teacher == "init"
    assert c.method_kwargs.ratio_weight == (5.0 if size == "base" else 2.0)
    assert c.model_kwargs.drop_path_rate == (0.2 if size == "base" else 0.0)
    assert tuple(c.eval.densities) == ("dense", "topk:0.8")
    assert train.optimizer_config(c, 100, 10, 2).lr == pytest.approx(1e-3)
    model = saitjax.create_model(c.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
    opt = train.optimizer_config(c, 300, 50, 10)
    assert isinstance(opt, OptimizerConfig) and dict(opt.frozen_until_step)[r"^(?!predictor_)"] == 50
    summary = param_groups_summary(opt, shapes)
    total = sum(x.size for x in jax.tree.leaves(shapes))
    predictors = sum(x.size for k, v in shapes.items() if k.startswith("predictor_") for x in jax.tree.leaves(v))
    frozen = shapes["cls_token"].size + shapes["pos_embed"].size
    assert f"lr x0.01: {(total - predictors - frozen) / 1e6:.2f}M" in summary


# ----------------------------------------------------------------------------------------------
# Hierarchical models (ConvNeXt, Swin): the same method, the official hierarchical loss
# ----------------------------------------------------------------------------------------------

SPATIAL = "dynamicvit_swin_test_patch4_window4_64"


def _spatial_config(**overrides):
    c = tiny_config(**{"model": SPATIAL, "method": "dynamicvit", "init": "teacher.npz", "teacher": "init",
                       "data.image_size": 64, **overrides})
    c.method_kwargs.update(locations=(1, 2, 3), ratio_weight=10.0)  # the official hierarchical weights
    c.eval.densities = ("dense", saitjax.create_model(SPATIAL).keep_schedule(0.7).describe())
    return c


@pytest.mark.parametrize("name", [pytest.param("dynamicvit_convnext_test", marks=pytest.mark.extended), SPATIAL])
def test_hierarchical_loss_terms_equal_numpy(name):
    """Ratio targets rho, rho - 0.2, rho - 0.4 (float64 arithmetic), KL to the teacher, and the MSE of
    the final normed map over *every* location (not only the slow ones)."""
    config = _spatial_config(model=name)
    model = saitjax.create_model(name, num_classes=4)
    method = build_method(config, model)
    spec = method.train_sparsity(0)
    assert spec.keep_ratios == (0.7, 0.7 - 0.2, 0.7 - 0.4) and spec.mode == "mask"
    images = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
    params = jax.tree.map(jnp.asarray, random_params(model))
    rng = np.random.default_rng(9)
    backbone_only = lambda tree: {k: backbone_only(v) if isinstance(v, dict) else v  # noqa: E731
                                  for k, v in tree.items() if not k.startswith("predictor_") and k != "fast_path"}
    teacher = jax.tree.map(lambda a: a + rng.normal(0, 0.05, a.shape).astype(np.float32), backbone_only(params))
    targets = jax.nn.one_hot(jnp.array([0, 1, 2]), 4) * 0.9 + 0.1 / 4
    loss, metrics, (logits, aux), (t_logits, t_aux) = _loss_and_outputs(method, model, params, teacher, images,
                                                                        targets, spec)
    logits, t_logits, y = np.asarray(logits, np.float64), np.asarray(t_logits, np.float64), np.asarray(targets)
    cls = -(y * _log_softmax(logits)).sum(-1).mean()
    d = [np.asarray(x) for x in aux["decisions"]]
    assert [x.shape for x in d] == [(3, 16)] * 3  # the 4x4 stage-3 map
    ratio = np.mean([((x.mean(-1) - r) ** 2).mean() for x, r in zip(d, (0.7, 0.5, 0.3))])
    p_t = np.exp(_log_softmax(t_logits))
    kd = (p_t * (_log_softmax(t_logits) - _log_softmax(logits))).sum(-1).mean()
    tok = ((np.asarray(aux["tokens"]) - np.asarray(t_aux["tokens"])) ** 2).mean()  # every location
    assert kd > 1e-4 and tok > 1e-4
    np.testing.assert_allclose(metrics["loss_cls"], cls, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_ratio"], ratio, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_kd"], kd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["loss_token"], tok, rtol=1e-5)
    np.testing.assert_allclose(loss, cls + 10.0 * ratio + 0.5 * kd + 0.5 * tok, rtol=1e-5)
    c = _spatial_config(model=name)
    c.method_kwargs.rho = 0.4
    with pytest.raises(ValueError, match=r"method_kwargs.rho=0.4.*use rho > 0.4"):
        build_method(c, model)


@pytest.mark.extended  # ~60 s; the 8-device ViT DynamicViT run, the hierarchical loss terms and
@pytest.mark.usefixtures("fast_xla")  # test_dynamicvit_spatial's training tests stay in the default run
def test_hierarchical_model_trains_on_eight_devices(tmp_path):
    """DynamicViT-Swin from a dense Swin .npz (no predictors, no fast paths): a training step on 8 devices
    (evaluation of the routed model: the single-device tests)."""
    dense_name = "swin_test_patch4_window4_32"
    dense = saitjax.create_model(dense_name, img_size=64, depths=(2, 2, 4, 2), num_classes=4)
    dense_params = random_params(dense, seed=7)
    teacher = save_params(str(tmp_path / "teacher.npz"), dense_params, model=SPATIAL)
    config = _spatial_config(init=teacher)
    config.model_kwargs.drop_path_rate = 0.1
    mesh = parallel.make_mesh()
    run = train.Run(config, str(tmp_path / "w"), data=tiny_data(mesh, config), mesh=mesh)
    state = run.restore_or_init()
    teacher_params = run.teacher_params()
    assert "predictor_0" not in teacher_params and "fast_path" not in teacher_params["layers_2"]["blocks_3"]
    step_fn = run.jitted_train_step(donate=False)
    batches = run.data.train_batches(0)
    start = jax.device_get(state.params)
    for step in range(2):  # the warm-up's learning rate is 0 at step 0
        state, metrics = step_fn(state, next(batches), teacher_params, run.method.train_sparsity(step))
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
    assert {"loss_ratio", "loss_kd", "loss_token", "kept_fraction_2"} <= set(metrics)
    params = jax.device_get(state.params)
    assert not np.array_equal(params["layers_2"]["blocks_3"]["fast_path"]["fc"]["kernel"],
                              start["layers_2"]["blocks_3"]["fast_path"]["fc"]["kernel"])
    run.ckpt.close()


@pytest.mark.parametrize("model,locations,drop_path", [("convnext_tiny", (1, 2, 3), 0.2), ("swin_base", (2, 4, 6), 0.5)])
def test_hierarchical_imagenet_config_recipe(model, locations, drop_path):
    from saitjax.optim import param_groups_summary

    c = load_config("dynamicvit_spatial_imagenet", f"model={model},init=dense.npz,rho=0.7")
    assert c.model.startswith("dynamicvit_") and c.teacher == "init" and c.model_kwargs.drop_path_rate == drop_path
    assert tuple(c.method_kwargs.locations) == locations and c.method_kwargs.ratio_weight == 10.0
    assert tuple(c.eval.densities) == ("dense", "topk:0.7/0.49999999999999994/0.29999999999999993@"
                                       + "/".join(map(str, locations)))
    assert train.optimizer_config(c, 100, 10, 2).lr == pytest.approx(4e-3 * c.batch_size / 4096)
    net = saitjax.create_model(c.model)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
    opt = train.optimizer_config(c, 300, 50, 10)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    new = sum(x.size for path, x in flat if "predictor_" in jax.tree_util.keystr(path)
              or "fast_path" in jax.tree_util.keystr(path))
    total = sum(x.size for _, x in flat)
    assert f"lr x0.2: {(total - new) / 1e6:.2f}M" in param_groups_summary(opt, shapes)
    with pytest.raises(ValueError, match="choose one of"):
        load_config("dynamicvit_spatial_imagenet", "model=convnext_huge")


def test_hierarchical_demo_configs():
    with pytest.raises(ValueError, match=r"demo_dense.py:model=swin_demo_patch2_window4_64.*init="):
        load_config("dynamicvit_spatial_demo")
    c = load_config("dynamicvit_spatial_demo", "init=/tmp/dense.npz")
    assert (c.model, c.method, c.teacher) == ("dynamicvit_swin_demo_patch2_window4_64", "dynamicvit", "init")
    model = saitjax.create_model(c.model)
    assert model.routed_locations == 64 and model.slow_counts(model.default_sparsity()) == (44, 31, 19)
    assert tuple(c.eval.densities) == ("dense", model.keep_schedule(0.7).describe())
    dense = load_config("demo_dense", "model=swin_demo_patch2_window4_64")
    assert dense.model == "swin_demo_patch2_window4_64" and dense.model_kwargs.num_classes == 8
    with pytest.raises(ValueError, match="the dense demos are"):
        load_config("demo_dense", "model=convnext_tiny")
