"""ToMe: bipartite matching and weighted merging against NumPy, schedules, FLOPs, clamping."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

import saitjax
from saitjax.flops import analytic_gmacs, vit_macs
from saitjax.models.core import token_ops
from saitjax.sparsity import SparsityError, SparsitySpec, parse_density


pytestmark = pytest.mark.usefixtures("fast_xla")  # compares programs compiled under the same setting


def _numpy_tome(x, size, metric, r, num_prefix):
    """Straightforward NumPy ToMe step (one image): returns merged x, sizes, and old -> new map."""
    m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    a_pos, b_pos = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    scores = m[a_pos] @ m[b_pos].T
    scores[0, :] = -np.inf
    if num_prefix > 1:
        scores[:, 0] = -np.inf
    best, partner = scores.max(1), scores.argmax(1)
    order = np.argsort(-best, kind="stable")
    src, unm = order[:r], np.sort(order[r:])
    xb, sb = x[b_pos] * size[b_pos, None], size[b_pos].copy()
    for s in src:
        xb[partner[s]] += x[a_pos[s]] * size[a_pos[s]]
        sb[partner[s]] += size[a_pos[s]]
    xa, sa = x[a_pos[unm]], size[a_pos[unm]]
    xb = xb / sb[:, None]
    if num_prefix > 1:
        out_x = np.concatenate([xa[:1], xb[:1], xa[1:], xb[1:]])
        out_s = np.concatenate([sa[:1], sb[:1], sa[1:], sb[1:]])
    else:
        out_x, out_s = np.concatenate([xa, xb]), np.concatenate([sa, sb])
    return out_x, out_s


@pytest.mark.parametrize("num_prefix, n, r", [(1, 17, 5), (2, 18, 6), (1, 16, 7)])
def test_matching_and_merge_match_numpy(num_prefix, n, r):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n, 8)).astype(np.float32)
    size = rng.integers(1, 4, size=(3, n)).astype(np.float32)
    metric = rng.normal(size=(3, n, 4)).astype(np.float32)
    plan = token_ops.bipartite_soft_matching(jnp.asarray(metric), r, num_prefix)
    kept_old, old_to_new = token_ops.merge_order(plan, n, num_prefix)
    new_x, new_s = token_ops.merge_weighted(jnp.asarray(x), jnp.asarray(size), plan, kept_old)
    assert new_x.shape == (3, n - r, 8)
    for b in range(3):
        ex, es = _numpy_tome(x[b], size[b], metric[b], r, num_prefix)
        np.testing.assert_allclose(np.asarray(new_x[b]), ex, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new_s[b]), es)
        # every old token lands on the new token that holds it; prefix tokens stay in front
        assert np.asarray(old_to_new[b]).min() >= 0
        np.testing.assert_array_equal(np.asarray(old_to_new[b])[:num_prefix], np.arange(num_prefix))
        np.testing.assert_allclose(np.bincount(np.asarray(old_to_new[b]), weights=size[b]), es)


@pytest.mark.parametrize("r, final, gmacs, backbone", [(8, 101, 3.42, 3.42), (13, 41, 2.71, 2.70)])
def test_deit_small_schedule_and_gmacs(r, final, gmacs, backbone):
    """methods.md §0.3: ToMe r=8 / r=13 = 3.42 / 2.70 GMACs (backbone); matching and merging add ~0.01."""
    model = saitjax.create_model("tome_deit_small_patch16_224")
    spec = SparsitySpec.tome(r)
    counts = model.block_token_counts(spec)
    assert counts[0] == (197, 197 - r) and counts[-1][1] == final
    assert round(analytic_gmacs(model, spec), 2) == gmacs
    dims = dict(dim=384, patch_size=16, num_patches=196)
    assert round(vit_macs(counts, **dims) / 1e9, 2) == backbone


def test_r_is_clamped_to_half_the_mergeable_tokens():
    model = saitjax.create_model("tome_test_patch4_32")
    counts = model.block_token_counts(SparsitySpec.tome(40))
    assert [mlp for _, mlp in counts] == [33, 17, 9, 5]  # 65 - 32, 33 - 16, ...
    distilled = saitjax.create_model("tome_test_distilled_patch4_32")
    assert distilled.block_token_counts(SparsitySpec.tome(40))[0] == (66, 34)  # (66 - 2) // 2 = 32


def test_merge_schedules_follow_the_official_parse_r():
    assert SparsitySpec.tome(13).merge_schedule(12) == (13,) * 12
    assert parse_density("tome:8/8/4").merge_schedule(5) == (8, 8, 4, 0, 0)
    # (r, inflect): int(min + step * i) from min = int(r (1 - inflect)) to 2 r - min
    assert parse_density("tome:13,inflect=-1").merge_schedule(12) == (26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0)
    assert parse_density("tome:0").is_dense
    with pytest.raises(SparsityError, match="merge_r"):
        SparsitySpec(rule="tome")
    with pytest.raises(SparsityError, match="whole token counts"):
        parse_density("tome:2.5")
