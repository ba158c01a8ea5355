"""Dense ViT/DeiT backbone with a pruning hook between blocks.

Pre-norm blocks, exact GELU, LayerNorm eps 1e-6, attention in ``(B, H, N, d)`` layout (on
XLA:CPU an einsum over ``(B, N, H, d)`` measured up to 3.5x slower). Parameter names follow
timm's DeiT (``patch_embed/proj``, ``blocks_3/attn/qkv``, ``norm``, ``head``), so converted
checkpoints are readable and every sparse variant loads dense weights unchanged.

Two reduction points, as hooks a method module overrides (one or both; a method is never a
subclass of another method):

* :meth:`VisionTransformer.select_tokens` *between* blocks, on the previous block's attention
  (DynamicViT, SaiT, AS-ViT). The base class keeps the patch tokens the CLS token attends to most
  (head-averaged), with a static count per stage.
* :meth:`VisionTransformer.reduce_in_block` *inside* a block, between the attention residual and
  the MLP, on this block's attention (EViT fusion, ToMe merging). The base class does nothing.

Per-image counts (adaptive rules) run through the shared capacity-bucket runner
(:mod:`saitjax.models.core.buckets`); a model supplies the counts through :meth:`per_image_counts`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from saitjax.models.core import attention, precision, remat, token_ops
from saitjax.models.core.activations import gelu_exact
from saitjax.models.core.layer_norm import LayerNorm
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array
Aux = dict[str, Any]

_dense_init = nn.initializers.truncated_normal(0.02)
_LN_EPS = 1e-6


class TokenState(struct.PyTreeNode):
    """Tokens between (and inside) blocks: one small pytree every reduction reads and writes.

    * ``x [B, N, C]``: the tokens, prefix (CLS, distillation) first.
    * ``keep [B, N]``: 0/1 float mask of tokens visible as attention keys (``None``: all); masked
      training and capacity padding use it.
    * ``patch_index [B, N - prefix]``: the original grid index each patch token stands for (a
      merged token: the one it was merged into; EViT's fused token: ``num_patches``, none).
    * ``size [B, N]``: how many original tokens each token stands for (ToMe's merged sizes, EViT's
      fused token); drives proportional attention. 1 for every token of the dense model.
    * ``source [B, num_patches]``: position in ``x`` of the token holding each original patch,
      ``-1`` once the patch is discarded. Draws what any method kept, fused or merged.
    """

    x: Array
    keep: Array | None
    patch_index: Array
    size: Array
    source: Array
    # Tokens the current ones attend to as extra keys/values without being updated themselves
    # (STViT's image tokens while semantic tokens are generated), and the head-mean attention of
    # the current tokens to them in the last block that had a context ``[B, N, M]``.
    context: Array | None = None
    context_attn: Array | None = None

    @classmethod
    def initial(cls, x: Array, num_prefix: int) -> "TokenState":
        b, n = x.shape[:2]
        grid = jnp.broadcast_to(jnp.arange(n - num_prefix, dtype=jnp.int32), (b, n - num_prefix))
        return cls(x, None, grid, jnp.ones((b, n), jnp.float32), grid + num_prefix)

    def gather(self, idx: Array, num_prefix: int, keep: Array | None = None) -> "TokenState":
        """Keep the prefix and the patch tokens at ``idx [B, k]`` (in that order)."""
        old_to_new = token_ops.positions_after_gather(idx, self.x.shape[1], num_prefix)
        return TokenState(token_ops.select_tokens(self.x, idx, num_prefix), keep,
                          token_ops.batched_gather(self.patch_index, idx),
                          token_ops.select_tokens(self.size, idx, num_prefix),
                          token_ops.relabel_source(self.source, old_to_new), self.context)


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
        x = precision.patch_conv(self.embed_dim, p, self.dtype, "proj")(images)
        return x.reshape(x.shape[0], -1, self.embed_dim)


class QKVProjection(nn.Module):
    """The fused ``qkv`` Linear (timm's layout: kernel ``[C, 3C]``), computable in parts.

    Self-attention projects every token to q, k and v at once. Cross-attention to a context
    (STViT's semantic tokens reading the image tokens) needs queries only for the current tokens
    and keys/values for all of them: ``part="q"`` / ``"kv"`` multiply by that slice of the one
    kernel, so a dense checkpoint serves both and no unused projection is computed.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, part: str = "qkv") -> Array:
        c = self.features
        kernel = self.param("kernel", _dense_init, (x.shape[-1], 3 * c))
        bias = self.param("bias", nn.initializers.zeros, (3 * c,)) if self.use_bias else None
        cols = {"qkv": slice(None), "q": slice(0, c), "kv": slice(c, 3 * c)}[part]
        x, kernel = x.astype(self.dtype), kernel[:, cols].astype(self.dtype)
        y = precision.accumulate_f32(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return (y if bias is None else y + bias[cols]).astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention whose pruned keys (``keep == 0``) are invisible to others.

    Returns the output and what token reducers read: ``cls_attn [B, H, N]`` (the CLS query's
    attention, per head, float32) and ``keys [B, N, d]`` (keys averaged over heads: ToMe's
    similarity metric). XLA drops whichever the caller does not use. ``log_size [B, N]`` adds
    ToMe's proportional-attention bias ``log(size_j)`` to the logits of key ``j``.

    ``impl`` picks the kernel (:mod:`saitjax.models.core.attention`): the fused kernel computes the CLS
    row apart in O(N); the explicit one builds the float32 matrix, needed when ``keep`` carries
    gradients in training (``keep_gradient``) or with a context. Logits and softmax are float32
    in both, whatever ``dtype`` the projections run in.

    With a ``context [B, M, C]`` (already normalised) the current tokens attend to themselves and
    to the context (keys/values of ``[x; context]``, queries of ``x`` only), and ``context_attn
    [B, N, M]`` (head-mean attention to the context) is returned as well.
    """

    num_heads: int
    qkv_bias: bool = True
    head_weighting: str = "mean"
    dtype: Any = jnp.float32
    impl: str = "auto"
    keep_gradient: bool = False

    @nn.compact
    def __call__(self, x: Array, keep: Array | None, train: bool, log_size: Array | None = None,
                 context: Array | None = None) -> tuple[Array, dict[str, Array]]:
        b, n, c = x.shape
        h = self.num_heads
        qkv = QKVProjection(c, self.qkv_bias, self.dtype, name="qkv")
        proj = precision.dense(c, self.dtype, "proj", kernel_init=_dense_init)
        if not attention.needs_explicit_attention(self.impl, train, keep, self.keep_gradient, context):
            q, k, v = (t[:, :, 0] for t in jnp.split(qkv(x).reshape(b, n, 3, h, c // h), 3, axis=2))
            heads = attention.fused_attention(q, k, v, keep, log_size)  # [B, N, H, d]
            cls_attn = attention.cls_attention_row(q, k, keep, log_size)
            if self.head_weighting == "importance":
                cls_attn = cls_attn * token_ops.head_importance(heads.transpose(0, 2, 1, 3))
            return proj(heads.reshape(b, n, c)), {"cls_attn": cls_attn, "keys": jnp.mean(k, axis=2)}
        if context is None:
            q, k, v = qkv(x).reshape(b, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)  # each [B, H, N, d]
        else:
            m = context.shape[1]
            q = qkv(x, "q").reshape(b, n, h, c // h).transpose(0, 2, 1, 3)
            k, v = qkv(jnp.concatenate([x, context], axis=1), "kv").reshape(
                b, n + m, 2, h, c // h).transpose(2, 0, 3, 1, 4)
            if keep is not None:
                keep = jnp.concatenate([keep, jnp.ones((b, m), keep.dtype)], axis=1)
            if log_size is not None:
                log_size = jnp.concatenate([log_size, jnp.zeros((b, m), log_size.dtype)], axis=1)
        logits = jnp.matmul(q * (c // h) ** -0.5, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
        if log_size is not None:
            logits = logits + log_size[:, None, None, :]
        attn = token_ops.masked_softmax(logits, keep)  # float32 [B, H, N, N (+ M)]
        heads = precision.matmul(attn.astype(v.dtype), v)  # [B, H, N, d]
        out = proj(heads.transpose(0, 2, 1, 3).reshape(b, n, c))
        cls_attn = attn[:, :, 0, :n]
        if self.head_weighting == "importance":
            cls_attn = cls_attn * token_ops.head_importance(heads)
        info = {"cls_attn": cls_attn, "keys": jnp.mean(k[:, :, :n], axis=1)}
        if context is not None:
            info["context_attn"] = jnp.mean(attn[:, :, :, n:], axis=1)
        return out, info


class Mlp(nn.Module):
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c = x.shape[-1]
        x = precision.dense(int(c * self.mlp_ratio), self.dtype, "fc1", kernel_init=_dense_init)(x)
        x = gelu_exact(x)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = precision.dense(c, self.dtype, "fc2", kernel_init=_dense_init)(x)
        return nn.Dropout(self.drop_rate, deterministic=not train)(x)


class Block(nn.Module):
    """Pre-norm transformer block in two halves, so that tokens can be reduced between them.

    :meth:`attend` is ``x + Attn(LN(x))`` and also returns the attention info (see
    :class:`Attention`); :meth:`feed_forward` is ``x + MLP(LN(x))``. EViT and ToMe reduce the
    tokens in between; ``__call__`` runs both halves back to back. ``train`` is the second
    argument of each (the static argument of their rematerialised form, :mod:`saitjax.models.core.remat`).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_weighting: str = "mean"
    dtype: Any = jnp.float32
    attention: str = "auto"
    keep_gradient: bool = False

    def setup(self):
        self.norm1 = LayerNorm(_LN_EPS, dtype=self.dtype)
        self.attn = Attention(self.num_heads, self.qkv_bias, self.head_weighting, self.dtype, self.attention,
                              self.keep_gradient)
        self.norm2 = LayerNorm(_LN_EPS, dtype=self.dtype)
        self.mlp = Mlp(self.mlp_ratio, self.drop_rate, self.dtype)
        self.drop_path = DropPath(self.drop_path_rate)
        self.dropout = nn.Dropout(self.drop_rate)

    def attend(self, x: Array, train: bool, keep: Array | None = None, log_size: Array | None = None,
               context: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """``x + Attn(LN(x))``; with a ``context``, the keys/values also include ``LN(context)``."""
        y, info = self.attn(self.norm1(x, train), keep, train, log_size,
                            None if context is None else self.norm1(context, train))
        y = self.dropout(y, deterministic=not train)
        return x + self.drop_path(y, train), info

    def feed_forward(self, x: Array, train: bool) -> Array:
        return x + self.drop_path(self.mlp(self.norm2(x, train), train), train)

    def __call__(self, x: Array, keep: Array | None, train: bool) -> tuple[Array, Array]:
        x, info = self.attend(x, train, keep)
        return self.feed_forward(x, train), info["cls_attn"]


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
    # Proportional attention (ToMe): add log(token size) to the attention logits of every key.
    prop_attn: bool = False
    # How the model runs (README "Pods"): compute dtype (parameters stay float32; softmax, LayerNorm
    # statistics and logits are float32), attention kernel, and per-block rematerialisation.
    dtype: Any = jnp.float32
    attention: str = "auto"
    remat: str = "none"
    # Whether a training forward's keep mask carries gradients into the attention it masks
    # (then that attention takes the explicit path).
    keep_gradient: ClassVar[bool] = False

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
        return tuple(attn for attn, _ in self.block_token_counts(spec))

    def block_token_counts(self, spec: SparsitySpec | None = None,
                           stage_counts: Sequence[Any] | None = None) -> tuple[tuple[Any, Any], ...]:
        """``(attention tokens, MLP tokens)`` of every block, prefix included.

        Fixed-count specs give Python ints. ``stage_counts`` (per-image counts after each
        between-block stage, ints or arrays ``[B]``) replaces the spec's counts for adaptive rules.
        """
        spec = spec or SparsitySpec.dense()
        p, n = self.num_prefix_tokens, self.num_patches
        between: dict[int, Any] = {}
        if stage_counts is not None:
            between = dict(zip(spec.locations, stage_counts))
        elif spec.rule == "topk" and not spec.is_dense and spec.mode == "gather":
            between = dict(zip(spec.locations, spec.keep_counts(n)))
        out = []
        for i in range(self.depth):
            n = between.get(i, n)
            attn = n + p
            n = self.in_block_tokens(i, attn, spec) - p
            out.append((attn, n + p))
        return tuple(out)

    def block_context_tokens(self, spec: SparsitySpec | None = None) -> tuple[int, ...]:
        """Extra key/value tokens each block's attention reads beyond its own (STViT's image
        tokens while semantic tokens are generated); none here."""
        return (0,) * self.depth

    def in_block_tokens(self, block: int, tokens: int, spec: SparsitySpec) -> int:
        """Tokens after block ``block``'s in-block reduction when ``tokens`` entered it (none here)."""
        return tokens

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
        attention.check_attention_impl(self.attention)
        block = remat.remat_module(Block, self.remat, ("attend", "feed_forward"), train_argnum=2)
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        self.blocks = [block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate, rate,
                             self.head_weighting, self.dtype, self.attention, self.keep_gradient)
                       for rate in rates]
        # Final norm and heads in float32 whatever the compute dtype (cheap; the logits and the
        # distilled tokens are what losses read).
        self.norm = LayerNorm(_LN_EPS, dtype=jnp.float32)
        self.head = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=jnp.float32)
        if self.distilled:
            self.head_dist = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=jnp.float32)
        self.pos_drop = nn.Dropout(self.drop_rate)

    # -- forward ---------------------------------------------------------------------------------

    def check_images(self, images: Array) -> None:
        check_nhwc_images(images, self.img_size, self.in_chans, "position embeddings are interpolated on load")

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
        spec = sparsity if sparsity is not None else self.default_sparsity()
        self.check_images(images)
        spec.check_depth(self.depth)
        self.check_spec(spec)
        state = TokenState.initial(self.embed(images, train), self.num_prefix_tokens)
        aux: Aux = {"keep_masks": (), "keep_indices": ()}
        return self.run_blocks(state, None, spec, train, aux, start=0)

    def default_sparsity(self) -> SparsitySpec:
        """The spec used when ``__call__`` gets none: dense here; methods give their own."""
        return SparsitySpec.dense()

    def check_spec(self, spec: SparsitySpec) -> None:
        """Raise a clear error if this model cannot run ``spec`` (methods widen or narrow it)."""
        if not spec.is_dense and spec.rule != "topk":
            raise SparsityError(f"{type(self).__name__} prunes with fixed counts (rule 'topk'); "
                                f"{spec.needs_family()}")

    def run_blocks(self, state: TokenState, cls_attn: Array | None, spec: SparsitySpec, train: bool,
                   aux: Aux, start: int = 0, in_bucket: bool = False) -> tuple[Array, Aux]:
        """Blocks ``start..depth-1`` with both reduction points, then the head.

        Adaptive rules in gather mode hand over to the capacity-bucket runner at their first
        location; it comes back here with ``in_bucket=True`` (selection before block ``start``
        done, later locations refine the validity mask inside the bucket).
        """
        from saitjax.models.core import buckets  # the runner calls back into run_blocks

        stages = {} if spec.is_dense or spec.in_block else {loc: s for s, loc in enumerate(spec.locations)}
        for i in range(start, self.depth):
            if i in stages and not (in_bucket and i == start):
                if spec.is_adaptive and spec.mode == "gather" and not in_bucket:
                    return buckets.run_bucketed(self, stages[i], i, state, cls_attn, spec, train, aux)
                state, stage_aux = self.select_tokens(stages[i], state, cls_attn, spec, train)
                append_stage_aux(aux, stage_aux)
            log_size = jnp.log(state.size) if self.prop_attn else None
            x, info = self.blocks[i].attend(state.x, train, state.keep, log_size, state.context)
            state, cls_attn = state.replace(x=x), info["cls_attn"]
            if state.context is not None:
                state = state.replace(context_attn=info["context_attn"])
            if spec.in_block and not spec.is_dense:
                state, stage_aux = self.reduce_in_block(i, state, info, spec, train)
                if stage_aux:
                    append_stage_aux(aux, stage_aux)
            state = state.replace(x=self.blocks[i].feed_forward(state.x, train))
        if self.depth in stages:  # a stage after the last block (STViT's context read to the end)
            state, stage_aux = self.select_tokens(stages[self.depth], state, cls_attn, spec, train)
            append_stage_aux(aux, stage_aux)
        return self.classify(state, cls_attn, aux)

    def classify(self, state: TokenState, cls_attn: Array, aux: Aux) -> tuple[Array, Aux]:
        x = self.norm(state.x)
        logits = self.head(x[:, 0]).astype(jnp.float32)
        if self.distilled:
            logits_dist = self.head_dist(x[:, 1]).astype(jnp.float32)
            aux.update(logits_cls=logits, logits_dist=logits_dist)
            logits = (logits + logits_dist) / 2
        source = state.source
        if state.keep is not None:  # masked or padded tokens hold no patch
            held = jnp.take_along_axis(state.keep, jnp.maximum(source, 0), axis=1) > 0
            source = jnp.where(held, source, -1)
        aux.update(tokens=x, cls_attn=cls_attn, patch_index=state.patch_index, token_size=state.size,
                   source=source)
        return logits, aux

    # -- reduction hooks -------------------------------------------------------------------------

    def token_scores(self, state: TokenState, cls_attn: Array) -> Array:
        """Importance of each current patch token ``[B, N_cur]``: head-combined CLS attention,
        renormalised over the patch tokens (it sums to 1 per image)."""
        scores = jnp.sum(cls_attn[:, :, self.num_prefix_tokens:], axis=1)
        return scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-12)

    def select_tokens(self, stage: int, state: TokenState, cls_attn: Array, spec: SparsitySpec,
                      train: bool) -> tuple[TokenState, Aux]:
        """Prune before a block. Returns the new state and per-stage aux entries."""
        if spec.rule != "topk":
            raise SparsityError(f"{type(self).__name__} prunes with fixed counts (rule 'topk'); "
                                f"{spec.needs_family()}")
        k = spec.keep_counts(self.num_patches)[stage]
        scores = self.token_scores(state, cls_attn)
        return self.keep_top(state, scores, k, spec.mode)

    def reduce_in_block(self, block: int, state: TokenState, info: dict[str, Array], spec: SparsitySpec,
                        train: bool) -> tuple[TokenState, Aux | None]:
        """Reduce tokens inside block ``block`` after its attention residual (none here).

        ``info`` holds this block's ``cls_attn [B, H, N]`` and head-mean ``keys [B, N, d]``.
        """
        return state, None

    def per_image_counts(self, stage: int, state: TokenState, cls_attn: Array,
                         spec: SparsitySpec) -> tuple[Array, Array, Aux]:
        """``(scores [B, N_cur], counts [B], extra stage aux)`` of an adaptive rule (buckets)."""
        raise SparsityError(f"{type(self).__name__} has no per-image counts: {spec.needs_family()}")

    def keep_counted(self, state: TokenState, scores: Array, counts: Array) -> tuple[TokenState, Array]:
        """Keep each image's ``counts[b]`` best-scored alive patch tokens as a validity mask.

        Used by per-image rules in ``mask`` mode and at later locations inside a capacity bucket
        (tokens stay in place; the rest become invisible keys). Returns the new state and the
        kept patches on the original grid ``[B, num_patches]``.
        """
        p = self.num_prefix_tokens
        alive = state.keep[:, p:] if state.keep is not None else jnp.ones(scores.shape, jnp.float32)
        idx, valid = token_ops.capacity_select(jnp.where(alive > 0, scores, -jnp.inf), counts, scores.shape[-1])
        keep_patches = token_ops.indices_to_mask(idx, scores.shape[-1], valid)
        keep = jnp.concatenate([jnp.ones((scores.shape[0], p), jnp.float32), keep_patches], axis=1)
        return state.replace(keep=keep), token_ops.indices_to_mask(state.patch_index, self.num_patches, keep_patches)

    def keep_top(self, state: TokenState, scores: Array, k: int, mode: str) -> tuple[TokenState, Aux]:
        """Keep the ``k`` best-scored patch tokens, by gathering them or by masking the rest."""
        p = self.num_prefix_tokens
        if mode == "gather":
            idx = token_ops.topk_indices(scores, k)
            new = state.gather(idx, p)
            mask = token_ops.indices_to_mask(new.patch_index, self.num_patches)
            return new, {"keep_masks": mask, "keep_indices": new.patch_index}
        # mask mode: all tokens stay; only those already kept can be chosen again
        alive = state.keep[:, p:] if state.keep is not None else jnp.ones(scores.shape, jnp.float32)
        idx = token_ops.topk_indices(jnp.where(alive > 0, scores, -jnp.inf), k)  # any score sign
        keep_patches = token_ops.indices_to_mask(idx, scores.shape[-1])
        keep = jnp.concatenate([jnp.ones((scores.shape[0], p), jnp.float32), keep_patches], axis=1)
        return state.replace(keep=keep), {"keep_masks": keep_patches,
                                          "keep_indices": token_ops.batched_gather(state.patch_index, idx)}


def check_nhwc_images(images: Array, img_size: int, in_chans: int, size_note: str) -> None:
    """Fail at trace time, with the fix, on images of the wrong layout or size (every model's
    first check; ``size_note`` says what another ``img_size`` entails for that model)."""
    expected = (img_size, img_size, in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        hint = ""
        if images.ndim == 4 and images.shape[1] == in_chans and images.shape[3] != in_chans:
            hint = " They look channels-first (NCHW): transpose with images.transpose(0, 2, 3, 1)."
        elif images.ndim == 4 and images.shape[3] != in_chans:
            hint = f" The model expects {in_chans} channels."
        elif images.ndim == 4:
            hint = (f" Resize/crop them to {img_size} px, or create the model with "
                    f"img_size={images.shape[1]} ({size_note}).")
        raise ValueError(f"expected images of shape [batch, {', '.join(map(str, expected))}] "
                         f"(NHWC), got {tuple(images.shape)}.{hint}")


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
