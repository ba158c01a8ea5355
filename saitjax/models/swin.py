"""Swin Transformer (Liu et al., ICCV 2021): windowed attention, shifted windows, patch merging.

A dense hierarchical backbone for the zoo, in timm's (>= 0.9) layout, with parameter names close
to timm's keys: ``patch_embed/proj``, ``patch_embed/norm``, ``layers_{i}/downsample/{norm,
reduction}`` (PatchMerging at the *start* of stage ``i > 0``), ``layers_{i}/blocks_{j}/{norm1,
attn/{qkv,proj,relative_position_bias_table},norm2,mlp/{fc1,fc2}}``, ``norm``, ``head``. The
relative-position index and the shifted-window masks are NumPy constants, not parameters.

Details that decide parity with timm and the official code: LayerNorm eps 1e-5, exact GELU,
cyclic shift by ``-shift`` before and ``+shift`` after attention, mask fill -100, a window as large
as the map shrinks to it and is never shifted, PatchMerging concatenates ``x[0::2,0::2],
x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]`` then LayerNorm(4C) and Linear(4C -> 2C, no bias).

Subclasses (STViT-R) swap pieces through :meth:`SwinTransformer.build_stem`,
:meth:`SwinTransformer.build_stage`, :meth:`SwinTransformer.run_stage` and the FLOP hooks
:meth:`SwinTransformer.stem_macs` / :meth:`SwinTransformer.stage_macs`, without copying the forward.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saitjax.models.core import precision, token_ops
from saitjax.models.hierarchical import HierarchicalBackbone, HierarchicalStage
from saitjax.models.registry import register_model
from saitjax.models.vit import Aux, DropPath, Mlp, check_nhwc_images
from saitjax.sparsity import SparsitySpec

Array = jax.Array

LN_EPS = 1e-5
_dense_init = nn.initializers.truncated_normal(0.02)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias.

    ``x [B, nW, N, C]`` (``N = window**2`` tokens per window, row-major) and an optional additive
    ``mask [nW, N, N]`` (shifted windows) -> ``[B, nW, N, C]``.
    """

    num_heads: int
    window_size: int
    qkv_bias: bool = True
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | np.ndarray | None = None, train: bool = False) -> Array:
        b, nw, n, c = x.shape
        h, w = self.num_heads, self.window_size
        if n != w * w:
            raise ValueError(f"WindowAttention(window_size={w}) got windows of {n} tokens, expected {w * w}")
        table = self.param("relative_position_bias_table", _dense_init, ((2 * w - 1) ** 2, h))
        bias = table[token_ops.relative_position_index(w).reshape(-1)].reshape(n, n, h).transpose(2, 0, 1)
        qkv = precision.dense(3 * c, self.dtype, "qkv", use_bias=self.qkv_bias, kernel_init=_dense_init)(x)
        q, k, v = qkv.reshape(b, nw, n, 3, h, c // h).transpose(3, 0, 1, 4, 2, 5)  # each [B, nW, H, N, d]
        logits = (q * (c // h) ** -0.5) @ jnp.swapaxes(k, -1, -2)
        logits = logits.astype(jnp.float32) + bias.astype(jnp.float32)
        if mask is not None:
            logits = logits + jnp.asarray(mask, jnp.float32)[None, :, None]
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = (attn @ v).transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c)
        out = precision.dense(c, self.dtype, "proj", kernel_init=_dense_init)(out)
        return nn.Dropout(self.drop_rate, deterministic=not train)(out)


class SwinBlock(nn.Module):
    """Pre-norm Swin block on a ``[B, H, W, C]`` map: (shifted-)window attention, then the MLP.

    ``window_size`` and ``shift_size`` are the ones actually used (see
    :func:`saitjax.models.core.token_ops.effective_window`); the map side must be a multiple of the window.
    Written with ``setup`` and two named halves, :meth:`token_mix` (``x + attention``) and
    :meth:`channel_mlp` (``MLP(LN(.))``), so that a routed variant (DynamicViT's fast/slow paths)
    reuses them under the same parameter names.
    """

    num_heads: int
    window_size: int
    shift_size: int = 0
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        self.norm1 = nn.LayerNorm(LN_EPS, dtype=self.dtype)
        self.attn = WindowAttention(self.num_heads, self.window_size, self.qkv_bias, self.drop_rate, self.dtype)
        self.norm2 = nn.LayerNorm(LN_EPS, dtype=self.dtype)
        self.mlp = Mlp(self.mlp_ratio, self.drop_rate, self.dtype)
        self.drop_path = DropPath(self.drop_path_rate)

    def token_mix(self, x: Array, train: bool = False) -> Array:
        """``x + drop_path(W-MSA(LN(x)))``: the attention half with its residual."""
        b, height, width, c = x.shape
        w, s = self.window_size, self.shift_size
        if height != width or height % w:
            raise ValueError(f"SwinBlock: a {height}x{width} map is not square or not a multiple of window_size={w}")
        y = token_ops.cyclic_shift(self.norm1(x), -s)
        windows = token_ops.window_partition(y, w)
        nw = windows.shape[1]
        y = self.attn(windows.reshape(b, nw, w * w, c), token_ops.shifted_window_mask(height, w, s), train)
        y = token_ops.cyclic_shift(token_ops.window_reverse(y.reshape(b, nw, w, w, c), height, width), s)
        return x + self.drop_path(y, train)

    def channel_mlp(self, u: Array, train: bool = False) -> Array:
        """The point-wise half: ``MLP(LN(u))`` (before drop path)."""
        return self.mlp(self.norm2(u), train)

    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.token_mix(x, train)
        return x + self.drop_path(self.channel_mlp(x, train), train)


class PatchMerging(nn.Module):
    """Halve the map, ``[B, H, W, C]`` -> ``[B, H/2, W/2, out_dim or 2C]``: each 2x2 neighbourhood
    concatenated (official order), LayerNorm(4C), Linear without bias."""

    out_dim: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm")(x)
        return precision.dense(self.out_dim or 2 * c, self.dtype, "reduction", use_bias=False,
                               kernel_init=_dense_init)(x)


class SwinStage(HierarchicalStage, nn.Module):
    """One stage: optional PatchMerging (``has_downsample``), then ``len(drop_path_rates)`` blocks whose
    odd members shift by half a window. ``resolution`` is the map side after the downsample.

    Blocks from index ``routed_from`` on are built as ``routed_block`` (same arguments) when it is
    given: how DynamicViT's Swin puts its fast/slow blocks into stage 3 without a copy of the stage.
    """

    resolution: int
    num_heads: int
    window_size: int
    drop_path_rates: Sequence[float]
    has_downsample: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    routed_block: Any = None
    routed_from: int = 0

    def setup(self):
        self.downsample = PatchMerging(dtype=self.dtype) if self.has_downsample else None
        blocks = []
        for j, rate in enumerate(self.drop_path_rates):
            w, s = token_ops.effective_window(self.resolution, self.window_size, self.window_size // 2 if j % 2 else 0)
            cls = self.routed_block if self.routed_block is not None and j >= self.routed_from else SwinBlock
            blocks.append(cls(num_heads=self.num_heads, window_size=w, shift_size=s, mlp_ratio=self.mlp_ratio,
                              qkv_bias=self.qkv_bias, drop_rate=self.drop_rate, drop_path_rate=rate, dtype=self.dtype))
        self.blocks = blocks



class SwinPatchEmbed(nn.Module):
    """Conv ``patch x patch`` / stride ``patch`` then LayerNorm: ``[B, H, W, 3]`` -> ``[B, H/p, W/p, C]``."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(images)
        return nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm")(x)


class SwinTransformer(HierarchicalBackbone, nn.Module):
    """Swin classifier returning ``(logits, aux)``; dense only.

    ``aux``: ``features`` (tuple of the stage outputs ``[B, H_i, W_i, C_i]``, NHWC, after each
    stage's blocks and before the next stage's PatchMerging; the last one is *not* normed, as in
    timm's ``forward_intermediates`` and the detection backbones, which norm each map themselves),
    ``tokens`` (the last stage's tokens after the final LayerNorm, ``[B, H_4*W_4, C_4]``), and
    empty ``keep_masks`` / ``keep_indices`` (nothing is pruned). ``num_patches`` counts the tokens
    after the stem (stage 1: 56x56 = 3136 at 224 px).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    # timm (>= 0.9) keys -> Linen paths; the official layout is mapped onto timm's first
    # (checkpoint_key_map). BASE_RENAMES of the converter adds nothing here.
    checkpoint_renames = ((r"^layers\.(\d+)\.", r"layers_\1."), (r"\.blocks\.(\d+)\.", r".blocks_\1."),
                          (r"^head\.fc\.", "head."))

    family = "Swin"  # in the dense-only message

    # -- static geometry (the rest: HierarchicalBackbone) -----------------------------------------

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2 ** i for i in range(self.num_stages))

    def check_geometry(self) -> None:
        """Raise a ValueError naming the field and a fix if the stages cannot tile the image."""
        n = self.num_stages
        self.check_per_stage("num_heads", self.num_heads)
        for i, (dim, heads) in enumerate(zip(self.stage_dims, self.num_heads)):
            if dim % heads:
                raise ValueError(f"stage {i} width {dim} (embed_dim={self.embed_dim} * 2**{i}) is not divisible by "
                                 f"num_heads[{i}]={heads}")
        unit = self.patch_size * 2 ** (n - 1) * self.window_size
        fix = (f"use an img_size that is a multiple of patch_size * 2**(stages-1) * window_size = {unit} "
               f"(e.g. {unit}, {2 * unit}), or a window_size that divides every stage's map")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}: {fix}")
        if self.grid_size % 2 ** (n - 1):
            raise ValueError(f"img_size={self.img_size} gives a {self.grid_size}x{self.grid_size} patch grid that "
                             f"{n - 1} PatchMerging steps cannot halve evenly: {fix}")
        for i, r in enumerate(self.stage_resolutions):
            if r > self.window_size and r % self.window_size:
                raise ValueError(f"img_size={self.img_size}: stage {i} runs on a {r}x{r} map, not a multiple of "
                                 f"window_size={self.window_size}: {fix}")

    # -- overridable pieces (STViT-R swaps the stem and stage 3) -------------------------------

    def build_stem(self) -> nn.Module:
        """Images ``[B, H, W, in_chans]`` -> map ``[B, H/4, W/4, embed_dim]``; called as ``stem(x, train)``."""
        return SwinPatchEmbed(self.patch_size, self.embed_dim, self.dtype)

    def build_stage(self, i: int, **overrides: Any) -> nn.Module:
        """Stage ``i``: a map ``[B, H, W, C_{i-1}]`` -> ``[B, H', W', C_i]``; called as ``stage(x, train)``.
        ``overrides``: further :class:`SwinStage` fields (a routed block type)."""
        return SwinStage(self.stage_resolutions[i], self.num_heads[i], self.window_size, self.drop_path_rates()[i],
                         has_downsample=i > 0, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                         drop_rate=self.drop_rate, dtype=self.dtype, **overrides)

    def embed(self, images: Array, train: bool) -> Array:
        """Stem then dropout: the first map of :meth:`forward_features`."""
        return self.pos_drop(self.patch_embed(images, train), deterministic=not train)

    def run_stage(self, i: int, x: Array, train: bool, aux: Aux, sparsity: SparsitySpec | None) -> Array:
        """Run stage ``i`` (a subclass whose stage reports more may add entries to ``aux``)."""
        return self.layers[i](x, train)

    def stage_module(self, i: int) -> nn.Module:
        return self.layers[i]

    def setup(self):
        self.check_geometry()
        self.patch_embed = self.build_stem()
        self.layers = [self.build_stage(i) for i in range(self.num_stages)]
        self.norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype)
        self.pos_drop = nn.Dropout(self.drop_rate)

    # -- forward ---------------------------------------------------------------------------------

    def check_images(self, images: Array) -> None:
        check_nhwc_images(images, self.img_size, self.in_chans,
                          "every stage's map must be a multiple of window_size")

    def __call__(self, images: Array, *, train: bool = False,
                 sparsity: SparsitySpec | None = None) -> tuple[Array, Aux]:
        x, aux = self.forward_features(images, train, sparsity)
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, c)
        logits = self.head(jnp.mean(tokens, axis=1)).astype(jnp.float32)
        aux["tokens"] = tokens
        return logits, aux

    # -- FLOPs (fvcore convention: MACs of linear layers, convs and attention matmuls) ------------

    def stage_macs(self, i: int) -> float:
        """PatchMerging (if any) plus every block: qkv/proj ``4NC^2``, QK^T and AV ``2 N w^2 C`` per
        window summed, MLP ``2 r N C^2``."""
        r, c = self.stage_resolutions[i], self.stage_dims[i]
        n = r * r
        w, _ = token_ops.effective_window(r, self.window_size, 0)
        merge = n * 4 * (c // 2) * c if i > 0 else 0
        block = 4 * n * c * c + 2 * n * w * w * c + 2 * self.mlp_ratio * n * c * c
        return float(merge + self.depths[i] * block)

    # -- checkpoints ----------------------------------------------------------------------------

    @classmethod
    def checkpoint_key_map(cls, keys: Sequence[str]) -> dict[str, str]:
        """Rename the official (microsoft / STViT-R) layout onto timm's; timm keys map to themselves.

        The official code puts PatchMerging at the *end* of stage ``i`` (``layers.0.downsample``
        exists) and the classifier at ``head.weight``; timm puts it at the start of stage ``i + 1``
        and uses ``head.fc``. Regex renames cannot add one to a stage index, hence this hook.
        """
        official = any(k.startswith("layers.0.downsample.") for k in keys)
        if not official:
            return {k: k for k in keys}

        def rename(key: str) -> str:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
            return re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)

        return {k: rename(k) for k in keys}


# (name, width, depths, heads); timm's names, weights and published GMACs (Swin paper, Table 1).
SWIN_SIZES = {"tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
              "base": (128, (2, 2, 18, 2), (4, 8, 16, 32))}
# Tiny test size: 32 px, patch 4 -> maps 8, 4, 2, 1 with window 4: stage 0 has 4 windows and
# shifted (masked) odd blocks; stage 1's window equals its 4x4 map (no shift); stages 2-3 shrink it.
SWIN_TEST_GEOMETRY = dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2, 2, 2),
                          num_heads=(2, 4, 8, 16), num_classes=10)
