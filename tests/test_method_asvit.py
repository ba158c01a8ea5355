"""AS-ViT training: the budget loss by hand, threshold gradients, and a short run through the trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saitjax
from saitjax import parallel, train
from saitjax.convert import save_params
from saitjax.methods.asvit import budget_loss
from saitjax.models.asvit import threshold_params
from saitjax.sparsity import SparsitySpec

from train_fixtures import load_config, tiny_config, tiny_data

MODEL = "asvit_test_patch4_32"  # width 32, 4 blocks, 64 patches of 4x4x3, 10 classes; pruning before 1, 2, 3


def _hand_gmacs(stage_counts, scoring=True):
    """MACs of the test model by hand: 12 n C^2 + 2 n^2 C per block (CLS included), embedding, head,
    and the head-importance norms (one per token and channel) of the 3 scoring blocks."""
    c, blocks = 32, []
    n = 64
    for block in range(4):
        if block in (1, 2, 3):
            n = stage_counts[block - 1]
        blocks.append(12 * (n + 1) * c ** 2 + 2 * (n + 1) ** 2 * c)
    return (64 * c * 4 * 4 * 3 + sum(blocks) + c * 10 + (3 * 65 * c if scoring else 0)) / 1e9


def test_budget_loss_equals_a_hand_computation():
    model = saitjax.create_model(MODEL)
    spec = SparsitySpec.learned(1.0, (1, 2, 3), mode="mask")
    counts = [(40, 30, 20), (64, 50, 10)]
    decisions = [jnp.array([[1.0] * counts[b][s] + [0.0] * (64 - counts[b][s]) for b in range(2)]) for s in range(3)]
    loss, per_image = budget_loss(model, spec, decisions, base_rate=0.65)
    expected = [_hand_gmacs(c) for c in counts]
    np.testing.assert_allclose(np.asarray(per_image), expected, rtol=1e-6)
    np.testing.assert_allclose(float(loss), abs(np.mean(expected) - 0.65 * _hand_gmacs((64, 64, 64), scoring=False)),
                               rtol=0, atol=1e-6 * expected[0])  # float32 GMACs


@pytest.mark.parametrize("base_rate, direction", [(0.2, -1), (1.0, +1)])
def test_threshold_gradients_move_the_kept_count_toward_the_budget(base_rate, direction):
    """Over budget, descending the budget loss raises the thresholds (fewer tokens); under, lowers them."""
    model = saitjax.create_model(MODEL, threshold_init=(0.012, 0.016, 0.02))
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    params = jax.tree_util.tree_map_with_path(  # peaky attention: scores spread around the thresholds
        lambda path, v: v * 6.0 if "qkv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
        else v, params)
    spec = SparsitySpec.learned(1.0, (1, 2, 3), mode="mask")

    def loss_and_gmacs(p):
        _, aux = model.apply({"params": p}, images, train=True, sparsity=spec, rngs={"dropout": jax.random.key(2)})
        loss, per_image = budget_loss(model, spec, aux["decisions"], base_rate)
        return loss, jnp.mean(per_image)

    (loss, gmacs), grads = jax.jit(jax.value_and_grad(loss_and_gmacs, has_aux=True))(params)
    g = {name: float(v) for name, v in threshold_params(grads).items()}
    assert any(v != 0.0 for v in g.values()), g
    # The last threshold only decides its own stage: dL/dtheta has the sign of the count's move.
    # (Earlier ones also act through later scores: fewer keys raise the survivors' attention.)
    assert np.sign(g["score_predictor_2"]) == direction, g
    eta = 5e-4 / max(abs(v) for v in g.values())  # a small gradient step of the thresholds alone
    moved = {**params, **{name: {"keep_threshold": params[name]["keep_threshold"] - eta * v} for name, v in g.items()}}
    loss_after, gmacs_after = jax.jit(loss_and_gmacs)(moved)
    assert float(loss_after) < float(loss)
    assert np.sign(float(gmacs_after) - float(gmacs)) == direction  # fewer kept tokens over budget, more under


@pytest.mark.usefixtures("fast_xla")
def test_asvit_trains_its_thresholds_in_the_trainer(tmp_path):
    mesh = parallel.make_mesh()
    dense = saitjax.create_model("vit_test_patch4_32", num_classes=4)
    params = jax.jit(dense.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    init = save_params(str(tmp_path / "dense.npz"), jax.device_get(params), model="vit_test_patch4_32")
    config = tiny_config(model=MODEL, method="asvit", init=init, teacher="init", train_steps=6)
    config.model_kwargs.threshold_init = (0.012, 0.016, 0.02)
    config.method_kwargs.update(base_rate=0.3, ratio_weight=2.0, distill_weight=0.5)
    config.optim.lr_multipliers = ((r"^score_predictor_", 3.0),)
    config.eval.densities = ("dense", "learned:1@1/2/3")
    out = train.train_and_evaluate(config, str(tmp_path / "w"), data=tiny_data(mesh, config), mesh=mesh)
    assert set(out["eval"]) == {"dense", "learned:1@1/2/3"}
    assert np.isfinite(out["eval"]["learned:1@1/2/3"]["loss"])
    learned = saitjax.load_params(sorted((tmp_path / "w" / "export").glob("*.npz"))[-1].as_posix(), MODEL, num_classes=4)
    moved = [float(v) for v in threshold_params(learned).values()]
    assert moved != pytest.approx([0.012, 0.016, 0.02], abs=1e-6), "the thresholds should have been trained"


def test_asvit_configs_build():
    for arg in ("model=tiny,init=deit_t.npz", "model=small", "model=base,init=deit_b.npz,budget=0.7"):
        config = load_config("asvit_deit_imagenet", arg)
        assert config.method == "asvit" and config.model.startswith("asvit_deit_")
        assert tuple(config.model_kwargs.pruning_loc) == (4, 7, 10)
    demo = load_config("asvit_demo", "init=/tmp/d.npz")
    assert demo.teacher == "init" and demo.method_kwargs.base_rate == 0.6
    with pytest.raises(ValueError, match="configs/demo_dense.py"):
        load_config("asvit_demo")
    with pytest.raises(ValueError, match="needs an AS-ViT model"):
        cfg = tiny_config(method="asvit")
        cfg.method_kwargs.distill_weight = 0.0
        from saitjax.config import validate
        validate(cfg)
