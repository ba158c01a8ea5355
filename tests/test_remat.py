"""Rematerialised blocks: the same parameters, values and gradients; recomputation is the only change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saitjax
from saitjax.models.core.remat import remat_policy
from saitjax.sparsity import SparsitySpec, parse_density

pytestmark = pytest.mark.usefixtures("fast_xla")  # without XLA's fusions the recomputation is bit-exact


def _gradients(name: str, remat: str, spec: SparsitySpec):
    model = saitjax.create_model(name, drop_path_rate=0.2, remat=remat)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = jax.jit(saitjax.create_model(name).init)(jax.random.key(1), images[:1])

    def loss(v):
        logits, aux = model.apply(v, images, train=True, sparsity=spec,
                                  rngs={"dropout": jax.random.key(3), "gumbel": jax.random.key(4)})
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0]) + jnp.sum(aux["tokens"] ** 2) * 1e-3

    return jax.jit(jax.value_and_grad(loss))(variables)


# Gathered tokens, merged tokens, and DynamicViT's Gumbel decisions that learn through masked attention.
SPECS = {"sait_test_patch4_32": parse_density("topk:0.5@1/2"), "tome_test_patch4_32": SparsitySpec.tome(4),
         "dynamicvit_test_patch4_32": saitjax.create_model("dynamicvit_test_patch4_32").keep_schedule(0.7, "mask")}


# ToMe's merging is the same gather/segment-sum plumbing as SaiT's gather under remat: -m extended.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.extended) if name.startswith("tome") else name
                                  for name in sorted(SPECS)])
def test_remat_gives_identical_values_and_gradients(name):
    spec = SPECS[name]
    value, grads = _gradients(name, "none", spec)
    for policy in ("full", "dots_saveable"):
        value_r, grads_r = _gradients(name, policy, spec)
        assert float(value_r) == float(value)
        assert jax.tree.structure(grads_r) == jax.tree.structure(grads)  # same parameter names
        # bit for bit except where the straight-through decisions reorder a few float32 sums
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12), grads_r, grads)


def test_remat_keeps_the_parameter_names_and_refuses_unknown_policies():
    plain = saitjax.create_model("vit_test_patch4_32")
    remat = saitjax.create_model("vit_test_patch4_32", remat="full")
    x = jnp.zeros((1, 32, 32, 3))
    shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), x))  # noqa: E731
    assert shapes(remat) == shapes(plain)
    assert remat_policy("full") is None and remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    with pytest.raises(ValueError, match=r"remat='dots': choose 'none', 'full' or .*dots_saveable"):
        saitjax.create_model("vit_test_patch4_32", remat="dots").init(jax.random.key(0), x)
