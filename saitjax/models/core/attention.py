"""Attention kernels of the ViT family: the fused kernel where no method needs the full matrix.

Two ways to compute ``softmax(q k^T / sqrt(d) + bias) v`` with pruned keys invisible:

* **fused**: :func:`jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA's fused
  attention elsewhere), ``[B, N, H, d]`` layout, the keep mask as the kernel's boolean mask. The
  ``[B, H, N, N]`` matrix is never returned, so XLA (and cuDNN) need not keep it for the caller.
* **explicit**: the full float32 matrix (:func:`saitjax.models.core.token_ops.masked_softmax`, the
  multiplicative form through which a straight-through keep mask receives gradients).

What the token methods read from attention is computed beside the fused kernel in O(N):
:func:`cls_attention_row` is the CLS query's row ``[B, H, N]`` from the same ``q``/``k``, with the
same bias and visibility. Who needs the explicit path (:func:`needs_explicit_attention`): a
training forward whose keep mask carries gradients (DynamicViT's Gumbel decisions and AS-ViT's
threshold decisions learn through the attention they mask) and STViT's semantic-token blocks,
which read the attention of every query to the image tokens.

``auto`` (the default) takes the fused path on GPU and TPU, where it saves memory and time, and
the explicit path on CPU, where XLA's fused attention materialises the same matrix in another
layout and measured slower (README "Pods: memory and precision").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ATTENTION_IMPLS = ("auto", "fused", "explicit")


def check_attention_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r}: choose one of {', '.join(ATTENTION_IMPLS)} "
                         "(auto: fused on GPU/TPU, explicit on CPU)")


def needs_explicit_attention(impl: str, train: bool, keep: Array | None, keep_gradient: bool,
                             context: Array | None) -> bool:
    """Whether this call must build the full matrix (see the module docstring)."""
    check_attention_impl(impl)
    if context is not None or (train and keep is not None and keep_gradient):
        return True
    if impl == "auto":
        return jax.default_backend() == "cpu"
    return impl == "explicit"


def visible_mask(keep: Array) -> Array:
    """Boolean ``[B, 1, N, N]``: key ``j`` is visible to query ``i`` if kept or ``i == j`` (the
    0/1 form of :func:`saitjax.models.core.token_ops.visible_keys`)."""
    n = keep.shape[-1]
    return (keep[:, None, None, :] > 0) | jnp.eye(n, dtype=bool)[None, None]


def fused_attention(q: Array, k: Array, v: Array, keep: Array | None, log_size: Array | None) -> Array:
    """Heads ``[B, N, H, d]`` from ``q, k, v [B, N, H, d]``; ``log_size [B, N]`` is added to the
    logits of every key (ToMe's proportional attention), ``keep [B, N]`` hides pruned keys."""
    bias = None if log_size is None else log_size[:, None, None, :].astype(jnp.float32)
    mask = None if keep is None else visible_mask(keep)
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=q.shape[-1] ** -0.5)


def cls_attention_row(q: Array, k: Array, keep: Array | None, log_size: Array | None) -> Array:
    """Float32 ``[B, H, N]``: the attention of token 0 (CLS) over the keys, per head, in O(N).

    Equal to row 0 of the explicit matrix: same scale, bias and visibility (the CLS token is
    never pruned, so it always sees itself).
    """
    logits = jnp.einsum("bhd,bnhd->bhn", q[:, 0] * q.shape[-1] ** -0.5, k,
                        preferred_element_type=jnp.float32)
    if log_size is not None:
        logits = logits + log_size[:, None, :].astype(jnp.float32)
    if keep is not None:
        visible = (keep > 0).at[:, 0].set(True)
        logits = jnp.where(visible[:, None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)
