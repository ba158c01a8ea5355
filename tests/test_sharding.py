"""FSDP-style parameter sharding: the rules, the same training as replicated, checkpoints across layouts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import saitjax
from saitjax import parallel, sharding, train

from train_fixtures import tiny_config, tiny_data

pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting

FSDP = {"compute.param_sharding": "fsdp", "compute.fsdp_min_size": 1024}


def test_fsdp_splits_the_largest_dimension_the_devices_divide():
    assert sharding.fsdp_spec((384, 1152), 8, 1024) == P(None, "data")
    assert sharding.fsdp_spec((1536, 384), 8, 1024) == P("data")
    assert sharding.fsdp_spec((384,), 8, 1024) == P()            # too small
    assert sharding.fsdp_spec((1, 197, 383), 8, 1) == P()         # nothing divides
    assert sharding.fsdp_spec((16, 16, 3, 384), 8, 1) == P(None, None, None, "data")
    assert sharding.fsdp_spec((384, 1152), 1, 1) == P()


def test_rules_pin_parameters_and_bad_rules_name_the_field():
    mesh = parallel.make_mesh()
    params = {"head": {"kernel": jax.ShapeDtypeStruct((32, 6), np.float32)},
              "blocks_0": {"mlp": {"fc1": {"kernel": jax.ShapeDtypeStruct((32, 128), np.float32)}}}}
    specs = sharding.param_specs(params, mesh, "fsdp", (("^head/", ()),), min_size=1)
    assert specs["head"]["kernel"] == P() and specs["blocks_0"]["mlp"]["fc1"]["kernel"] == P(None, "data")
    specs = sharding.param_specs(params, mesh, "replicated", (("fc1/kernel", ("data", None)),))
    assert specs["blocks_0"]["mlp"]["fc1"]["kernel"] == P("data", None) and specs["head"]["kernel"] == P()
    with pytest.raises(ValueError, match=r"sharding_rules \['fc2'\] match no parameter"):
        sharding.param_specs(params, mesh, "replicated", (("fc2", ("data",)),))
    with pytest.raises(ValueError, match=r"sharding_rules\[0\] gives head/kernel \(32, 6\) the spec \(None, 'data'\)"):
        sharding.param_specs(params, mesh, "replicated", (("head", (None, "data")),))
    with pytest.raises(ValueError, match=r"sharding_rules\[0\]=\('head', 'data'\) must be a \(regex, spec\) pair"):
        sharding.param_specs(params, mesh, "replicated", (("head", "data"),))


def _steps(config, steps=3):
    mesh = parallel.make_mesh()
    run = train.Run(config, "/nonexistent-unused", data=tiny_data(mesh, config), mesh=mesh)
    state, step_fn, batches = run.restore_or_init(), run.jitted_train_step(), run.data.train_batches(0)
    for step in range(steps):
        state, metrics = step_fn(state, next(batches), None, run.method.train_sparsity(step))
    return state, jax.device_get(metrics)


def test_an_fsdp_step_on_eight_devices_equals_the_replicated_step():
    replicated, m_rep = _steps(tiny_config())
    fsdp, m_fsdp = _steps(tiny_config(**FSDP))
    kernel = fsdp.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # [32, 128]: 128 split over 8 devices
    assert kernel.sharding.spec == P(None, "data") and kernel.addressable_shards[0].data.shape == (32, 16)
    moments = [x for x in jax.tree.leaves(fsdp.opt_state) if getattr(x, "shape", None) == (32, 128)]
    assert moments and all(m.sharding.spec == P(None, "data") for m in moments)  # Adam's mu and nu follow
    np.testing.assert_allclose(m_fsdp["loss"], m_rep["loss"], rtol=1e-6)
    # Equal up to reassociation: sharded operands change XLA's summation order (the LayerNorm
    # reductions above all), and Adam's m / sqrt(v) turns that noise in near-zero gradients into
    # update noise (7e-7 seen, against parameter moves of ~1e-3 at lr 3e-3).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(fsdp.params), jax.device_get(replicated.params))


def test_save_sharded_then_restore_replicated_and_on_one_device(tmp_path):
    config = tiny_config(train_steps=8, **FSDP)
    mesh8 = parallel.make_mesh()
    result = train.train_and_evaluate(config, str(tmp_path), data=tiny_data(mesh8, config))
    saved = jax.device_get(result["state"].params)
    for devices, compute in ((jax.devices(), {}), (jax.devices()[:1], FSDP)):
        config = tiny_config(train_steps=8, **compute)
        mesh = parallel.make_mesh(devices)
        run = train.Run(config, str(tmp_path), data=tiny_data(mesh, config), mesh=mesh)
        state = run.restore_or_init()
        kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]
        assert kernel.sharding.mesh.devices.size == len(devices) and kernel.sharding.is_fully_replicated
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved)
        run.close()
    exported = saitjax.load_params(str(tmp_path / "export" / "params_step8.npz"), num_classes=4)  # gathered
    jax.tree.map(np.testing.assert_array_equal, exported, saved)
