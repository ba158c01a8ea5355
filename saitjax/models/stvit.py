"""STViT on DeiT (Chang et al., CVPR 2023): a few semantic tokens replace the image tokens.

The official code for the DeiT version was never released (changsn/STViT-R issue #1); this is
our reading of the paper, with every choice it leaves open taken from the released Swin code
(``../shared/docs/methods-more.md`` section 5.2) or made to reuse dense weights:

1. Blocks ``0 .. L-1`` are dense DeiT blocks (``L = semantic_location``, 4 for DeiT).
2. Before block ``L`` the patch-token map is adaptively max-pooled (PyTorch's overlapping bins)
   to ``semantic_tokens`` tokens: the initial cluster centres.
3. *Generation*: block ``L`` runs on ``[prefix, centres]`` as queries, with keys/values
   ``[prefix, centres, image tokens]`` (global: every image token, DeiT has no windows).
4. *Update* (``update_layers`` blocks, 1 by default): a learned global initialisation ``G``
   (``semantic_init``, zeros at init) is added to the semantic tokens, then the next block again
   attends to ``[prefix, semantic tokens, image tokens]``.
5. The image tokens leave; the remaining blocks run on ``[prefix, semantic tokens]`` and the
   class token classifies (no recovery for classification).

Our choices where the paper is silent (config fields, documented as our reading): the
generation and update layers *are* DeiT blocks ``L`` and ``L+1`` -- a cross-attention with the
block's own ``qkv`` split into queries and keys/values, with the residual kept on the queries
(the Swin code drops it on the pooled tokens). So a dense DeiT checkpoint loads unchanged, the
semantic branch starts as "block ``L`` applied to pooled tokens", and the dense setting
(``sparsity=dense``) is bit-identical to DeiT: one set of weights serves both. DeiT-S with 16
tokens at block 4 runs 1.93 GMACs (dense 4.60, 58 % fewer; the abstract says "about 60 %").

Each patch is assigned to the semantic token that attends to it most in the last block that
reads the image tokens (``source``/``token_size`` in aux), and ``aux["semantic_attention"]``
holds that attention ``[B, T, N_patches]``: what each semantic token looked at.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from saitjax.models.core import token_ops
from saitjax.models.deit import register_family
from saitjax.models.vit import Aux, TokenState, VisionTransformer
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array


class GlobalInit(nn.Module):
    """The learned global initialisation ``G [1, T, C]`` (zeros at init).

    Its own submodule so that it is created only when the semantic path runs: the dense setting
    (a distillation teacher loaded from a DeiT checkpoint) needs no ``G``.
    """

    tokens: int
    dim: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("embedding", nn.initializers.zeros, (1, self.tokens, self.dim))


class SemanticTokenViT(VisionTransformer):
    """ViT/DeiT whose patch tokens are replaced by ``semantic_tokens`` semantic tokens before
    block ``semantic_location`` (``sparsity="semantic:T@L"`` selects others at inference)."""

    semantic_tokens: int = 16
    semantic_location: int = 4
    update_layers: int = 1
    # Add the learned global initialisation G to the semantic tokens before each update block
    # (the author: "very useful on DeiT"). Zeros at init: a dense checkpoint changes nothing.
    global_init: bool = True

    def setup(self):
        super().setup()
        side = math.isqrt(self.semantic_tokens)
        if side * side != self.semantic_tokens:
            raise ValueError(f"semantic_tokens={self.semantic_tokens} is not a square (a pooling grid)")
        if side > self.grid_size:
            raise ValueError(f"semantic_tokens={self.semantic_tokens} needs a {side}x{side} pooling grid, "
                             f"larger than the {self.grid_size}x{self.grid_size} patch grid")
        if self.global_init:
            self.semantic_init = GlobalInit(self.semantic_tokens, self.embed_dim)

    def default_sparsity(self) -> SparsitySpec:
        return SparsitySpec.semantic(self.semantic_tokens, self.semantic_location, self.update_layers)

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.is_dense or spec.rule == "semantic":
            side = math.isqrt(spec.semantic_tokens)
            if side > self.grid_size:
                raise SparsityError(f"{spec.describe()}: a {side}x{side} pooling grid does not fit the "
                                    f"{self.grid_size}x{self.grid_size} patch grid")
            return
        raise SparsityError(f"{type(self).__name__} replaces tokens with rule 'semantic' (e.g. "
                            f"'semantic:16@4'), not {spec.rule!r}")

    # -- token counts ---------------------------------------------------------------------------

    def block_token_counts(self, spec=None, stage_counts=None):
        """``(query tokens, MLP tokens)`` per block; the image tokens read as extra keys by the
        generation and update blocks are in :meth:`block_context_tokens`."""
        spec = spec or SparsitySpec.dense()
        if spec.rule != "semantic":
            return super().block_token_counts(spec, stage_counts)
        n = self.num_prefix_tokens + self.num_patches
        semantic = self.num_prefix_tokens + spec.semantic_tokens
        return tuple((semantic, semantic) if i >= spec.locations[0] else (n, n) for i in range(self.depth))

    def block_context_tokens(self, spec: SparsitySpec | None = None) -> tuple[int, ...]:
        if spec is None or spec.rule != "semantic":
            return super().block_context_tokens(spec)
        return tuple(self.num_patches if spec.locations[0] <= i < spec.locations[-1] else 0
                     for i in range(self.depth))

    # -- the semantic tokens --------------------------------------------------------------------

    def select_tokens(self, stage: int, state: TokenState, cls_attn: Array, spec: SparsitySpec,
                      train: bool) -> tuple[TokenState, Aux]:
        if spec.rule != "semantic":
            return super().select_tokens(stage, state, cls_attn, spec, train)
        if stage == 0:
            return self._generate(state, spec), {}
        if stage < len(spec.locations) - 1:
            return self._add_global_init(state, spec), {}
        return self._release_image_tokens(state)

    def _generate(self, state: TokenState, spec: SparsitySpec) -> TokenState:
        """Pool the patch map into the initial centres; the patches become the context."""
        p, g = self.num_prefix_tokens, self.grid_size
        side = math.isqrt(spec.semantic_tokens)
        patches = state.x[:, p:]
        b, _, c = patches.shape
        centres = token_ops.adaptive_max_pool(patches.reshape(b, g, g, c), side, side).reshape(b, -1, c)
        rows = [(a + e - 1) // 2 for a, e in token_ops.adaptive_pool_bins(g, side)]
        centre_index = jnp.array([r * g + col for r in rows for col in rows], jnp.int32)
        t = spec.semantic_tokens
        return TokenState(jnp.concatenate([state.x[:, :p], centres], axis=1), None,
                          jnp.broadcast_to(centre_index, (b, t)), jnp.ones((b, p + t), jnp.float32),
                          jnp.full((b, self.num_patches), -1, jnp.int32), context=patches)

    def _add_global_init(self, state: TokenState, spec: SparsitySpec) -> TokenState:
        if not self.global_init:
            return state
        g = self.semantic_init()
        if spec.semantic_tokens != self.semantic_tokens:  # another grid at inference: resize G
            side, new = math.isqrt(self.semantic_tokens), math.isqrt(spec.semantic_tokens)
            g = jax.image.resize(g.reshape(side, side, -1), (new, new, g.shape[-1]), "linear").reshape(1, -1, g.shape[-1])
        p = self.num_prefix_tokens
        return state.replace(x=state.x.at[:, p:].add(g.astype(state.x.dtype)))

    def _release_image_tokens(self, state: TokenState) -> tuple[TokenState, Aux]:
        """Drop the context; each patch joins the semantic token that attended to it most."""
        p = self.num_prefix_tokens
        attention = state.context_attn[:, p:]  # [B, T, N_patches]
        owner = jnp.argmax(attention, axis=1)  # [B, N_patches]
        t = attention.shape[1]
        sizes = jnp.sum(jax.nn.one_hot(owner, t, dtype=jnp.float32), axis=1)
        size = jnp.concatenate([state.size[:, :p], sizes], axis=1)
        new = state.replace(context=None, context_attn=None, source=(owner + p).astype(jnp.int32), size=size)
        return new, {"semantic_attention": attention}


register_family("stvit", SemanticTokenViT, "STViT",
                "16 semantic tokens (4x4 max-pooled, refined by attention to the image tokens in blocks 4 and "
                "5) replace the patch tokens from block 4; loads DeiT checkpoints, dense setting = DeiT",
                semantic_tokens=16, semantic_location=4, update_layers=1,
                test={"semantic_tokens": 9, "semantic_location": 1}, demo={"semantic_tokens": 9, "semantic_location": 1})
