"""LayerNorm: nn.LayerNorm's parameters and values, statistics by dot (CPU) or by reduction."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saitjax.models.core.layer_norm import LayerNorm


@pytest.mark.parametrize("statistics", ["auto", "dot", "reduce"])
def test_matches_flax_layer_norm_with_the_same_parameters(statistics):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 48))
    ours = LayerNorm(1e-6, statistics=statistics)
    reference = nn.LayerNorm(1e-6)
    variables = reference.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), variables)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_output_float32_statistics():
    x = (100.0 + jax.random.normal(jax.random.key(0), (4, 64))).astype(jnp.bfloat16)
    variables = LayerNorm(dtype=jnp.bfloat16).init(jax.random.key(1), x)
    y = LayerNorm(dtype=jnp.bfloat16).apply(variables, x)
    assert y.dtype == jnp.bfloat16
    # float32 statistics of a large-mean input: unit variance survives (bf16 sums would not)
    np.testing.assert_allclose(jnp.std(y.astype(jnp.float32), axis=-1), 1.0, atol=0.02)


def test_statistics_path_as_compiled():
    x = jnp.ones((3, 32))
    for statistics, dots in (("dot", 2), ("reduce", 0)):
        module = LayerNorm(statistics=statistics)
        variables = module.init(jax.random.key(0), x)
        hlo = jax.jit(module.apply).lower(variables, x).as_text(dialect="hlo")
        assert hlo.count(" dot(") == dots, statistics
    with pytest.raises(ValueError, match="statistics='sum'"):
        LayerNorm(statistics="sum").init(jax.random.key(0), x)


def test_auto_statistics_reduce_in_training():
    """The dots pay off in CPU inference only; a training step is faster with reductions."""
    x = jnp.ones((3, 32))
    module = LayerNorm()
    variables = module.init(jax.random.key(0), x)
    expected_inference_dots = 2 if jax.default_backend() == "cpu" else 0
    for train, dots in ((False, expected_inference_dots), (True, 0)):
        hlo = jax.jit(lambda v, y, t=train: module.apply(v, y, t)).lower(variables, x).as_text(dialect="hlo")
        assert hlo.count(" dot(") == dots, train


def test_dot_statistics_gradient_equals_reduction_gradient():
    """The dot path's hand-written backward (a broadcast) is the gradient of the mean."""
    x = 1.5 + jax.random.normal(jax.random.key(0), (2, 7, 40))
    weights = jax.random.normal(jax.random.key(1), x.shape)
    grads = {}
    for statistics in ("dot", "reduce"):
        module = LayerNorm(statistics=statistics)
        variables = module.init(jax.random.key(2), x)

        def loss(v, y, m=module):
            return jnp.sum(m.apply(v, y) * weights)

        grads[statistics] = jax.grad(loss, argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(grads["dot"]), jax.tree.leaves(grads["reduce"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
