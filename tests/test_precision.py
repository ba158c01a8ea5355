"""Compute-dtype matmuls: bf16 operands, float32 accumulation and result, compute-dtype output."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saitjax.models.core import precision


class _TwoLayers(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x):
        x = precision.dense(32, self.dtype, "fc1")(x)
        return precision.dense(8, self.dtype, "fc2", use_bias=False)(x)


def _dots(fn, *args) -> list[str]:
    """The ``(operand types) -> result type`` of every dot in the lowered StableHLO."""
    text = jax.jit(fn).lower(*args).as_text()
    return [line.rsplit(":", 1)[1] for line in text.splitlines() if "stablehlo.dot_general" in line]


def test_float32_is_plain_dense():
    """Same parameter tree and, in float32, the same numbers as ``nn.Dense``."""
    x = jax.random.normal(jax.random.key(0), (4, 16))
    ours = _TwoLayers(jnp.float32)
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == {"params": {
        "fc1": {"kernel": (16, 32), "bias": (32,)}, "fc2": {"kernel": (32, 8)}}}
    p = variables["params"]
    plain = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    np.testing.assert_allclose(ours.apply(variables, x), plain @ p["fc2"]["kernel"], rtol=1e-6, atol=1e-6)


def test_bfloat16_multiplies_bf16_and_accumulates_float32():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    model = _TwoLayers(jnp.bfloat16)
    variables = model.init(jax.random.key(1), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))  # float32 masters
    y = model.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    dots = _dots(lambda v, x: model.apply(v, x), variables, x)
    assert len(dots) == 2
    for line in dots:  # the XLA:CPU fast path: bf16 x bf16 -> f32 (see the module docstring)
        assert re.fullmatch(r"\s*\(tensor<\S+xbf16>, tensor<\S+xbf16>\) -> tensor<\S+xf32>\s*", line), line
    # float32 accumulation: as exact as a float32 product of the bf16-rounded operands, then one rounding
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), variables["params"])
    h = (x.astype(jnp.bfloat16).astype(jnp.float32) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    want = h.astype(jnp.bfloat16).astype(jnp.float32) @ p["fc2"]["kernel"]
    np.testing.assert_allclose(y.astype(jnp.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_and_patch_conv_return_the_compute_dtype(dtype):
    a = jnp.ones((2, 3, 5), dtype)
    b = jnp.ones((2, 5, 4), dtype)
    out = precision.matmul(a, b)
    assert out.dtype == dtype and float(out[0, 0, 0]) == 5.0

    class Patches(nn.Module):
        @nn.compact
        def __call__(self, images):
            return precision.patch_conv(6, 4, dtype, "proj")(images)

    images = jnp.ones((1, 8, 8, 3))
    variables = Patches().init(jax.random.key(0), images)
    assert variables["params"]["proj"]["kernel"].shape == (4, 4, 3, 6)
    assert Patches().apply(variables, images).shape == (1, 2, 2, 6)
    assert Patches().apply(variables, images).dtype == dtype
