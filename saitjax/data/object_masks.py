"""Pixel object masks -> per-patch (per-token) object masks, in plain NumPy.

Why: to measure whether a token-pruning method keeps the tokens that lie on the object, the
pixel mask of the generated ``saitjax_shapes`` dataset is reduced to one boolean per ViT patch,
in the same row-major order as the patch embedding flattens tokens. NumPy only, so the
measuring code can use it without importing TensorFlow.
"""

from __future__ import annotations

import numpy as np

__all__ = ["patch_mask", "patch_masks", "patch_fractions"]


def _check(height: int, width: int, patch_size: int, min_fraction: float) -> None:
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"mask of size {height}x{width} is not divisible by patch_size={patch_size}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")


def patch_fractions(masks: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of object pixels in each patch: [B, H, W(, 1)] -> float32 [B, H/p, W/p]."""
    m = np.asarray(masks)
    if m.ndim == 4:
        if m.shape[-1] != 1:
            raise ValueError(f"expected a single-channel mask, got shape {m.shape}")
        m = m[..., 0]
    if m.ndim != 3:
        raise ValueError(f"expected masks of shape [B, H, W] or [B, H, W, 1], got {m.shape}")
    b, h, w = m.shape
    _check(h, w, patch_size, 1.0)
    p = patch_size
    blocks = (m > 0).reshape(b, h // p, p, w // p, p)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def patch_masks(masks: np.ndarray, patch_size: int, min_fraction: float = 0.25,
                flatten: bool = False) -> np.ndarray:
    """Batched :func:`patch_mask`: [B, H, W(, 1)] -> bool [B, H/p, W/p] (or [B, N] if flatten).

    A patch counts as object when at least ``min_fraction`` of its pixels are object pixels.
    ``flatten=True`` gives the token order of a ViT patch embedding (row-major).
    """
    _check(1, 1, 1, min_fraction)
    frac = patch_fractions(masks, patch_size)
    out = frac >= np.float32(min_fraction) - np.float32(1e-6)
    return out.reshape(out.shape[0], -1) if flatten else out


def patch_mask(mask: np.ndarray, patch_size: int, min_fraction: float = 0.25) -> np.ndarray:
    """One mask [H, W] or [H, W, 1] -> bool [H/p, W/p]; True where the patch is on the object."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"expected a mask of shape [H, W] or [H, W, 1], got {m.shape}")
    return patch_masks(m[None], patch_size, min_fraction)[0]
