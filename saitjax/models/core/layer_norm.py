"""LayerNorm with ``nn.LayerNorm``'s parameters and result, statistics always in float32.

On XLA:CPU the two row reductions (mean, variance) of a LayerNorm run as scalar-ish reduce
loops, while a matrix-vector product with a ``1/C`` column goes to YNNPACK's vectorised dot
kernels. DeiT-S has 25 LayerNorms over ``[B, 197, 384]``: computing their statistics as dots took
DeiT-S bf16 inference at batch 32 from 1356 to 1069 ms on the README's 2-core CPU (float32: 1831
to 1754 ms). A training step, though, ran ~5 % slower with them (XLA fuses the reductions into the
backward pass better), and on GPU and TPU the reductions are already memory-bound and fast, so
``auto`` takes the dots for CPU inference only. Both paths are two-pass (variance of the centred
values, float32), which is at least as accurate as ``nn.LayerNorm``'s ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

STATISTICS = ("auto", "dot", "reduce")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dot_row_mean(x: Array, width: int) -> Array:
    column = jnp.full((width, 1), 1.0 / width, x.dtype)
    return jnp.matmul(x, column, precision=jax.lax.Precision.HIGHEST)


def _dot_row_mean_fwd(x: Array, width: int) -> tuple[Array, None]:
    return _dot_row_mean(x, width), None


def _dot_row_mean_bwd(width: int, _: None, g: Array) -> tuple[Array]:
    # The dot's own transpose would be a K=1 outer product, slow on XLA:CPU (training DeiT-S ran
    # 13 % slower); the gradient of a mean is a broadcast.
    return (jnp.broadcast_to(g / width, g.shape[:-1] + (width,)),)


_dot_row_mean.defvjp(_dot_row_mean_fwd, _dot_row_mean_bwd)


def _row_mean(x: Array, how: str) -> Array:
    if how == "dot":
        return _dot_row_mean(x, x.shape[-1])
    return jnp.mean(x, axis=-1, keepdims=True)


class LayerNorm(nn.Module):
    """Normalise the last axis; parameters ``scale`` and ``bias`` (as ``nn.LayerNorm``, so
    checkpoints load unchanged); output in ``dtype``."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    statistics: str = "auto"  # "dot" on CPU, "reduce" elsewhere (see the module docstring)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.statistics not in STATISTICS:
            raise ValueError(f"LayerNorm statistics={self.statistics!r}: choose one of {STATISTICS}")
        how = self.statistics
        if how == "auto":
            how = "dot" if jax.default_backend() == "cpu" and not train else "reduce"
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x = x.astype(jnp.float32)
        centred = x - _row_mean(x, how)
        variance = _row_mean(centred * centred, how)
        y = centred * jax.lax.rsqrt(variance + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


__all__ = ["LayerNorm", "STATISTICS"]
