"""Shared helpers for model tests."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp


def random_params(model, seed: int = 0):
    """Random params of ``model`` drawn with NumPy from its shapes (no init compilation: faster
    on 2 cores): LayerNorm scales near 1, everything else small."""
    images = jnp.zeros((1, model.img_size, model.img_size, model.in_chans))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        scale = path[-1].key == "scale"
        return jnp.asarray(rng.normal(1.0 if scale else 0.0, 0.1 if scale else 0.05, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
