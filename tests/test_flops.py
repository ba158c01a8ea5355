"""FLOPs: the published analytic figures, and agreement with XLA's count."""

from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp

import saitjax
from saitjax.flops import analytic_gmacs, block_macs, xla_flops
from saitjax.sparsity import SparsitySpec


def test_deit_small_dense_and_keep_schedule():
    model = saitjax.create_model("deit_small_patch16_224")
    assert round(analytic_gmacs(model), 2) == 4.60
    spec = SparsitySpec.topk((0.7, 0.49, 0.343), (3, 6, 9))
    assert model.token_schedule(spec) == (197,) * 3 + (138,) * 3 + (97,) * 3 + (68,) * 3
    assert round(analytic_gmacs(model, spec), 2) == 2.88


def test_deit_tiny_and_base_match_published():
    assert round(analytic_gmacs(saitjax.create_model("deit_tiny_patch16_224")), 1) == 1.3
    assert round(analytic_gmacs(saitjax.create_model("deit_base_patch16_224")), 1) == 17.6


def test_block_formula():
    assert block_macs(197, 384) == 12 * 197 * 384 ** 2 + 2 * 197 ** 2 * 384


@pytest.mark.parametrize("spec", [SparsitySpec.dense(), SparsitySpec.hierarchical(0.5, (1, 2, 3))])
def test_xla_count_tracks_analytic(spec):
    """XLA counts 2 FLOPs per MAC plus the elementwise work: between 2.0x and 2.6x the MACs."""
    model = saitjax.create_model("vit_test_patch4_32", embed_dim=64, num_heads=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    fn = lambda p, x: model.apply({"params": p}, x, sparsity=spec)[0]  # noqa: E731
    flops = xla_flops(fn, params, jnp.zeros((4, 32, 32, 3))) / 4
    ratio = flops / (analytic_gmacs(model, spec) * 1e9)
    assert 2.0 <= ratio <= 2.6, ratio
