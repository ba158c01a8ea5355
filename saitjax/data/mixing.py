"""Mixup / CutMix with label smoothing, as pure JAX (no TensorFlow), like timm's ``Mixup``.

Why on the device: mixing pairs examples across the batch, so it belongs after the global batch
is assembled, inside the jitted train step (it costs nothing next to the model). Semantics follow
timm's "batch" mode used by DeiT: one lambda per batch; each example is paired with the example
at the mirrored position (the flipped batch); with both alphas > 0 the batch uses CutMix with
probability ``switch_prob`` and Mixup otherwise; CutMix's lambda is corrected to the area of the
box actually pasted (after clipping at the borders); targets are label-smoothed one-hots mixed
with the same lambda. Shapes are static: the CutMix box is a mask built from iota comparisons.

    images, targets = mixup_cutmix(rng, images, labels, num_classes=1000)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["smooth_one_hot", "mixup_cutmix", "cutmix_box"]


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0,
                   dtype: Any = jnp.float32) -> jax.Array:
    """One-hot targets with label smoothing: ``1 - s + s/K`` on the label, ``s/K`` elsewhere."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return (jax.nn.one_hot(labels, num_classes, dtype=dtype) * (on - off) + off).astype(dtype)


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array]:
    """timm's ``rand_bbox``: box (y0, y1, x0, x1) of side ``sqrt(1 - lam)`` at a random centre.

    The box is clipped at the image borders; returns (int32 [4] box, lambda corrected to
    ``1 - box area / image area``).
    """
    k_y, k_x = jax.random.split(rng)
    cut_rat = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut_rat).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_rat).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
    area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
    return jnp.stack([y0, y1, x0, x1]), 1.0 - area / (height * width)


def _box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
    """bool [H, W], True inside the box, from iota comparisons (static shape, no slicing)."""
    ys = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    xs = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    return (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1, prob: float = 1.0, return_info: bool = False
                 ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, dict]:
    """Mixes a batch (NHWC images, int labels) -> (images, soft targets [B, num_classes]).

    ``prob`` is the chance the batch is mixed at all; an alpha of 0 disables that branch, and
    with both 0 the result is the images unchanged and smoothed one-hots. ``return_info`` adds
    {"lam", "use_cutmix", "applied", "box"} (box = int32 [y0, y1, x0, x1]) for checks and logs.
    The keyword arguments are Python values (static under ``jax.jit``).
    """
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1 or not 0 <= prob <= 1:
        raise ValueError(f"bad mixing parameters: mixup_alpha={mixup_alpha}, "
                         f"cutmix_alpha={cutmix_alpha}, switch_prob={switch_prob}, prob={prob}")
    _, height, width, _ = images.shape
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    info = {"lam": jnp.float32(1.0), "use_cutmix": jnp.bool_(False),
            "applied": jnp.bool_(False), "box": jnp.zeros([4], jnp.int32)}
    if (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
        return (images, targets, info) if return_info else (images, targets)

    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
    applied = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.bool_(cutmix_alpha > 0)
    lam_mix = (jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0
               else jnp.float32(1.0))
    lam_cut = (jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0
               else jnp.float32(1.0))
    box, lam_box = cutmix_box(k_box, lam_cut, height, width)

    flipped = images[::-1]
    x = images.astype(jnp.float32)
    mixed = (lam_mix * x + (1.0 - lam_mix) * flipped.astype(jnp.float32)).astype(images.dtype)
    pasted = jnp.where(_box_mask(box, height, width)[None, :, :, None], flipped, images)
    lam = jnp.where(applied, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
    out = jnp.where(applied, jnp.where(use_cutmix, pasted, mixed), images)
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    if return_info:
        info = {"lam": lam, "use_cutmix": use_cutmix & applied, "applied": applied, "box": box}
        return out, targets, info
    return out, targets
