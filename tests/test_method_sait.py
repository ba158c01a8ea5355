"""SaiT training method: per-step densities, losses by hand, training on 8 devices, the sweep."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from saitjax import losses, parallel, train
from saitjax.config import validate
from saitjax.methods import build_method
from saitjax.methods.sait import token_selection_kd
from saitjax.models import create_model

from model_fixtures import random_params
from train_fixtures import tiny_config, tiny_data


def sait_config(**overrides):
    base = {"model": "sait_test_patch4_32", "method": "sait", "method_kwargs.locations": (1,),
            "method_kwargs.densities": ("mass:0.7", "mass:0.9"),
            "method_kwargs.distill_source": "dense_pass", "model_kwargs.drop_path_rate": 0.0}
    return tiny_config(**{**base, **overrides})


def _method(**overrides):
    config = sait_config(**overrides)
    return build_method(config, create_model(config.model, **dict(config.model_kwargs)))


def test_densities_are_a_function_of_seed_and_step():
    method = _method()
    method.bind_schedule(100, 10)
    picks = [method.train_sparsity(s).describe() for s in range(40)]
    assert picks == [_method().train_sparsity(s).describe() for s in range(40)]  # every host agrees
    assert set(picks) == {"mass:0.7@1", "mass:0.9@1"}
    assert all(method.train_sparsity(s).mode == "mask" for s in range(5))
    other_seed = _method(seed=1)
    assert picks != [other_seed.train_sparsity(s).describe() for s in range(40)]


def test_dense_warmup_and_alternate_schedule():
    method = _method(**{"method_kwargs.dense_warmup_epochs": 2.0, "method_kwargs.schedule": "alternate"})
    method.bind_schedule(100, 5)
    assert all(method.train_sparsity(s).is_dense for s in range(10))
    assert [method.train_sparsity(s).is_dense for s in range(10, 16)] == [True, False] * 3


@pytest.mark.parametrize("overrides, message", [
    ({"method_kwargs.distill_source": "teacher"}, "needs config.teacher"),
    ({"method_kwargs.densities": ("dense",)}, "is dense"),
    ({"method_kwargs.densities": ("mass:0.9@7",)}, "do not fit"),
    ({"method_kwargs.schedule": "sometimes"}, "schedule"),
    ({"method_kwargs.token_distill_weight": -1.0}, ">= 0"),
])
def test_bad_method_kwargs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(sait_config(**overrides))


def test_masked_kl_and_token_selection_kd_by_hand():
    rng = np.random.default_rng(0)
    attn = rng.random((2, 3, 1 + 6)).astype(np.float32)  # [B, H, 1 + N]
    s0 = rng.dirichlet(np.ones(6), size=2).astype(np.float32)
    s1 = rng.dirichlet(np.ones(6), size=2).astype(np.float32)
    keep0 = np.array([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 0]], np.float32)
    keep1 = keep0 * np.array([[1, 0, 0, 1, 0, 1], [1, 0, 0, 1, 1, 0]], np.float32)

    def kl(p, q, alive):
        p, q = p * alive, q * alive
        p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
        terms = np.where(alive > 0, p * (np.log(p + 1e-8) - np.log(q + 1e-8)), 0.0)
        return terms.sum(-1).mean()

    target = attn[:, :, 1:].sum(1)
    expected = (kl(target, s0, np.ones_like(s0)) + kl(target, s1, keep0)) / 2
    got = token_selection_kd(jnp.asarray(attn), (jnp.asarray(s0), jnp.asarray(s1)),
                             (jnp.asarray(keep0), jnp.asarray(keep1)), num_prefix=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(losses.masked_kl(jnp.asarray(target), jnp.asarray(target), jnp.ones((2, 6))), 0.0,
                               atol=1e-6)


def test_loss_sums_dense_and_sparse_terms():
    method = _method(**{"method_kwargs.token_distill_weight": 0.5, "method_kwargs.distill_weight": 0.25})
    model = method.model
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    targets = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 4)
    params = model.init(jax.random.key(1), images)["params"]
    spec = method.sparse_specs[0]
    loss, metrics = method.loss(params, images, targets, spec=spec, rng=jax.random.key(2), teacher_params=None)
    expected = (metrics["loss_dense"] + metrics["loss_sparse"] + 0.25 * metrics["loss_kd_sparse"]
                + 0.5 * metrics["loss_token_kd"])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    dense_logits, dense_aux = model.apply({"params": params}, images)
    sparse_logits, _ = model.apply({"params": params}, images, sparsity=spec)
    np.testing.assert_allclose(metrics["loss_dense"], losses.soft_cross_entropy(dense_logits, targets), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_sparse"], losses.soft_cross_entropy(sparse_logits, targets), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_kd_sparse"], losses.kl_to_teacher(sparse_logits, dense_logits),
                               rtol=1e-4, atol=1e-7)
    assert 0 < float(metrics["kept_fraction"]) < 1
    # a dense step trains the dense pass only
    dense_loss, dense_metrics = method.loss(params, images, targets, spec=spec.dense(), rng=jax.random.key(2),
                                            teacher_params=None)
    assert set(dense_metrics) == {"loss_dense"}


def test_token_selection_kd_trains_the_blocks_before_the_pruning_location():
    """SaiT's core claim: token-selection KD teaches the EARLY blocks to score tokens.

    The TIS at a pruning location is computed from the CLS attention of the blocks before it, and
    the KD target (the dense pass's last-block CLS attention) is held fixed (stop-gradient). So
    the term alone must send gradient into blocks_0 (before location 1) and none into the blocks
    at or after the location or the head: if the scores were detached, or the target were not,
    this test fails. The method's own loss is used with every other weight at 0, so the wiring
    (dense_aux["cls_attn"], aux["token_scores"], aux["keep_masks"]) is the one training uses.
    """
    zero = {f"method_kwargs.{k}": 0.0 for k in ("dense_weight", "sparse_weight", "distill_weight")}
    # a fixed-count density keeps the compiled step small (one static shape, no bucket switch)
    method = _method(**zero, **{"method_kwargs.token_distill_weight": 1.0,
                                "method_kwargs.densities": ("topk:0.5",)})
    assert method.locations == (1,)
    model = method.model
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    targets = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 4)
    params = random_params(model)
    spec = method.sparse_specs[0]

    @jax.jit
    def grad_and_metrics(p):
        return jax.grad(lambda q: method.loss(q, images, targets, spec=spec, rng=jax.random.key(2),
                                              teacher_params=None), has_aux=True)(p)

    grads, metrics = grad_and_metrics(params)
    assert float(metrics["loss_token_kd"]) > 0
    norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))
    assert np.isfinite(norm(grads["blocks_0"])) and norm(grads["blocks_0"]) > 0
    later = [name for name in grads if name.startswith("blocks_") and int(name.split("_")[1]) >= 1]
    assert later, sorted(grads)
    for name in later + [n for n in grads if "head" in n]:
        assert norm(grads[name]) == 0, (name, norm(grads[name]))


@pytest.mark.usefixtures("fast_xla")
def test_sait_trains_on_eight_devices_and_sweeps(tmp_path):
    config = sait_config(**{"eval.densities": ("dense", "mass:0.8"),
                            "eval.sweep": ("dense", "mass:0.8", "topk:0.5"),
                            "eval.sweep_batch_sizes": (8,), "train_steps": 8})
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    result = train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh, config))
    assert result["step"] == 8
    assert set(result["eval"]) == {"dense", "mass:0.8@1"}
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("train/loss_sparse" in r for r in records) and any("train/loss_token_kd" in r for r in records)
    out = tmp_path / "sweep_step8"
    for name in ("sweep.json", "sweep.md", "pareto.png", "kept_tokens.png", "kept_counts.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.load(open(out / "sweep.json"))
    # per-image counts: a histogram over every eval image (40); fixed counts a single spike; dense none
    assert sum(rows[1]["count_histogram"]) == 40 and len(rows[1]["count_histogram"]) == 65
    assert rows[2]["count_histogram"][32] == 40 and "count_histogram" not in rows[0]
    assert [r["density"] for r in rows] == ["dense", "mass:0.8@1", "topk:0.5@1"]
    assert rows[0]["gmacs_ratio"] == 1.0 and rows[2]["gmacs_ratio"] < 1.0
    assert rows[2]["kept_tokens"] == 32.0
    assert all(r["img_per_s_bs8"] > 0 and "img_per_s_bs1" not in r for r in rows)
    # --mode sweep of the same checkpoint gives the same accuracies
    again = train.sweep_checkpoint(config, str(tmp_path), data=tiny_data(mesh, config), mesh=mesh)
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]
    assert os.path.exists(tmp_path / "export" / "params_step8.npz")
