"""Tests for saitjax.optim: schedule values, linear lr scaling and the parameter groups."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saitjax.optim import (OptimizerConfig, make_optimizer, make_schedule, param_groups_summary,
                           scaled_lr)

LR, WD = 1e-3, 0.05


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    return {
        "blocks_0": {"attn": {"qkv": {"kernel": jax.random.normal(k[0], (4, 12)),
                                      "bias": jax.random.normal(k[1], (12,))}}},
        "cls_token": jax.random.normal(k[2], (1, 1, 4)),
        "norm": {"scale": 1.0 + jax.random.normal(k[3], (4,)),
                 "bias": jax.random.normal(k[4], (4,))},
        "predictor_0": {"fc": {"kernel": jax.random.normal(k[5], (4, 2))}},
    }


def _config(**kw):
    kw.setdefault("lr", LR)
    kw.setdefault("total_steps", 100)
    kw.setdefault("min_lr", 0.0)
    kw.setdefault("weight_decay", WD)
    return OptimizerConfig(**kw)


def _run(config, params, grads, steps=1, jit=False):
    """Apply ``steps`` steps with fixed ``grads``; returns (params, list of updates, state)."""
    tx, _ = make_optimizer(config, params)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    history = []
    for _ in range(steps):
        updates, state = update(grads, state, params)
        history.append(updates)
        params = optax.apply_updates(params, updates)
    return params, history, state


def _ones(params):
    return jax.tree.map(jnp.ones_like, params)


# ---------------------------------------------------------------- schedule and scaling

def test_cosine_schedule_values():
    s = make_schedule(base_lr=1e-3, total_steps=110, warmup_steps=10, min_lr=1e-5,
                      warmup_init_lr=1e-6)
    # optax interpolates as (start - end) * frac + end in float32: exact to 1e-6 of the peak lr
    np.testing.assert_allclose(s(0), 1e-6, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s(5), 1e-6 + (1e-3 - 1e-6) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(s(10), 1e-3, rtol=1e-6)           # end of warm-up: peak
    np.testing.assert_allclose(s(60), (1e-3 + 1e-5) / 2, rtol=1e-6)  # half-way through the cosine
    np.testing.assert_allclose(s(85), 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.75)),
                               rtol=1e-5)
    np.testing.assert_allclose(s(110), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(s(1000), 1e-5, rtol=1e-6)          # stays at min_lr afterwards
    np.testing.assert_allclose(jax.jit(s)(jnp.int32(60)), (1e-3 + 1e-5) / 2, rtol=1e-6)


def test_linear_and_constant_schedules():
    lin = make_schedule(base_lr=1.0, total_steps=10, decay="linear", min_lr=0.2)
    np.testing.assert_allclose([lin(0), lin(5), lin(10)], [1.0, 0.6, 0.2], rtol=1e-6)
    const = make_schedule(base_lr=2.0, total_steps=10, warmup_steps=4, decay="constant")
    np.testing.assert_allclose([const(0), const(2), const(4), const(10)], [0.0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize("kw, match", [
    (dict(total_steps=0), "total_steps"),
    (dict(warmup_steps=200), "warmup_steps"),
    (dict(base_lr=-1.0), "base_lr"),
    (dict(min_lr=-1e-6), "min_lr"),
    (dict(warmup_init_lr=-1.0), "warmup_init_lr"),
    (dict(min_lr=1.0), "min_lr"),
    (dict(decay="step"), "decay"),
])
def test_schedule_errors(kw, match):
    args = dict(base_lr=1e-3, total_steps=100) | kw
    with pytest.raises(ValueError, match=match):
        make_schedule(**args)


def test_scaled_lr():
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 512) == pytest.approx(5e-4)
    with pytest.raises(ValueError):
        scaled_lr(5e-4, 0)


# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("kw, match", [
    (dict(lr=0.0), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(grad_clip_norm=-1.0), "grad_clip_norm"),
    (dict(lr_multipliers=(("blocks", -1.0),)), "multiplier"),
    (dict(frozen_until_step=(("blocks", -3),)), "frozen_until_step"),
    (dict(frozen=("blocks[",)), "invalid regex"),
    (dict(total_steps=10, warmup_steps=20), "warmup_steps"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_config_accepts_lists_and_dicts():
    cfg = _config(frozen=["cls_token"], lr_multipliers={"blocks": 0.1})
    assert cfg.frozen == ("cls_token",) and cfg.lr_multipliers == (("blocks", 0.1),)
    hash(cfg)


@pytest.mark.parametrize("field, value", [
    ("frozen", ("blocks_9",)),
    ("lr_multipliers", (("^backbone", 0.01),)),
    ("frozen_until_step", (("predicter", 10),)),
])
def test_unknown_regex_raises(field, value):
    regex = value[0] if isinstance(value[0], str) else value[0][0]
    with pytest.raises(ValueError, match=r"matches no parameter.*blocks_0/attn/qkv/") as info:
        make_optimizer(_config(**{field: value}), _params())
    assert repr(regex) in str(info.value)


def test_default_no_weight_decay_may_match_nothing():
    make_optimizer(_config(), {"head": {"kernel": jnp.ones((2, 2))}})


# ---------------------------------------------------------------- parameter groups

def test_weight_decay_mask():
    params = _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    new, _, _ = _run(_config(), params, grads)
    decayed = ["blocks_0/attn/qkv/kernel", "predictor_0/fc/kernel"]
    flat_old = {jax.tree_util.keystr(p, simple=True, separator="/"): v
                for p, v in jax.tree_util.tree_leaves_with_path(params)}
    for path, value in jax.tree_util.tree_leaves_with_path(new):
        path = jax.tree_util.keystr(path, simple=True, separator="/")
        old = flat_old[path]
        if path in decayed:  # zero grads: the Adam part is 0, the update is -lr * wd * p
            np.testing.assert_allclose(value, old - LR * WD * old, rtol=1e-6, atol=0)
            assert not np.array_equal(value, old)
        else:  # biases, LayerNorm scale, cls_token
            np.testing.assert_array_equal(value, old)


def test_frozen_params_stay_bit_identical():
    params = _params()
    new, _, _ = _run(_config(frozen=(r"^blocks_0/", "cls_token")), params, _ones(params), steps=3)
    np.testing.assert_array_equal(new["blocks_0"]["attn"]["qkv"]["kernel"],
                                  params["blocks_0"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(new["blocks_0"]["attn"]["qkv"]["bias"],
                                  params["blocks_0"]["attn"]["qkv"]["bias"])
    np.testing.assert_array_equal(new["cls_token"], params["cls_token"])
    assert not np.array_equal(new["predictor_0"]["fc"]["kernel"],
                              params["predictor_0"]["fc"]["kernel"])
    assert not np.array_equal(new["norm"]["bias"], params["norm"]["bias"])


def test_frozen_params_keep_no_adam_state():
    params = _params()
    tx, _ = make_optimizer(_config(frozen=(r"^blocks_0/",)), params)
    n_state = sum(x.size for x in jax.tree.leaves(tx.init(params)))
    tx_all, _ = make_optimizer(_config(), params)
    n_state_all = sum(x.size for x in jax.tree.leaves(tx_all.init(params)))
    frozen_size = 4 * 12 + 12
    assert n_state_all - n_state == 2 * frozen_size  # mu and nu


def test_lr_multipliers_scale_updates():
    params = _params()
    cfg = _config(weight_decay=0.0, lr_multipliers=((r"^blocks_0/", 0.01), (r"^blocks", 5.0)))
    _, (updates,), _ = _run(cfg, params, _ones(params))
    ref = updates["predictor_0"]["fc"]["kernel"][0, 0]  # 1x (no multiplier matches)
    assert float(ref) < 0
    np.testing.assert_allclose(updates["blocks_0"]["attn"]["qkv"]["kernel"], 0.01 * ref, rtol=1e-6)
    np.testing.assert_allclose(updates["cls_token"], ref, rtol=1e-6)


def test_frozen_until_step_under_jit():
    params = _params()
    cfg = _config(frozen_until_step=((r"^blocks_0/", 3),))
    _, history, _ = _run(cfg, params, _ones(params), steps=5, jit=True)
    for step, updates in enumerate(history):
        qkv = updates["blocks_0"]["attn"]["qkv"]["kernel"]
        if step < 3:
            assert not np.any(qkv), step
        else:
            assert np.all(np.asarray(qkv) != 0), step
        assert np.all(np.asarray(updates["predictor_0"]["fc"]["kernel"]) != 0)


def test_grad_clipping():
    params = _params()
    cfg = _config(grad_clip_norm=1.0)
    huge = jax.tree.map(lambda p: 1e6 * jnp.arange(1, p.size + 1.0).reshape(p.shape), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(huge, optax.EmptyState())
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    _, (from_huge,), state_huge = _run(cfg, params, huge)
    _, (from_clipped,), state_clipped = _run(cfg, params, clipped)
    for a, b in zip(jax.tree.leaves(from_huge), jax.tree.leaves(from_clipped)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Adam's first step hardly depends on the gradient's scale; its moments do, so check them.
    for a, b in zip(jax.tree.leaves(state_huge), jax.tree.leaves(state_clipped)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    _, _, state_unclipped = _run(_config(), params, huge)
    assert float(optax.tree.norm(optax.tree.get(state_unclipped, "mu"))) > 1e4


def test_frozen_grads_do_not_count_in_clipping():
    params = _params()
    grads = _ones(params)
    grads_big_frozen = dict(grads, cls_token=1e6 * grads["cls_token"])
    cfg = _config(grad_clip_norm=1.0, frozen=("cls_token",))
    _, _, state = _run(cfg, params, grads)
    _, _, state_big = _run(cfg, params, grads_big_frozen)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_big)):
        np.testing.assert_array_equal(a, b)


def test_summary():
    params = _params()
    cfg = _config(frozen=("cls_token",), lr_multipliers=((r"^blocks", 0.01),),
                  frozen_until_step=((r"^predictor", 7),))
    text = param_groups_summary(cfg, params)
    assert "6 tensors" in text
    assert "frozen: 4 in 1 tensors" in text
    assert "weight decay 0.05: 56 in 2 tensors" in text  # qkv kernel (48) + predictor kernel (8)
    assert "no weight decay: 20 in 3 tensors" in text   # qkv bias 12 + norm scale 4 + norm bias 4
    assert "lr x0.01: 60 in 2 tensors" in text
    assert "frozen until step 7: 8 in 1 tensors" in text
