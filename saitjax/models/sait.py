"""SaiT: adaptive per-image token pruning on an unchanged ViT/DeiT (saitjax's reading, methods.md §2.3).

SaiT adds no parameters: any dense checkpoint loads and can be pruned. At a pruning location the
token importance score (TIS) of each patch token is the CLS attention of the previous block,
combined over heads (``head_weighting``: mean, or AS-ViT importance weighting) and renormalised
to sum to 1 over the patch tokens. A keep rule turns TIS into a per-image count ``K_b``:

* ``mass``  - the smallest top-scored set whose TIS sum reaches ``m`` (``m >= 1`` is dense);
* ``value`` - every token with ``TIS >= theta / N_alive``;
* ``topk``  - a fixed fraction of the original tokens (static counts, the base class);
* ``skip``  - no pruning: exactly the dense computation, so density 1.0 has no accuracy drop.

``K_b`` is clamped to ``[K_min, K_max]`` of the spec. Counts are data dependent, shapes are not:

* ``mode="mask"`` (training, and the reference for tests): all tokens stay; pruned keys are
  hidden from attention.
* ``mode="gather"`` (inference): the shared capacity-bucket runner (:mod:`saitjax.models.core.buckets`)
  runs each (sorted micro-batch of the) batch in the smallest bucket holding its largest ``K_b``
  (``lax.switch`` inside the jitted function, one compiled function per spec whatever the
  batch), and masks the padding slots of images that need fewer. Later locations refine the
  validity mask inside the bucket (a nested switch would multiply the compiled branches).

In gather mode ``aux["tokens"]`` and ``aux["cls_attn"]`` come back on the full grid (zeros at
pruned tokens) and ``aux["capacity"] [B]`` says which capacity each image ran in. Every rule reports per-stage ``keep_masks``,
``kept_counts`` and ``token_scores`` (TIS on the original grid; used by token-selection KD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.models.deit import register_family
from saitjax.models.vit import Aux, TokenState, VisionTransformer
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array


def adaptive_counts(scores: Array, alive: Array, spec: SparsitySpec, bounds: tuple[int, int]) -> Array:
    """Per-image keep counts ``[B]`` of a ``mass``/``value`` rule over the ``alive`` tokens.

    ``scores [B, N]`` are non-negative TIS (zero where not alive); ``alive [B, N]`` is 0/1. The
    count is clamped to ``bounds`` and never exceeds the number of alive tokens.
    """
    alive = alive.astype(jnp.float32)
    n_alive = jnp.sum(alive, axis=-1).astype(jnp.int32)
    if spec.rule == "mass":
        counts = token_ops.mass_keep_counts(scores * alive, spec.threshold)
    elif spec.rule == "value":
        counts = token_ops.value_keep_counts(scores, spec.threshold, alive)
    else:
        raise SparsityError(f"SaiT has no per-image count for {spec.needs_family()}")
    lo, hi = bounds
    return jnp.minimum(jnp.maximum(counts, lo), jnp.minimum(hi, n_alive)).astype(jnp.int32)


class SaiT(VisionTransformer):
    """A ViT/DeiT whose tokens are pruned per image by CLS-attention importance; no new weights."""

    # Density used when ``__call__`` gets no spec: dense (``skip``). Densities are chosen per call.

    def check_spec(self, spec: SparsitySpec) -> None:
        if not spec.is_dense and spec.rule not in ("topk", "mass", "value"):
            raise SparsityError(f"{type(self).__name__} prunes by fixed counts or the rules 'mass'/'value'; "
                                f"{spec.needs_family()}")

    def select_tokens(self, stage: int, state: TokenState, cls_attn: Array, spec: SparsitySpec,
                      train: bool) -> tuple[TokenState, Aux]:
        scores = self.token_scores(state, cls_attn)
        grid_scores = token_ops.scatter_to_grid(scores, state.patch_index, self.num_patches)
        if not spec.is_adaptive:  # fixed counts: the parameter-free top-k of the base class
            new, stage_aux = super().select_tokens(stage, state, cls_attn, spec, train)
            counts = jnp.sum(stage_aux["keep_masks"], axis=-1).astype(jnp.int32)
            return new, {**stage_aux, "kept_counts": counts, "token_scores": grid_scores}
        # Adaptive rule on the current tokens (all tokens in mask mode; the bucket's tokens in
        # gather mode): rank the alive tokens, keep each image's best K_b.
        p = self.num_prefix_tokens
        alive = state.keep[:, p:] if state.keep is not None else jnp.ones(scores.shape, jnp.float32)
        counts = adaptive_counts(scores, alive, spec, spec.count_bounds(self.num_patches))
        new, mask = self.keep_counted(state, scores, counts)
        return new, {"keep_masks": mask, "kept_counts": counts, "token_scores": grid_scores}

    def per_image_counts(self, stage: int, state: TokenState, cls_attn: Array,
                         spec: SparsitySpec) -> tuple[Array, Array, Aux]:
        """TIS and the rule's per-image counts at the first location (the bucket runner's input)."""
        scores = self.token_scores(state, cls_attn)
        counts = adaptive_counts(scores, jnp.ones(scores.shape, jnp.float32), spec,
                                 spec.count_bounds(self.num_patches))
        return scores, counts, {"token_scores": token_ops.scatter_to_grid(scores, state.patch_index,
                                                                           self.num_patches)}


register_family("sait", SaiT, "SaiT", "adaptive per-image pruning, no extra weights (loads dense DeiT checkpoints)",
                test={}, demo={})