# Demo size for the generated 64-px dataset (2 CPU cores, ~100 img/s per training step): patch 2 ->
# maps 32, 16, 8, 4 with window 4, so stage 3 has 64 locations in 4 (shifted) windows.
SWIN_DEMO_GEOMETRY = dict(img_size=64, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1, 6, 1),
                          num_heads=(1, 2, 4, 8), num_classes=8)


def guess_swin_name(state_dict: Mapping[str, Any]) -> str | None:
    """Registered Swin whose width and stage-3 depth match a timm or official state dict, if any."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or np.shape(proj)[2:] != (4, 4) or not any(".relative_position_bias_table" in k for k in state_dict):
        return None
    third = {int(m.group(1)) for k in state_dict for m in [re.match(r"layers\.2\.blocks\.(\d+)\.", k)] if m}
    for size, (dim, depths, _) in SWIN_SIZES.items():
        if np.shape(proj)[0] == dim and len(third) == depths[2]:
            return f"swin_{size}_patch4_window7_224"
    return None


def _register() -> None:
    for size, (dim, depths, heads) in SWIN_SIZES.items():
        name = f"swin_{size}_patch4_window7_224"
        register_model(name, SwinTransformer,
                       f"Swin-{size[0].upper()} (width {dim}, depths {depths}, heads {heads}, window 7) at 224 px",
                       timm_name=name, tags=("swin",), img_size=224, patch_size=4, window_size=7,
                       embed_dim=dim, depths=depths, num_heads=heads, num_classes=1000)
    register_model("swin_test_patch4_window4_32", SwinTransformer,
                   "test-size Swin: 32 px, patch 4, window 4 (maps 8/4/2/1), width 32, depths 2/2/2/2",
                   tags=("swin", "swin_test"), **SWIN_TEST_GEOMETRY)
    register_model("swin_demo_patch2_window4_64", SwinTransformer,
                   "demo-size Swin: 64 px, patch 2, window 4 (maps 32/16/8/4), width 24, depths 1/1/6/1",
                   tags=("swin", "demo"), **SWIN_DEMO_GEOMETRY)


_register()
