"""Shared helpers for model tests."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from saitjax.flops import analytic_gmacs
from saitjax.sparsity import SparsityError, SparsitySpec


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


def param_count(model) -> int:
    """Parameters of ``model`` at its own image size, from shapes only (no init compilation)."""
    images = jnp.zeros((1, model.img_size, model.img_size, model.in_chans))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def assert_dense_backbone_errors(model):
    """A dense-only backbone at 32 px (Swin, ConvNeXt) names the fix for channels-first images, the
    wrong image size and a token-sparse spec (in the forward and in the FLOP count)."""
    def init(images, **kw):
        return jax.eval_shape(lambda: model.init(jax.random.key(0), images, **kw))

    with pytest.raises(ValueError, match=r"expected images of shape \[batch, 32, 32, 3\].*channels-first"):
        init(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="create the model with img_size=64"):
        init(jnp.zeros((1, 64, 64, 3)))
    spec = SparsitySpec.hierarchical(0.7, (1, 2, 3))
    with pytest.raises(SparsityError, match=f"{type(model).__name__} runs dense only.*topk:0.7"):
        init(jnp.zeros((1, 32, 32, 3)), sparsity=spec)
    with pytest.raises(SparsityError, match="dense only"):
        analytic_gmacs(model, spec)
