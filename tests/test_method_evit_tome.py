"""EViT and ToMe in the trainer: the warm-up's bounded compilations, ToMe trained and off the shelf, configs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import saitjax
from saitjax import parallel, train
from saitjax.compilations import CompilationCounter
from saitjax.convert import save_params

from train_fixtures import load_config, tiny_config, tiny_data


@pytest.mark.usefixtures("fast_xla")
def test_evit_warmup_compiles_once_per_quantised_rate(tmp_path):
    # 64 examples / batch 16 = 4 steps per epoch; the rate falls from 1 to 0.7 over 3 epochs
    config = tiny_config(model="evit_test_patch4_32", method="evit", train_steps=16)
    config.method_kwargs.update(shrink_start_epoch=0.25, shrink_epochs=3.0, keep_rate_step=0.1)
    config.eval.densities = ("dense", "evit:0.7")
    mesh = parallel.make_mesh()
    run = train.Run(config, str(tmp_path / "w"), data=tiny_data(mesh, config), mesh=mesh)
    state = run.restore_or_init()
    step_fn = run.jitted_train_step(donate=False)
    batches = run.data.train_batches(0)
    specs = []
    with CompilationCounter() as compiled:
        for step in range(16):
            specs.append(run.method.train_sparsity(step))
            state, metrics = step_fn(state, next(batches), None, specs[-1])
    rates = [s.keep_ratios[0] if not s.is_dense else 1.0 for s in specs]
    assert rates[0] == 1.0 and rates[-1] == 0.7 and rates == sorted(rates, reverse=True)
    assert set(rates) <= {1.0, 0.9, 0.8, 0.7}
    assert compiled.of(step_fn) == len(set(specs)) <= 4  # at most ceil(0.3 / 0.1) + 1 compilations
    assert np.isfinite(float(jax.device_get(metrics["loss"])))
    evals = run.evaluate(state.params, 16)
    assert set(evals) == {"dense", "evit:0.7@1/2"}
    run.ckpt.close()


@pytest.mark.usefixtures("fast_xla")
def test_tome_trains_with_merging_and_evaluates_off_the_shelf(tmp_path):
    mesh = parallel.make_mesh()
    dense_config = tiny_config()
    model = saitjax.create_model("vit_test_patch4_32", num_classes=4)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    init = save_params(str(tmp_path / "dense.npz"), jax.device_get(params), model="vit_test_patch4_32")
    config = tiny_config(model="tome_test_patch4_32", method="supervised", init=init, train_steps=2)
    config.model_kwargs.r = 8
    config.eval.densities = ("dense", "tome:8", "tome:16")
    data = tiny_data(mesh, dense_config)
    # off the shelf: no checkpoint in the workdir, so the init weights are evaluated as they are
    results = train.evaluate_checkpoint(config, str(tmp_path / "offshelf"), data=data, mesh=mesh)
    assert set(results) == {"dense", "tome:8", "tome:16"}
    dense_results = train.evaluate_checkpoint(tiny_config(init=init), str(tmp_path / "dense"), data=data, mesh=mesh)
    assert results["dense"]["top1"] == dense_results["dense"]["top1"]
    # trained with merging in place: the training step runs the model's own r
    run = train.Run(config, str(tmp_path / "trained"), data=data, mesh=mesh)
    assert run.method.train_sparsity(0) == saitjax.SparsitySpec.tome(8)
    run.ckpt.close()
    out = train.train_and_evaluate(config, str(tmp_path / "trained"), data=data, mesh=mesh)
    assert np.isfinite(out["eval"]["tome:8"]["loss"])
    with pytest.raises(FileNotFoundError, match="no config.init"):
        train.evaluate_checkpoint(tiny_config(), str(tmp_path / "empty"), data=data, mesh=mesh)


def test_configs_parse_with_their_recipes():
    c = load_config("evit_deit_imagenet", "model=base,keep=0.5,init=deit_b.npz")
    assert (c.model, c.method, c.train_epochs) == ("evit_deit_base_patch16_224", "evit", 30.0)
    assert c.method_kwargs.shrink_start_epoch == 0.0 and c.optim.weight_decay == 1e-6
    assert train.optimizer_config(c, 100, 0, 2).lr == pytest.approx(2e-5 * 2048 / 512)
    scratch = load_config("evit_deit_imagenet", "fuse=false")
    assert scratch.train_epochs == 300.0 and scratch.method_kwargs.shrink_epochs == 100.0
    assert tuple(scratch.eval.densities) == ("dense", "evit:0.7,fuse=0")
    t = load_config("tome_deit_imagenet", "model=tiny,r=16")
    assert (t.model, t.method, t.model_kwargs.r) == ("tome_deit_tiny_patch16_224", "supervised", 16)
    assert tuple(t.eval.densities) == ("dense", "tome:8", "tome:16")
    for name in ("evit_demo", "tome_demo"):
        with pytest.raises(ValueError, match="configs/demo_dense.py"):
            load_config(name)
        assert load_config(name, "init=/tmp/d.npz").init == "/tmp/d.npz"
    with pytest.raises(ValueError, match=r"sait_\* family|rule .tome."):
        cfg = tiny_config(model="tome_test_patch4_32")
        cfg.eval.densities = ("mass:0.8@1",)
        from saitjax.config import validate
        validate(cfg)
