"""The trainer carries BatchNorm statistics (STViT-R's stem): trained, checkpointed, resumed, exported."""

from __future__ import annotations

import numpy as np
import pytest

import jax

from saitjax import parallel, train
from saitjax.checkpointing import Checkpointer, TrainState, abstract_like
from saitjax.convert import load_variables
from saitjax.data.arrays import ArrayData
from saitjax.sparsity import SparsitySpec

from train_fixtures import fast_compile, tiny_arrays, tiny_config

MODEL = "stvitr_test_patch4_window7_224"  # narrow, but 224 px: the semantic stage needs a 14x14 map


def _config(**overrides):
    return tiny_config(**{"model": MODEL, "model_kwargs.num_classes": 4, "model_kwargs.drop_path_rate": 0.0,
                          "data.image_size": 224, "batch_size": 8, "train_steps": 3,
                          "checkpoint.every_steps": 2, "eval.batch_size": 8, "mixup.prob": 0.0,
                          "method": "supervised", **overrides})


def _data(mesh, config):
    tr_x, tr_y, ev_x, ev_y = tiny_arrays(n_train=16, n_eval=8)
    up = lambda x: np.repeat(np.repeat(x, 7, axis=1), 7, axis=2)  # noqa: E731  32 px -> 224 px
    return ArrayData(up(tr_x), tr_y, up(ev_x), ev_y, num_classes=4, batch_size=config.batch_size,
                     eval_batch_size=config.eval.batch_size, mesh=mesh, seed=config.seed)


@pytest.mark.extended  # ~45 s on 2 cores: a 224 px model through the whole trainer
def test_batch_stats_train_checkpoint_resume_and_export(tmp_path):
    mesh = parallel.make_mesh(jax.devices()[:2])
    config = _config(train_steps=2)
    with fast_compile():
        train.train_and_evaluate(config, str(tmp_path), data=_data(mesh, config), mesh=mesh)
        run = train.Run(config, str(tmp_path), data=_data(mesh, config), mesh=mesh, train=False)
        state = run.restore_or_init()
        run.close()
        stats = state.model_state["batch_stats"]
        means = jax.tree.leaves(stats)
        assert means and any(np.abs(np.asarray(m)).max() > 0 for m in means)  # updated from the zeros of init
        exported = load_variables(str(tmp_path / "export" / "params_step2.npz"), MODEL, num_classes=4)
        jax.tree.map(np.testing.assert_array_equal, exported["batch_stats"], jax.device_get(stats))
        # the restored state (with its statistics) takes a training step: resuming works
        step_fn = run.jitted_train_step(donate=False)
        batch = next(iter(run.data.train_batches(2)))
        new_state, metrics = step_fn(state, batch, None, run.method.train_sparsity(2))
    assert int(new_state.step) == 3 and float(metrics["finite"]) == 1.0
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           new_state.model_state["batch_stats"], stats)
    assert all(jax.tree.leaves(changed))
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]


def test_methods_that_cannot_carry_batch_stats_are_refused(tmp_path):
    config = _config(method="sait", **{"method_kwargs.distill_weight": 0.0, "method_kwargs.token_distill_weight": 0.0})
    mesh = parallel.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="does not train; use method='supervised'"):
        train.Run(config, str(tmp_path), data=_data(mesh, config), mesh=mesh)


def test_checkpoint_layout_gains_model_state_only_when_there_is_one(tmp_path):
    """Params-only states keep the checkpoint layout of every earlier saitjax version."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    plain = TrainState(step=jnp.int32(3), params={"w": jnp.ones(2)}, opt_state={"m": jnp.zeros(2)})
    with_stats = plain.replace(model_state={"batch_stats": {"bn": {"mean": jnp.full(2, 0.5)}}})
    replicated = parallel.replicated(parallel.make_mesh(jax.devices()[:1]))
    for name, state in (("plain", plain), ("stats", with_stats)):
        ckpt = Checkpointer(str(tmp_path / name), async_save=False)
        ckpt.save(3, state, {"model": name})
        restored, _, step = ckpt.restore(abstract_like(state, replicated))
        ckpt.close()
        assert step == 3
        jax.tree.map(np.testing.assert_array_equal, restored, state)
    on_disk = ocp.PyTreeCheckpointer().metadata(str(tmp_path / "plain" / "3" / "state"))
    tree = getattr(on_disk, "item_metadata", on_disk)
    assert set(getattr(tree, "tree", tree)) == {"step", "params", "opt_state"}


def test_train_step_updates_batch_stats_and_keeps_them_for_non_finite_steps():
    """The step's plumbing on a two-layer BatchNorm model: statistics move with a finite step and
    stay with a non-finite one (like the params)."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from saitjax.methods.base import Method

    class TinyBN(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False, sparsity=None):
            x = nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1)[:, :6])
            return nn.Dense(4)(x), {}

    config = tiny_config()
    model = TinyBN()
    images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3)) + 2.0
    variables = model.init(jax.random.key(1), images)
    tx = optax.sgd(0.1)
    state = TrainState(step=jnp.int32(0), params=variables["params"], opt_state=tx.init(variables["params"]),
                       model_state={"batch_stats": variables["batch_stats"]})
    step = jax.jit(train.make_train_step(Method(config, model), tx, lambda s: 0.1, config, 4), static_argnums=3)
    batch = {"image": images, "label": jnp.arange(8) % 4}
    new, metrics = step(state, batch, None, SparsitySpec.dense())
    mean = new.model_state["batch_stats"]["BatchNorm_0"]["mean"]
    assert float(metrics["finite"]) == 1.0 and float(jnp.abs(mean).min()) > 0.0  # moved from zeros
    bad, metrics = step(new, {**batch, "image": images * jnp.nan}, None, SparsitySpec.dense())
    assert float(metrics["finite"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, bad.model_state, new.model_state)
