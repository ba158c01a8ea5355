"""Per-image token counts under static shapes: capacity buckets and sorted micro-batches.

Shared by every model whose keep count differs per image (SaiT's ``mass``/``value`` rules, AS-ViT's
learned thresholds). At the first pruning location the model supplies per-image counts
(:meth:`VisionTransformer.per_image_counts`); this runner

1. sorts the images by count and splits the batch into ``spec.chunks`` equal chunks (static);
2. lets each chunk pick the smallest capacity bucket that holds its largest count
   (``lax.switch`` inside the jitted function: one compiled branch per bucket, whatever the data);
3. gathers that many top-scored tokens per image, masks each image's surplus slots, and runs the
   remaining blocks (later locations refine the validity mask inside the bucket);
4. unsorts the outputs.

With one chunk a batch costs its largest image's bucket; with sorted chunks it costs close to its
mean count. Chunks run one after another (``nn.scan`` over chunks, so the branches are compiled
once, not once per chunk). Every branch returns the same shapes: per-token outputs go back to the
full grid (zeros at pruned tokens) and ``aux["capacity"] [B]`` says which capacity each image ran.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.sparsity import SparsitySpec

Array = jax.Array
Aux = dict[str, Any]


def effective_chunks(batch: int, chunks: int) -> int:
    """The largest divisor of ``batch`` not above ``chunks`` (chunks must be equal and static)."""
    return max(d for d in range(1, min(batch, chunks) + 1) if batch % d == 0)


def run_bucketed(model: Any, stage: int, location: int, state: Any, cls_attn: Array, spec: SparsitySpec,
                 train: bool, aux: Aux) -> tuple[Array, Aux]:
    """Finish the forward pass from pruning location ``location`` (stage ``stage``) in buckets."""
    scores, counts, extra = model.per_image_counts(stage, state, cls_attn, spec)
    capacities = spec.bucket_capacities(model.num_patches)
    branches = [functools.partial(_run_bucket, capacity=cap, location=location, spec=spec, train=train)
                for cap in capacities]
    batch = state.x.shape[0]
    chunks = effective_chunks(batch, spec.chunks)
    operands = (state, cls_attn, scores, counts, extra)
    if chunks == 1:
        logits, inner = nn.switch(token_ops.choose_bucket(counts, capacities), branches, model, *operands)
    else:
        order = jnp.argsort(counts, stable=True)
        size = batch // chunks

        def to_chunks(a: Array) -> Array:
            return jnp.take(a, order, axis=0).reshape((chunks, size) + a.shape[1:])

        def body(mdl, carry, xs):
            bucket = token_ops.choose_bucket(xs[3], capacities)
            return carry, nn.switch(bucket, branches, mdl, *xs)

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                       length=chunks)
        _, (logits, inner) = scan(model, None, jax.tree.map(to_chunks, operands))
        inverse = jnp.argsort(order)
        logits, inner = jax.tree.map(
            lambda a: jnp.take(a.reshape((batch,) + a.shape[2:]), inverse, axis=0), (logits, inner))
    aux = dict(aux)
    for key, value in inner.items():
        aux[key] = aux.get(key, ()) + value if isinstance(value, tuple) else value
    return logits, aux


def _run_bucket(mdl: Any, state: Any, cls_attn: Array, scores: Array, counts: Array, extra: Aux, *,
                capacity: int, location: int, spec: SparsitySpec, train: bool) -> tuple[Array, Aux]:
    """One capacity bucket: gather the top ``capacity`` tokens, mask each image's surplus, finish."""
    p, n = mdl.num_prefix_tokens, mdl.num_patches
    idx, valid = token_ops.capacity_select(scores, counts, capacity)
    keep = jnp.concatenate([jnp.ones((scores.shape[0], p), jnp.float32), valid.astype(jnp.float32)], axis=1)
    new = state.gather(idx, p, keep)
    inner: Aux = {"keep_masks": (token_ops.indices_to_mask(new.patch_index, n, valid),),
                  "kept_counts": (counts,)}
    inner.update({key: (value,) for key, value in extra.items()})
    logits, inner = mdl.run_blocks(new, cls_attn, spec, train, inner, start=location, in_bucket=True)
    # Identical output shapes in every branch: per-token outputs go back to the full grid.
    final_index = inner["patch_index"]

    def to_grid(values: Array, fill: float = 0.0) -> Array:  # [B, p + cap, ...] -> [B, p + n, ...]
        return jnp.concatenate([values[:, :p], token_ops.scatter_to_grid(values[:, p:], final_index, n, fill)],
                               axis=1)

    inner["tokens"] = to_grid(inner["tokens"])
    inner["cls_attn"] = jnp.swapaxes(to_grid(jnp.swapaxes(inner["cls_attn"], 1, 2)), 1, 2)
    inner["token_size"] = to_grid(inner["token_size"])
    source = inner["source"]  # positions in the bucket's sequence -> positions on the grid
    on_grid = p + jnp.take_along_axis(final_index, jnp.maximum(source - p, 0), axis=1)
    inner["source"] = jnp.where(source >= p, on_grid, source)
    inner["patch_index"] = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (scores.shape[0], n))
    inner["capacity"] = jnp.full((scores.shape[0],), capacity, jnp.int32)
    inner.pop("keep_indices", None)
    return logits, inner

