"""The attention kernels: fused == explicit, the O(N) CLS row == the matrix's row, who takes which."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saitjax.models.core import attention, token_ops


def _qkv_keep_size(b=2, n=9, h=3, d=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(key, (b, n, h, d)) * 2.0 for key in ks[:3])
    keep = jnp.asarray(np.random.default_rng(seed).random((b, n)) > 0.4, jnp.float32).at[:, 0].set(1.0)
    log_size = jnp.log(jax.random.randint(ks[3], (b, n), 1, 4).astype(jnp.float32))
    return q, k, v, keep, log_size


def _explicit(q, k, v, keep, log_size):
    """The explicit path by hand, in the [B, H, N, d] layout: (heads [B, N, H, d], matrix)."""
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = (qh * q.shape[-1] ** -0.5) @ jnp.swapaxes(kh, -1, -2)
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    attn = token_ops.masked_softmax(logits, keep)
    return (attn @ vh).transpose(0, 2, 1, 3), attn


@pytest.mark.parametrize("with_keep, with_size", [(False, False), (True, False), (True, True), (False, True)])
def test_fused_kernel_and_cls_row_equal_the_explicit_matrix(with_keep, with_size):
    q, k, v, keep, log_size = _qkv_keep_size()
    keep = keep if with_keep else None
    log_size = log_size if with_size else None
    heads, matrix = _explicit(q, k, v, keep, log_size)
    np.testing.assert_allclose(attention.fused_attention(q, k, v, keep, log_size), heads, atol=1e-5, rtol=0)
    row = attention.cls_attention_row(q, k, keep, log_size)
    assert row.shape == (2, 3, 9) and row.dtype == jnp.float32
    np.testing.assert_allclose(row, matrix[:, :, 0], atol=1e-6, rtol=0)
    if keep is not None:  # pruned keys get no attention from the CLS query
        assert float(jnp.max(jnp.where(keep[:, None, :] == 0, row, 0.0))) == 0.0


def test_the_visible_mask_is_the_0_1_form_of_the_explicit_visibility():
    keep = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(attention.visible_mask(keep), token_ops.visible_keys(keep) > 0)


def test_who_takes_the_explicit_path():
    keep, context = jnp.ones((1, 4)), jnp.ones((1, 2, 8))
    explicit = attention.needs_explicit_attention
    assert not explicit("fused", False, keep, True, None)  # inference: any keep mask is a plain mask
    assert not explicit("fused", True, keep, False, None)  # a keep mask without gradients
    assert explicit("fused", True, keep, True, None)       # DynamicViT / AS-ViT training decisions
    assert explicit("fused", False, None, False, context)  # STViT's context attention map
    assert explicit("explicit", False, None, False, None)
    assert explicit("auto", False, None, False, None) == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match=r"attention='flash': choose one of auto, fused, explicit"):
        explicit("flash", False, None, False, None)
