"""Window helpers of Swin-style models: partition/reverse, relative positions, shifted-window masks.

Pure NumPy/JAX, no Flax, so Swin and the models built on it (STViT-R's semantic tokens pool the
same windows) share one definition of the window order. Windows are numbered row-major over the
map and tokens row-major inside a window, as in timm and the official Swin code; that order is
what makes the masks and relative-position tables of converted checkpoints line up.
Everything static (indices, masks) is computed in NumPy at trace time: XLA sees constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Logit added between tokens of different regions of a shifted window: -100, not -inf, exactly as
# timm and the official code (a float32 softmax then gives those pairs ~e-44, not an exact zero).
MASK_FILL = -100.0


def effective_window(resolution: int, window: int, shift: int) -> tuple[int, int]:
    """``(window, shift)`` actually used on a ``resolution x resolution`` map.

    A window covering the whole map shrinks to it and is never shifted (the rule of the official
    code and timm): Swin-T's last stage at 7x7 runs plain attention over all 49 tokens.
    """
    if resolution <= window:
        return resolution, 0
    return window, shift


def window_partition(x: Array, window: int) -> Array:
    """``[B, H, W, C]`` -> ``[B, num_windows, window, window, C]``, windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window, window, c)


def window_reverse(windows: Array, height: int, width: int) -> Array:
    """Inverse of :func:`window_partition`: ``[B, num_windows, w, w, C]`` -> ``[B, H, W, C]``."""
    b, _, window, _, c = windows.shape
    x = windows.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def relative_position_index(window: int) -> np.ndarray:
    """``[w*w, w*w]`` int32: row of the ``(2w-1)^2``-entry bias table for each query/key pair.

    The pair's offset ``(dy, dx)``, each shifted into ``0..2w-2``, flattened as ``dy * (2w-1) + dx``.
    """
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], each in 0..2w-2
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray | None:
    """``[num_windows, w*w, w*w]`` additive mask of shifted-window attention (``None``: no shift).

    After the cyclic shift by ``-shift`` a window at the bottom/right edge holds tokens from
    opposite sides of the map. The map is cut into 3x3 regions (``[0, R-w)``, ``[R-w, R-s)``,
    ``[R-s, R)`` per axis); pairs from different regions get :data:`MASK_FILL`.
    """
    if shift == 0:
        return None
    region = np.zeros((resolution, resolution), np.float32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            region[rows, cols] = label
            label += 1
    labels = np.asarray(window_partition(region[None, :, :, None], window)).reshape(-1, window * window)
    different = labels[:, None, :] != labels[:, :, None]
    return np.where(different, MASK_FILL, 0.0).astype(np.float32)


def cyclic_shift(x: Array, shift: int) -> Array:
    """Roll a ``[B, H, W, C]`` map by ``shift`` along H and W (``torch.roll`` semantics)."""
    return x if shift == 0 else jnp.roll(x, (shift, shift), axis=(1, 2))
