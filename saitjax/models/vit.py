"""Dense ViT/DeiT backbone with a pruning hook between blocks.

Pre-norm blocks, exact GELU, LayerNorm eps 1e-6, attention in ``(B, H, N, d)`` layout (on
XLA:CPU an einsum over ``(B, N, H, d)`` measured up to 3.5x slower). Parameter names follow
timm's DeiT (``patch_embed/proj``, ``blocks_3/attn/qkv``, ``norm``, ``head``), so converted
checkpoints are readable and every sparse variant loads dense weights unchanged.

Sparse methods subclass :class:`VisionTransformer` and override :meth:`select_tokens`; the base
class implements the parameter-free rule: keep the patch tokens that the CLS token attends to
most in the previous block (head-averaged), with a static count per stage.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from saitjax.models import token_ops
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array
Aux = dict[str, Any]

_dense_init = nn.initializers.truncated_normal(0.02)
_LN_EPS = 1e-6


class TokenState(struct.PyTreeNode):
    """Tokens between blocks.

    ``x [B, N, C]`` starts with the prefix tokens (CLS, distillation). ``keep [B, N]`` is a 0/1
    float mask of tokens visible as attention keys (``None``: all), used by masked training and by
    capacity padding. ``patch_index [B, N - prefix]`` is each patch token's original grid index.
    """

    x: Array
    keep: Array | None
    patch_index: Array


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
        return jnp.where(mask, x / keep_prob, 0.0).astype(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens ``[B, N, C]`` in row-major grid order."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="proj")(images)
        return x.reshape(x.shape[0], -1, self.embed_dim)


class Attention(nn.Module):
    """Multi-head self-attention whose pruned keys (``keep == 0``) are invisible to others."""

    num_heads: int
    qkv_bias: bool = True
    head_weighting: str = "mean"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, keep: Array | None) -> tuple[Array, Array]:
        b, n, c = x.shape
        h = self.num_heads
        qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=_dense_init,
                       name="qkv")(x)
        q, k, v = qkv.reshape(b, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)  # each [B, H, N, d]
        logits = (q * (c // h) ** -0.5) @ jnp.swapaxes(k, -1, -2)
        attn = token_ops.masked_softmax(logits, keep)  # float32 [B, H, N, N]
        heads = attn.astype(v.dtype) @ v  # [B, H, N, d]
        out = nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init, name="proj")(
            heads.transpose(0, 2, 1, 3).reshape(b, n, c))
        cls_attn = attn[:, :, 0, :]
        if self.head_weighting == "importance":
            cls_attn = cls_attn * token_ops.head_importance(heads)
        return out, cls_attn


class Mlp(nn.Module):
    hidden_dim: int
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=_dense_init, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = nn.Dense(c, dtype=self.dtype, kernel_init=_dense_init, name="fc2")(x)
        return nn.Dropout(self.drop_rate, deterministic=not train)(x)


class Block(nn.Module):
    """Pre-norm transformer block; also returns the CLS query's attention ``[B, H, N]``.

    With ``head_weighting="importance"`` each head's CLS attention is weighted by the head's
    importance for the key token (AS-ViT), so that summing over heads gives AS-ViT's score.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_weighting: str = "mean"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, keep: Array | None, train: bool) -> tuple[Array, Array]:
        drop_path = DropPath(self.drop_path_rate)
        y, cls_attn = Attention(self.num_heads, self.qkv_bias, self.head_weighting, self.dtype, name="attn")(
            nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm1")(x), keep)
        y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
        x = x + drop_path(y, train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, self.dtype, name="mlp")(
            nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm2")(x), train)
        return x + drop_path(y, train), cls_attn


class VisionTransformer(nn.Module):
    """ViT/DeiT classifier returning ``(logits, aux)``.

    ``aux`` keys: ``keep_masks`` (tuple, one ``[B, N_patches]`` 0/1 map per pruning stage, in
    original grid order), ``keep_indices`` (tuple of ``[B, k_s]`` original patch indices;
    gather mode), ``tokens`` (final normalised tokens ``[B, N, C]``), ``cls_attn`` (last block's
    CLS attention ``[B, H, N]``) and, for distilled models, ``logits_cls``/``logits_dist``.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # How the CLS attention that scores tokens combines heads: "mean" (plain head average) or
    # "importance" (AS-ViT: each head weighted by the norm of its output at the key token).
    head_weighting: str = "mean"
    dtype: Any = jnp.float32

    # -- static geometry ---------------------------------------------------------------------

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    def token_schedule(self, spec: SparsitySpec | None = None) -> tuple[int, ...]:
        """Tokens (prefix included) that enter each block under a fixed-count ``spec``."""
        spec = spec or SparsitySpec.dense()
        n = self.num_patches
        counts = dict(zip(spec.locations, spec.keep_counts(n))) if not spec.is_dense else {}
        if spec.mode == "mask":
            counts = {}
        schedule = []
        for i in range(self.depth):
            n = counts.get(i, n)
            schedule.append(n + self.num_prefix_tokens)
        return tuple(schedule)

    # -- modules -------------------------------------------------------------------------------

    def setup(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.head_weighting not in ("mean", "importance"):
            raise ValueError(f"head_weighting={self.head_weighting!r}: choose 'mean' or 'importance'")
        c = self.embed_dim
        self.patch_embed = PatchEmbed(self.patch_size, c, self.dtype)
        self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c))
        if self.distilled:
            self.dist_token = self.param("dist_token", _dense_init, (1, 1, c))
        self.pos_embed = self.param("pos_embed", _dense_init,
                                    (1, self.num_prefix_tokens + self.num_patches, c))
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        self.blocks = [Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate, rate,
                             self.head_weighting, self.dtype) for rate in rates]
        self.norm = nn.LayerNorm(_LN_EPS, dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype)
        if self.distilled:
            self.head_dist = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype)
        self.pos_drop = nn.Dropout(self.drop_rate)

    # -- forward ---------------------------------------------------------------------------------

    def check_images(self, images: Array) -> None:
        """Fail at trace time, with the fix, on images of the wrong layout or size."""
        expected = (self.img_size, self.img_size, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            hint = ""
            if images.ndim == 4 and images.shape[1] == self.in_chans and images.shape[3] != self.in_chans:
                hint = " They look channels-first (NCHW): transpose with images.transpose(0, 2, 3, 1)."
            elif images.ndim == 4 and images.shape[3] != self.in_chans:
                hint = f" The model expects {self.in_chans} channels."
            elif images.ndim == 4:
                hint = (f" Resize/crop them to {self.img_size} px, or create the model with "
                        f"img_size={images.shape[1]} (position embeddings are interpolated on load).")
            raise ValueError(f"expected images of shape [batch, {', '.join(map(str, expected))}] "
                             f"(NHWC), got {tuple(images.shape)}.{hint}")

    def embed(self, images: Array, train: bool) -> Array:
        x = self.patch_embed(images.astype(self.dtype))
        b = x.shape[0]
        prefix = [jnp.broadcast_to(self.cls_token, (b, 1, self.embed_dim))]
        if self.distilled:
            prefix.append(jnp.broadcast_to(self.dist_token, (b, 1, self.embed_dim)))
        x = jnp.concatenate(prefix + [x], axis=1) + self.pos_embed
        return self.pos_drop(x.astype(self.dtype), deterministic=not train)

    def __call__(self, images: Array, *, train: bool = False,
                 sparsity: SparsitySpec | None = None) -> tuple[Array, Aux]:
        spec = sparsity if sparsity is not None else SparsitySpec.dense()
        self.check_images(images)
        spec.check_depth(self.depth)
        x = self.embed(images, train)
        b = x.shape[0]
        state = TokenState(x, None, jnp.broadcast_to(jnp.arange(self.num_patches, dtype=jnp.int32),
                                                     (b, self.num_patches)))
        aux: Aux = {"keep_masks": (), "keep_indices": ()}
        return self.run_blocks(state, None, spec, train, aux, start=0)

    def run_blocks(self, state: TokenState, cls_attn: Array | None, spec: SparsitySpec, train: bool,
                   aux: Aux, start: int = 0, select_at_start: bool = True) -> tuple[Array, Aux]:
        """Blocks ``start..depth-1`` (pruning before each location of ``spec``), then the head.

        ``select_at_start=False`` skips the selection before block ``start`` (the caller already
        pruned there, e.g. SaiT's capacity-bucket branches).
        """
        stages = {} if spec.is_dense else {loc: s for s, loc in enumerate(spec.locations)}
        for i in range(start, self.depth):
            if i in stages and (i != start or select_at_start):
                state, stage_aux = self.select_tokens(stages[i], state, cls_attn, spec, train)
                append_stage_aux(aux, stage_aux)
            x, cls_attn = self.blocks[i](state.x, state.keep, train)
            state = state.replace(x=x)
        return self.classify(state, cls_attn, aux)

    def classify(self, state: TokenState, cls_attn: Array, aux: Aux) -> tuple[Array, Aux]:
        x = self.norm(state.x)
        logits = self.head(x[:, 0]).astype(jnp.float32)
        if self.distilled:
            logits_dist = self.head_dist(x[:, 1]).astype(jnp.float32)
            aux.update(logits_cls=logits, logits_dist=logits_dist)
            logits = (logits + logits_dist) / 2
        aux.update(tokens=x, cls_attn=cls_attn, patch_index=state.patch_index)
        return logits, aux

    # -- pruning hook ----------------------------------------------------------------------------

    def token_scores(self, state: TokenState, cls_attn: Array) -> Array:
        """Importance of each current patch token ``[B, N_cur]``: head-combined CLS attention,
        renormalised over the patch tokens (it sums to 1 per image)."""
        scores = jnp.sum(cls_attn[:, :, self.num_prefix_tokens:], axis=1)
        return scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-12)

    def select_tokens(self, stage: int, state: TokenState, cls_attn: Array, spec: SparsitySpec,
                      train: bool) -> tuple[TokenState, Aux]:
        """Prune before a block. Returns the new state and per-stage aux entries."""
        if spec.rule != "topk":
            raise SparsityError(
                f"{type(self).__name__} prunes with fixed counts (rule 'topk'); the adaptive rule "
                f"{spec.rule!r} needs a SaiT model (create_model('sait_...'))")
        k = spec.keep_counts(self.num_patches)[stage]
        scores = self.token_scores(state, cls_attn)
        return self.keep_top(state, scores, k, spec.mode)

    def keep_top(self, state: TokenState, scores: Array, k: int, mode: str) -> tuple[TokenState, Aux]:
        """Keep the ``k`` best-scored patch tokens, by gathering them or by masking the rest."""
        p = self.num_prefix_tokens
        if mode == "gather":
            idx = token_ops.topk_indices(scores, k)
            patch_index = token_ops.batched_gather(state.patch_index, idx)
            new = TokenState(token_ops.select_tokens(state.x, idx, p), None, patch_index)
            mask = token_ops.indices_to_mask(patch_index, self.num_patches)
            return new, {"keep_masks": mask, "keep_indices": patch_index}
        # mask mode: all tokens stay; only those already kept can be chosen again
        alive = state.keep[:, p:] if state.keep is not None else jnp.ones(scores.shape, jnp.float32)
        idx = token_ops.topk_indices(jnp.where(alive > 0, scores, -jnp.inf), k)  # any score sign
        keep_patches = token_ops.indices_to_mask(idx, scores.shape[-1])
        keep = jnp.concatenate([jnp.ones((scores.shape[0], p), jnp.float32), keep_patches], axis=1)
        return state.replace(keep=keep), {"keep_masks": keep_patches,
                                          "keep_indices": token_ops.batched_gather(state.patch_index, idx)}


def append_stage_aux(aux: Aux, stage_aux: Aux) -> None:
    """Add one pruning stage's entries to ``aux`` (each key holds a tuple, one item per stage)."""
    for key, value in stage_aux.items():
        aux[key] = aux.get(key, ()) + (value,)


def interpolate_pos_embed(pos_embed: Array, num_prefix: int, new_grid: int) -> Array:
    """Resize a ``[1, prefix + g*g, C]`` position embedding to another grid (bicubic)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patch tokens is not a square grid")
    if old == new_grid:
        return pos_embed
    c = grid.shape[-1]
    grid = jax.image.resize(grid.reshape(1, old, old, c).astype(jnp.float32),
                            (1, new_grid, new_grid, c), method="bicubic")
    return jnp.concatenate([prefix, grid.reshape(1, new_grid * new_grid, c).astype(pos_embed.dtype)], axis=1)
