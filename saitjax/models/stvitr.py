"""STViT-R (Chang et al., CVPR 2023, arXiv 2303.08685) on Swin, as the official code builds it.

``stvitr_swin_{tiny,small,base}_patch4_window7_224`` follow changsn/STViT-R (``models/build.py``,
``swin_transformer.py``, ``layers.py`` at b4a27a0) with its config defaults: ``use_global=False``
(the config value, not the class default), no layer scale on the Swin blocks (``use_layer_scale``
is never passed, so the constructor default ``False`` applies), layer scales (init 1e-5) on every
semantic block (those classes always create them), ``sample_window_size=3`` (9 semantic tokens per
7x7 window; the paper's 16 = ``sample_window_size=4``, a field here). LayerNorm eps 1e-5 everywhere.

What differs from Swin (the rest is inherited from :class:`saitjax.models.swin.SwinTransformer`):

* Stem: LeViT-style Conv3x3/2 -> BN -> Hardswish -> Conv3x3/2 -> BN -> Hardswish (no LayerNorm).
  BatchNorm running statistics live in the ``batch_stats`` collection: apply with
  ``{"params": ..., "batch_stats": ...}``, and in training with ``mutable=["batch_stats"]``.
* Stage 3 (``layers_2``) runs groups of six layers on the map ``X`` (see :class:`SemanticStage`).

Parity-relevant quirks kept: no residual on the pooled tokens in the generation layer, the same
``norm1`` on queries and keys, ``(q @ k^T) * scale`` in the semantic attention, drop-path only on
the generation layer's MLP branch. Training-only difference: PyTorch's BN updates its running
variance with the unbiased batch variance, Flax with the biased one.

The neighbourhood of a window (the official 10x10 ``F.unfold`` with stride 4) is written as one
slice per window (:func:`neighbourhood_starts`); at 224 px (14x14 map, window 7) the slices are
the official ones. At other resolutions, where the official code fails, each window gets the box
of ``neighbourhood_size`` tokens placed as centred on it as the map allows -- our generalisation.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saitjax.models.registry import register_model
from saitjax.models.swin import LN_EPS, SWIN_SIZES, PatchMerging, SwinBlock, SwinTransformer
from saitjax.models.core import precision, token_ops
from saitjax.models.core.token_ops import adaptive_max_pool
from saitjax.models.vit import Aux, DropPath, Mlp
from saitjax.sparsity import SparsitySpec

Array = jax.Array

_dense_init = nn.initializers.truncated_normal(0.02)
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5): U(+-1/sqrt(fan_in))).
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
GROUP = 6  # layers per semantic group: Swin block, generation, global update, local, global, recovery


def neighbourhood_starts(resolution: int, window: int, size: int) -> tuple[int, ...]:
    """Start (row or column) of each window's key neighbourhood on a ``resolution`` map.

    A box of ``min(size, resolution)`` tokens per axis around window ``i``, shifted to lie inside
    the map. At ``(14, 7, 10)`` this gives ``(0, 4)``: the official ``F.unfold(kernel 10, stride 4)``.
    """
    size = min(size, resolution)
    margin = max(size - window, 0) // 2
    return tuple(min(max(i * window - margin, 0), resolution - size) for i in range(resolution // window))


def _layer_scale(module: nn.Module, name: str, dim: int, init: float) -> Array:
    return module.param(name, nn.initializers.constant(init), (dim,))


class SemanticAttention(nn.Module):
    """Attention with separate ``q`` (C -> C) and ``kv`` (C -> 2C: k rows first, then v) projections.

    ``queries [..., N1, C]`` and ``keys [..., N2, C]``, both already normed, any leading dims ->
    ``(out [..., N1, C], probs [..., H, N1, N2])``. The official ``layers.Attention`` scales the
    logits after the product, ``(q @ k^T) * d**-0.5``.
    """

    num_heads: int
    qkv_bias: bool = True
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: Array, keys: Array, train: bool = False) -> tuple[Array, Array]:
        *lead, n1, c = queries.shape
        n2, h = keys.shape[-2], self.num_heads

        def dense(features: int, name: str, bias: bool = self.qkv_bias) -> Callable[[Array], Array]:
            return precision.dense(features, self.dtype, name, use_bias=bias, kernel_init=_dense_init)

        q = jnp.swapaxes(dense(c, "q")(queries).reshape(*lead, n1, h, c // h), -2, -3)  # [..., H, N1, d]
        kv = dense(2 * c, "kv")(keys).reshape(*lead, n2, 2, h, c // h)
        k, v = (jnp.swapaxes(kv[..., i, :, :], -2, -3) for i in (0, 1))  # each [..., H, N2, d]
        logits = (q @ jnp.swapaxes(k, -1, -2)) * (c // h) ** -0.5
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.swapaxes(probs @ v, -2, -3).reshape(*lead, n1, c)
        out = dense(c, "proj", True)(out)
        return nn.Dropout(self.drop_rate, deterministic=not train)(out), probs


class SemanticBlock(nn.Module):
    """Official ``layers.Block``: pre-norm, layer-scaled attention and MLP, residual on the queries.

    ``x [B, N, C]`` queries ``norm1(context)`` if a context is given (the global update: ``[Z; X]``;
    the recovery: ``Z``), else ``norm1(x)``. ``local_window=s`` restricts attention to the s x s
    groups of the square token grid (the semantic tokens of one image window). Returns
    ``(x, probs [B, (nW,) H, N, keys])``.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-5
    local_window: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, train: bool = False) -> tuple[Array, Array]:
        b, n, c = x.shape
        norm1 = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm1")
        attn = SemanticAttention(self.num_heads, self.qkv_bias, self.drop_rate, self.dtype, name="attn")
        drop_path = DropPath(self.drop_path_rate)
        y = norm1(x)
        if self.local_window:
            if context is not None:
                raise ValueError("a local SemanticBlock attends within its own tokens; got a context")
            s, side = self.local_window, math.isqrt(n)
            groups = token_ops.window_partition(y.reshape(b, side, side, c), s).reshape(b, -1, s * s, c)
            out, probs = attn(groups, groups, train)
            out = token_ops.window_reverse(out.reshape(b, -1, s, s, c), side, side).reshape(b, n, c)
        else:
            out, probs = attn(y, y if context is None else norm1(context), train)
        x = x + drop_path(_layer_scale(self, "layer_scale_1", c, self.layer_scale_init) * out, train)
        y = Mlp(self.mlp_ratio, self.drop_rate, self.dtype, name="mlp")(
            nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm2")(x), train)
        return x + drop_path(_layer_scale(self, "layer_scale_2", c, self.layer_scale_init) * y, train), probs


class SemanticGeneration(nn.Module):
    """Official ``layers.SemanticAttentionBlock``: semantic tokens from a ``[B, R, R, C]`` map.

    Per ``window x window`` window: ``Z0`` = adaptive max pool to ``s x s`` (PyTorch's bins);
    queries ``norm1(Z0)``, keys ``norm1([Z0; neighbourhood])`` (the window's neighbourhood of
    ``neighbourhood_size``^2 image tokens); ``Z = ls1 * Attn`` with **no** residual, then
    ``Z += ls2 * MLP(norm2(Z))``. ``Z [B, S, C]`` is a ``(R/w * s)``-square grid, row-major
    (window row, token row, window column, token column). Also returns the head-mean attention of
    each semantic token to the map ``[B, S, R, R]`` (zero outside its neighbourhood).
    """

    num_heads: int
    window_size: int
    sample_window_size: int = 3
    neighbourhood_size: int = 10
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        b, r, _, c = x.shape
        w, s = self.window_size, self.sample_window_size
        n, ns = r // w, s * s
        pooled = adaptive_max_pool(token_ops.window_partition(x, w).reshape(b * n * n, w, w, c), s, s)
        pooled = pooled.reshape(b, n * n, ns, c)
        starts, k = neighbourhood_starts(r, w, self.neighbourhood_size), min(self.neighbourhood_size, r)
        near = jnp.stack([x[:, r0:r0 + k, c0:c0 + k] for r0 in starts for c0 in starts], axis=1)
        norm1 = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm1")
        keys = norm1(jnp.concatenate([pooled, near.reshape(b, n * n, k * k, c)], axis=2))
        out, probs = SemanticAttention(self.num_heads, self.qkv_bias, self.drop_rate, self.dtype, name="attn")(
            norm1(pooled), keys, train)
        z = _layer_scale(self, "layer_scale_1", c, self.layer_scale_init) * out  # no shortcut (official default)
        z = z.reshape(b, n, n, s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n * ns, c)
        y = Mlp(self.mlp_ratio, self.drop_rate, self.dtype, name="mlp")(
            nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm2")(z), train)
        z = z + DropPath(self.drop_path_rate)(_layer_scale(self, "layer_scale_2", c, self.layer_scale_init) * y, train)
        # attention to the image tokens, scattered back to the map, in the semantic-grid order
        near_attn = jnp.mean(probs[..., ns:], axis=2).reshape(b, n * n, ns, k, k)
        maps = jnp.stack([jnp.pad(near_attn[:, i * n + j], ((0, 0), (0, 0), (r0, r - r0 - k), (c0, r - c0 - k)))
                          for i, r0 in enumerate(starts) for j, c0 in enumerate(starts)], axis=1)
        maps = maps.reshape(b, n, n, s, s, r, r).transpose(0, 1, 3, 2, 4, 5, 6).reshape(b, n * n * ns, r, r)
        return z, maps


class SemanticStage(nn.Module):
    """Stage 3 of STViT-R (official ``Deit`` class): PatchMerging, then groups of six layers.

    Group ``g`` (layers ``blocks_{6g+k}``): k=0 Swin block (shift 0) on the map X; k=1 generation
    (:class:`SemanticGeneration`); k=2 global update, Z (+ ``semantic_token2`` in the first group if
    ``use_global``) queries ``[Z; X]``; k=3 local (within each window's s x s tokens); k=4 global
    over Z; k=5 recovery, X queries Z. ``[B, 2R, 2R, C/2] -> ([B, R, R, C], info)``; ``info`` holds
    per group the semantic tokens after k=4 and what they attend to (see :class:`STViTRSwin`).
    """

    num_heads: int
    window_size: int
    drop_path_rates: Sequence[float]
    sample_window_size: int = 3
    neighbourhood_size: int = 10
    use_global: bool = False
    layer_scale_init: float = 1e-5
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, tuple[Array, ...]]]:
        x = PatchMerging(dtype=self.dtype, name="downsample")(x)
        b, r, _, c = x.shape
        n_sem = (r // self.window_size) ** 2 * self.sample_window_size ** 2
        tokens_out, local_attn, global_attn = [], [], []
        for g in range(len(self.drop_path_rates) // GROUP):
            j, rates = GROUP * g, self.drop_path_rates[GROUP * g:GROUP * (g + 1)]

            def block(k: int, local: int = 0) -> SemanticBlock:
                return SemanticBlock(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate, rates[k],
                                     self.layer_scale_init, local, self.dtype, name=f"blocks_{j + k}")

            x = SwinBlock(self.num_heads, self.window_size, 0, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                          rates[0], self.dtype, name=f"blocks_{j}")(x, train)
            z, maps = SemanticGeneration(self.num_heads, self.window_size, self.sample_window_size,
                                         self.neighbourhood_size, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                                         rates[1], self.layer_scale_init, self.dtype, name=f"blocks_{j + 1}")(x, train)
            image = x.reshape(b, r * r, c)
            queries = z
            if self.use_global and g == 0:
                queries = z + self.param("semantic_token2", _dense_init, (1, n_sem, c))
            z, probs = block(2)(queries, jnp.concatenate([z, image], axis=1), train)
            z, _ = block(3, self.sample_window_size)(z, None, train)
            z, _ = block(4)(z, None, train)
            image, _ = block(5)(image, z, train)
            x = image.reshape(b, r, r, c)
            tokens_out.append(z)
            local_attn.append(maps)
            global_attn.append(jnp.mean(probs[..., n_sem:], axis=1).reshape(b, n_sem, r, r))
        return x, {"semantic_tokens": tuple(tokens_out), "semantic_attention": tuple(local_attn),
                   "semantic_global_attention": tuple(global_attn)}


class ConvBN(nn.Module):
    """Official ``Conv2d_BN``: Conv 3x3 stride 2 pad 1 without bias (``c``), BatchNorm (``bn``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = nn.Conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=_torch_conv_init, dtype=self.dtype, name="c")(x)
        # PyTorch momentum 0.1 is Flax momentum 0.9 (the weight of the old running value).
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                            name="bn")(x)


class ConvStem(nn.Module):
    """LeViT-style stem: ``[B, H, W, 3] -> [B, H/4, W/4, C]``; ``proj_0`` / ``proj_2`` as in
    the official ``patch_embed.proj`` Sequential (1 and 3 are the Hardswish activations)."""

    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        x = jax.nn.hard_swish(ConvBN(self.embed_dim // 2, self.dtype, name="proj_0")(images, train))
        return jax.nn.hard_swish(ConvBN(self.embed_dim, self.dtype, name="proj_2")(x, train))


class STViTRSwin(SwinTransformer):
    """STViT-R: Swin with a conv-BN stem and semantic tokens in stage 3; returns ``(logits, aux)``.

    ``aux`` adds to Swin's (``features``, ``tokens``, ...), one entry per group of six layers:
    ``semantic_tokens`` ``[B, S, C_3]`` (after the local and global semantic layers, what the image
    tokens recover from), ``semantic_attention`` ``[B, S, R, R]`` (the generation layer's head-mean
    attention of each semantic token to the image tokens of its neighbourhood, scattered onto the
    stage-3 map; the rest of its mass goes to the pooled tokens) and ``semantic_global_attention``
    ``[B, S, R, R]`` (the global update's attention to the image tokens). ``S`` =
    :attr:`num_semantic_tokens`, static: 36 at 224 px with 3x3 per window, 64 with 4x4.
    """

    sample_window_size: int = 3
    neighbourhood_size: int = 10
    use_global: bool = False
    layer_scale_init: float = 1e-5

    # official stem keys ``patch_embed.proj.{0,2}.{c,bn}.*`` -> ``patch_embed/proj_{0,2}/...``; the rest as Swin
    checkpoint_renames = (((r"^patch_embed\.proj\.(\d+)\.", r"patch_embed.proj_\1."),)
                          + SwinTransformer.checkpoint_renames)

    @property
    def semantic_window(self) -> int:
        """Window side the semantic tokens are pooled from (the stage-3 window)."""
        return token_ops.effective_window(self.stage_resolutions[2], self.window_size, 0)[0]

    @property
    def num_semantic_tokens(self) -> int:
        return (self.stage_resolutions[2] // self.semantic_window) ** 2 * self.sample_window_size ** 2

    def check_geometry(self) -> None:
        super().check_geometry()
        if self.num_stages < 3 or not self.depths[2] or self.depths[2] % GROUP:
            raise ValueError(f"STViT-R's stage 3 runs groups of {GROUP} layers: depths={tuple(self.depths)} needs "
                             f"at least 3 stages and depths[2] a multiple of {GROUP} (official: 6, 12 or 18)")
        if not 0 < self.sample_window_size <= self.semantic_window:
            raise ValueError(f"sample_window_size={self.sample_window_size} must lie in [1, {self.semantic_window}] "
                             f"(the stage-3 window at img_size={self.img_size})")
        if self.embed_dim % 2:
            raise ValueError(f"embed_dim={self.embed_dim} must be even (the stem's first conv has "
                             "embed_dim/2 channels)")

    def build_stem(self) -> nn.Module:
        return ConvStem(self.embed_dim, self.dtype)

    def build_stage(self, i: int) -> nn.Module:
        if i != 2:
            return super().build_stage(i)
        return SemanticStage(self.num_heads[2], self.semantic_window,
                             self.drop_path_rates()[2], self.sample_window_size, self.neighbourhood_size,
                             self.use_global, self.layer_scale_init, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                             self.dtype)

    def run_stage(self, i: int, x: Array, train: bool, aux: Aux, sparsity: SparsitySpec | None) -> Array:
        if i != 2:
            return super().run_stage(i, x, train, aux, sparsity)
        x, info = self.layers[2](x, train)
        aux.update(info)
        return x

    # -- FLOPs (MACs of convs, linear layers and attention products; norms not counted) -------

    def stem_macs(self) -> float:
        half, quarter, c = self.img_size // 2, self.img_size // 4, self.embed_dim
        return float(9 * (half ** 2 * (c // 2) * self.in_chans + quarter ** 2 * c * (c // 2)))

    def stage_macs(self, i: int) -> float:
        if i != 2:
            return super().stage_macs(i)
        r, c, w = self.stage_resolutions[2], self.stage_dims[2], self.semantic_window
        n, s, m = r * r, self.num_semantic_tokens, self.mlp_ratio
        ns, nw, k = self.sample_window_size ** 2, (r // w) ** 2, min(self.neighbourhood_size, r) ** 2

        def semantic(queries: int, keys_total: int, pairs: int) -> float:
            """q/proj on the queries, kv on every key row, QK^T and AV over ``pairs`` pairs, MLP."""
            return 2 * queries * c * c + 2 * keys_total * c * c + 2 * pairs * c + 2 * m * queries * c * c

        swin = 4 * n * c * c + 2 * n * w * w * c + 2 * m * n * c * c
        group = (swin
                 + semantic(s, nw * (ns + k), s * (ns + k))  # generation: per window [Z0; neighbourhood]
                 + semantic(s, s + n, s * (s + n))  # global update on [Z; X]
                 + semantic(s, s, s * ns)  # local
                 + semantic(s, s, s * s)  # global
                 + semantic(n, s, n * s))  # recovery
        return float(n * 4 * (c // 2) * c + self.depths[2] // GROUP * group)


def guess_stvitr_name(state_dict: Mapping[str, Any]) -> str | None:
    """Registered STViT-R whose width and stage-3 depth match an official state dict, if any."""
    stem = state_dict.get("patch_embed.proj.2.c.weight")
    if stem is None or "layers.2.blocks.1.attn.q.weight" not in state_dict:
        return None
    third = {int(m.group(1)) for k in state_dict for m in [re.match(r"layers\.2\.blocks\.(\d+)\.", k)] if m}
    for size, (dim, depths, _) in SWIN_SIZES.items():
        if np.shape(stem)[0] == dim and len(third) == depths[2]:
            return f"stvitr_swin_{size}_patch4_window7_224"
    return None


# Test size at 224 px (the official neighbourhoods need the 14x14 stage-3 map): width 32, one group.
STVITR_TEST_GEOMETRY = dict(img_size=224, patch_size=4, window_size=7, embed_dim=32, depths=(2, 2, 6, 2),
                            num_heads=(2, 4, 8, 16), num_classes=10)


def _register() -> None:
    # drop_path_rate stays 0 here (inference); the official runs train with 0.2 / 0.3 / 0.4 (T / S / B).
    for size, (dim, depths, heads) in SWIN_SIZES.items():
        register_model(f"stvitr_swin_{size}_patch4_window7_224", STViTRSwin,
                       f"STViT-R on Swin-{size[0].upper()} (width {dim}, depths {depths}): conv-BN stem, semantic "
                       f"tokens in stage 3 (9 per 7x7 window; sample_window_size=4 for 16)", tags=("stvitr",),
                       img_size=224, patch_size=4, window_size=7, embed_dim=dim, depths=depths, num_heads=heads,
                       num_classes=1000)
    register_model("stvitr_test_patch4_window7_224", STViTRSwin,
                   "test-size STViT-R: 224 px, width 32, depths 2/2/6/2 (one semantic group)",
                   tags=("stvitr", "stvitr_test"), **STVITR_TEST_GEOMETRY)


_register()
