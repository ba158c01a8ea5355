"""ToMe (Bolya et al., ICLR 2023): merge similar tokens in every block, no pruning, no training needed.

Inside every block, between the attention residual and the MLP, as the official
``facebookresearch/ToMe`` timm patch does it:

1. the metric is the block's keys averaged over heads, cosine-normalised;
2. bipartite soft matching: tokens at even positions (set A, CLS first) each propose their most
   similar odd-position token (set B); the ``r`` best proposals merge (CLS never; nothing into a
   distillation token);
3. size-weighted averaging ``(s_b x_b + sum s_a x_a) / (s_b + sum s_a)``; sizes add;
4. output order ``[unmerged A (ascending), B]`` -- the next block splits by position, so this
   order decides later matches;
5. with ``prop_attn`` every later attention adds ``log(size_j)`` to the logits of key ``j``.

``r`` is an int (every block) or a per-block list; ``r = min(r, (N - prefix) // 2)`` per block.
``r = 0`` is the dense model. No parameters: every DeiT checkpoint loads, and ToMe's released
DeiT checkpoints (trained with ``r = 13``, ``prop_attn=True``) convert like DeiT's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.models.deit import register_family
from saitjax.models.vit import Aux, TokenState, VisionTransformer
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array


class ToMe(VisionTransformer):
    """ViT/DeiT with ToMe's token merging in every block (constructor names as official)."""

    r: int | tuple[int, ...] = 13
    prop_attn: bool = True

    def default_sparsity(self) -> SparsitySpec:
        return SparsitySpec.tome(self.r)

    def check_spec(self, spec: SparsitySpec) -> None:
        if not spec.is_dense and spec.rule != "tome":
            raise SparsityError(f"{type(self).__name__} merges tokens with rule 'tome' (e.g. 'tome:13'), "
                                f"not {spec.rule!r}")

    def merges(self, block: int, tokens: int, spec: SparsitySpec) -> int:
        """Tokens merged in ``block`` when ``tokens`` (prefix included) entered it."""
        r = spec.merge_schedule(self.depth)[block]
        return min(r, (tokens - self.num_prefix_tokens) // 2)

    def in_block_tokens(self, block: int, tokens: int, spec: SparsitySpec) -> int:
        return tokens - self.merges(block, tokens, spec)

    def reduce_in_block(self, block: int, state: TokenState, info: dict[str, Array], spec: SparsitySpec,
                        train: bool) -> tuple[TokenState, Aux | None]:
        n, p = state.x.shape[1], self.num_prefix_tokens
        r = self.merges(block, n, spec)
        if r == 0:
            return state, None
        plan = token_ops.bipartite_soft_matching(info["keys"], r, p)
        kept_old, old_to_new = token_ops.merge_order(plan, n, p)
        x, size = token_ops.merge_weighted(state.x, state.size, plan, kept_old)
        ids = jnp.concatenate([jnp.full((x.shape[0], p), self.num_patches, jnp.int32), state.patch_index], axis=1)
        patch_index = token_ops.batched_gather(ids, kept_old)[:, p:]
        return TokenState(x, None, patch_index, size, token_ops.relabel_source(state.source, old_to_new)), None

    def extra_macs(self, spec: SparsitySpec | None) -> float:
        """Matching (cosine similarity of A and B keys) and the merge of each block."""
        if spec is None or spec.is_dense:
            return 0.0
        d = self.embed_dim // self.num_heads
        macs = 0
        for attn, mlp in self.block_token_counts(spec):
            if mlp < attn:
                size_a, size_b = (attn + 1) // 2, attn // 2
                macs += size_a * size_b * d + (attn - mlp) * size_b * self.embed_dim
        return float(macs)


register_family("tome", ToMe, "ToMe", "merge r tokens per block (13 for DeiT, 8 for the test and demo sizes), "
                "proportional attention (no extra weights; loads DeiT checkpoints)", r=13, prop_attn=True,
                test={"r": 8}, demo={"r": 8})
