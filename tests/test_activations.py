"""GELU: the erf form equals jax's erfc form and PyTorch's GELU, and its gradient is GELU's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saitjax.models.core.activations import gelu_exact


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0, 3, 4096), np.linspace(-12, 12, 2001)]).astype(np.float32)


def test_gelu_exact_equals_jax_erfc_form():
    x = jnp.asarray(_inputs())
    np.testing.assert_allclose(gelu_exact(x), jax.nn.gelu(x, approximate=False), rtol=2e-6, atol=1e-6)  # erf form: cancellation in the negative tail


def test_gelu_exact_gradient_is_gelu_derivative():
    x = jnp.asarray(_inputs())
    grad = jax.vmap(jax.grad(gelu_exact))(x)
    phi = np.exp(-np.square(np.float64(x)) / 2) / np.sqrt(2 * np.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(np.float64(x) / np.sqrt(2)))
    np.testing.assert_allclose(grad, cdf + np.float64(x) * phi, rtol=1e-5, atol=1e-6)


def test_gelu_exact_keeps_dtype():
    assert gelu_exact(jnp.ones((3,), jnp.bfloat16)).dtype == jnp.bfloat16
    assert gelu_exact(jnp.ones((3,), jnp.float32)).dtype == jnp.float32


def test_gelu_exact_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = _inputs()
    np.testing.assert_allclose(gelu_exact(jnp.asarray(x)), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(),
                               rtol=2e-6, atol=1e-6)
