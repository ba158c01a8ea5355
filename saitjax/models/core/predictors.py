"""DynamicViT's score predictor (PredictorLG), shared by the ViT models and the hierarchical ones.

Per token: ``LN -> Linear C->C -> GELU``, a local half and the mean of a global half over the
tokens still kept, then ``C -> C/2 -> C/4 -> 2`` with GELUs and a log-softmax (channel 0 = keep /
slow path). With all-ones decisions the global half is a plain mean, as on ConvNeXt and Swin.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from saitjax.models.core import precision
from saitjax.models.core.activations import gelu_exact

Array = jax.Array

_PREDICTOR_INIT = nn.initializers.truncated_normal(0.02)


class Predictor(nn.Module):
    """PredictorLG: per-token ``[log p(keep), log p(drop)]`` given the current keep decisions."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, decisions: Array) -> Array:
        """``x [B, N, C]`` patch tokens, ``decisions [B, N]`` 0/1 -> log-probs ``[B, N, 2]`` (float32)."""
        c = x.shape[-1]

        def dense(features: int, name: str) -> Callable[[Array], Array]:
            return precision.dense(features, self.dtype, name, kernel_init=_PREDICTOR_INIT)

        z = nn.LayerNorm(self.eps, dtype=self.dtype, name="in_norm")(x)
        z = gelu_exact(dense(c, "in_fc")(z))
        local, glob = z[..., : c // 2], z[..., c // 2:]
        d = decisions.astype(z.dtype)[..., None]
        # Global context = mean of the kept tokens; the guard only matters for an all-dropped image.
        g = jnp.sum(glob * d, axis=1, keepdims=True) / jnp.maximum(jnp.sum(d, axis=1, keepdims=True), 1.0)
        h = jnp.concatenate([local, jnp.broadcast_to(g, glob.shape)], axis=-1)
        h = gelu_exact(dense(c // 2, "out_fc1")(h))
        h = gelu_exact(dense(c // 4, "out_fc2")(h))
        return jax.nn.log_softmax(dense(2, "out_fc3")(h).astype(jnp.float32), axis=-1)


def predictor_macs(dim: int) -> int:
    """Multiply-accumulates of one predictor per token (its four Linear layers)."""
    return dim * dim + dim * (dim // 2) + (dim // 2) * (dim // 4) + (dim // 4) * 2
