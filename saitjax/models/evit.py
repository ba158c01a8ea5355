"""EViT (Liang et al., ICLR 2022): keep the attentive tokens, fuse the inattentive ones.

Inside blocks ``drop_loc`` (0-based), between the attention residual and the MLP, as the official
``youweiliang/evit`` code does it:

1. ``a_j``: this block's CLS attention averaged over heads, over the current patch tokens (an
   earlier fused token included);
2. keep ``k = ceil(keep_rate * n)`` of the ``n`` current patch tokens, in descending ``a_j``
   order (no reduction, and no fused token, when ``k == n``);
3. ``fuse_token=True``: append ``sum_{j dropped} a_j x_j`` (raw weights, not renormalised) as one
   more token, which later stages may keep or fuse again;
4. the block's MLP runs on ``[prefix, kept, fused]``.

The rate is relative to the *current* count, so at 0.7 DeiT-S's MLPs in blocks 3/6/9 see 140,
100 and 72 tokens (3.03 GMACs). EViT adds no parameters: every DeiT checkpoint loads. Unlike the
official code, a distilled DeiT's distillation token is protected like CLS (the official code
treats it as a patch token and may drop or fuse it, issue #15); scores are the CLS query's.
Counts are static Python ints, so EViT trains and runs in ``gather`` mode only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.models.deit import register_family
from saitjax.models.vit import Aux, TokenState, VisionTransformer
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array


def evit_keep_count(keep_rate: float, num_tokens: int) -> int:
    """``ceil(keep_rate * num_tokens)`` as the official code computes it (float64, no epsilon)."""
    return min(num_tokens, math.ceil(keep_rate * num_tokens))


class EViT(VisionTransformer):
    """ViT/DeiT with EViT's in-block token fusion at ``drop_loc`` (constructor names as official)."""

    keep_rate: float = 0.7
    drop_loc: tuple[int, ...] = (3, 6, 9)
    fuse_token: bool = True

    def default_sparsity(self) -> SparsitySpec:
        """``keep_rate`` inside every block of ``drop_loc``."""
        return SparsitySpec.evit(self.keep_rate, self.drop_loc, self.fuse_token)

    def check_spec(self, spec: SparsitySpec) -> None:
        if not spec.is_dense and spec.rule != "evit":
            raise SparsityError(f"{type(self).__name__} reduces tokens with rule 'evit' (e.g. "
                                f"'evit:0.7@3/6/9'), not {spec.rule!r}")

    def _rate(self, block: int, spec: SparsitySpec) -> float | None:
        if spec.rule != "evit" or block not in spec.locations:
            return None
        return spec.keep_ratios[spec.locations.index(block)]

    def in_block_tokens(self, block: int, tokens: int, spec: SparsitySpec) -> int:
        rate, p = self._rate(block, spec), self.num_prefix_tokens
        if rate is None:
            return tokens
        k = evit_keep_count(rate, tokens - p)
        return tokens if k == tokens - p else p + k + int(spec.fuse)

    def reduce_in_block(self, block: int, state: TokenState, info: dict[str, Array], spec: SparsitySpec,
                        train: bool) -> tuple[TokenState, Aux | None]:
        rate, p = self._rate(block, spec), self.num_prefix_tokens
        if rate is None:
            return state, None
        n = state.x.shape[1] - p
        k = evit_keep_count(rate, n)
        if k == n:
            return state, None
        attn = jnp.mean(info["cls_attn"][:, :, p:], axis=1)  # raw head-mean CLS attention [B, n]
        idx = token_ops.topk_indices(attn, k)
        new = state.gather(idx, p)
        if spec.fuse:
            fused = token_ops.fuse_inattentive(state.x[:, p:], attn, idx)
            fused_size = jnp.sum(state.size[:, p:], axis=1) - jnp.sum(new.size[:, p:], axis=1)
            just_dropped = (new.source < 0) & (state.source >= 0)
            no_patch = jnp.full((fused.shape[0], 1), self.num_patches, jnp.int32)
            new = TokenState(jnp.concatenate([new.x, fused], axis=1), None,
                             jnp.concatenate([new.patch_index, no_patch], axis=1),
                             jnp.concatenate([new.size, fused_size[:, None]], axis=1),
                             jnp.where(just_dropped, p + k, new.source))
        # Patches that still have a token of their own (fused patches do not).
        return new, {"keep_masks": token_ops.indices_to_mask(new.patch_index, self.num_patches)}

    def extra_macs(self, spec: SparsitySpec | None) -> float:
        """The fused token (all tokens weighted, minus the kept ones) at each reduction."""
        if spec is None or spec.is_dense or not spec.fuse:
            return 0.0
        macs = 0
        for attn, mlp in self.block_token_counts(spec):
            if mlp < attn:
                macs += (attn - self.num_prefix_tokens + mlp) * self.embed_dim
        return float(macs)


register_family("evit", EViT, "EViT", "keep 0.7 of the tokens inside the blocks drop_loc (3, 6, 9 for DeiT), fuse the "
                "rest (no extra weights; loads DeiT checkpoints)", keep_rate=0.7, drop_loc=(3, 6, 9), fuse_token=True,
                test={"drop_loc": (1, 2)}, demo={"drop_loc": (1, 2, 3)})
