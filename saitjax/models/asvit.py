"""AS-ViT (Liu et al., IJCAI 2023): learned per-stage thresholds on head-importance-weighted scores.

Before the blocks ``pruning_loc`` (0-based; DeiT: 4, 7, 10) each patch token is scored with the
previous block's attention (methods-more.md §4.1):

    I[h, j] = |O_h[j]| / (sum_h' |O_h'[j]| + 1e-8)      (O_h = A_h V_h, head h's output)
    s_j     = sum_h A_h[0, j] * I[h, j]                  (CLS query, no renormalisation)

and kept when ``s_j > theta_s``, one learnable scalar per stage (``score_predictor_{s}/
keep_threshold``, initialised 0.001 / 0.002 / 0.003 as the official code; the optimizer leaves
it out of weight decay). The density knob ``learned:t`` scales every threshold by ``t`` at
inference (``t = 1``: as trained), one compiled function per ``t``.

* Training (``mode="mask"``): ``D = STE(sigmoid((s - theta) / tau) > 0.5)`` with ``tau = 1e-4``;
  ``[1; D]`` is the keep mask of attention in this and the following blocks. A token dropped
  earlier is invisible, scores 0 and stays dropped, as in the official code (the product with
  the previous decisions is explicit here, so a threshold pushed below 0 cannot revive it).
* Inference (``mode="gather"``), ``batch_rule="image"`` (default): every image keeps exactly its
  tokens above the threshold, through the shared capacity-bucket runner (buckets, sorted
  micro-batches), so an image's result never depends on its batch-mates.
* ``batch_rule="mean"``: the official batched rule, for parity with released checkpoints: every
  image keeps its own top ``floor(sum of the batch's counts / B)`` tokens (at batch 1 the same
  as "image"). Its result depends on the batch; it runs with one chunk.

Fixed counts (``topk`` densities) also run, on the same scores: a baseline for the thresholds.
An image with no token above the threshold keeps its prefix only (allowed, as official). A
distilled DeiT's distillation token is protected like CLS. The official checkpoint keys
``score_predictor.{s}.keep_threshold`` (0-d tensors) convert onto the thresholds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.models.deit import register_family
from saitjax.models.vit import Aux, TokenState, VisionTransformer
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array

BATCH_RULES = ("image", "mean")


class LearnedThreshold(nn.Module):
    """One learnable scalar threshold (a 0-d parameter ``keep_threshold``, as official)."""

    init_value: float

    @nn.compact
    def __call__(self) -> Array:
        return self.param("keep_threshold", nn.initializers.constant(self.init_value), (), jnp.float32)


class ASViT(VisionTransformer):
    """ViT/DeiT pruned per image by learned thresholds on head-importance-weighted CLS attention."""

    head_weighting: str = "importance"
    pruning_loc: tuple[int, ...] = (4, 7, 10)
    threshold_init: tuple[float, ...] = (0.001, 0.002, 0.003)
    threshold_tau: float = 1e-4
    batch_rule: str = "image"
    buckets: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
    # Training decisions learn through the attention they mask (the explicit attention path).
    keep_gradient: ClassVar[bool] = True

    checkpoint_renames = ((r"^score_predictor\.(\d+)\.keep_threshold$", r"score_predictor_\1.keep_threshold"),)

    def setup(self):
        super().setup()
        if len(self.threshold_init) != len(self.pruning_loc):
            raise ValueError(f"threshold_init {self.threshold_init} needs one value per pruning location "
                             f"{self.pruning_loc}")
        if self.batch_rule not in BATCH_RULES:
            raise ValueError(f"batch_rule={self.batch_rule!r}: choose 'image' (per-image counts) or 'mean' "
                             "(the official batch-mean count)")
        if self.head_weighting != "importance":
            raise ValueError("AS-ViT scores tokens with head_weighting='importance'")
        # A list attribute names its modules score_predictor_0, score_predictor_1, ...
        self.score_predictor = [LearnedThreshold(v) for v in self.threshold_init]

    def thresholds(self) -> tuple[Array, ...]:
        """The learned per-stage thresholds (0-d float32)."""
        return tuple(t() for t in self.score_predictor)

    def __call__(self, images: Array, *, train: bool = False,
                 sparsity: SparsitySpec | None = None) -> tuple[Array, Aux]:
        if self.is_initializing():
            self.thresholds()  # create every threshold even when the init spec does not use them
        return super().__call__(images, train=train, sparsity=sparsity)

    def default_sparsity(self) -> SparsitySpec:
        """The thresholds as learned, at ``pruning_loc``, per image through capacity buckets."""
        return SparsitySpec.learned(1.0, self.pruning_loc, self.buckets)

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.is_dense:
            return
        loc = "/".join(map(str, self.pruning_loc))
        if spec.rule == "topk":  # fixed counts on the same scores (a baseline for the thresholds)
            return
        if spec.rule != "learned":
            raise SparsityError(f"{type(self).__name__} prunes by its learned thresholds (rule 'learned', e.g. "
                                f"'learned:1.0@{loc}') or fixed counts ('topk'), not {spec.rule!r}")
        if tuple(spec.locations) != tuple(self.pruning_loc):
            raise SparsityError(f"{type(self).__name__} has thresholds before blocks {tuple(self.pruning_loc)} but "
                                f"the spec prunes at {tuple(spec.locations)}; use 'learned:1.0@{loc}'")
        if self.batch_rule == "mean" and spec.chunks > 1:
            raise SparsityError("batch_rule='mean' gives every image of a batch the same count: micro-batch "
                                "chunks do not apply (drop ',chunks=N' or use batch_rule='image')")

    # -- scores and counts ---------------------------------------------------------------------

    def token_scores(self, state: TokenState, cls_attn: Array) -> Array:
        """``s_j``: head-importance-weighted CLS attention summed over heads (not renormalised)."""
        return jnp.sum(cls_attn[:, :, self.num_prefix_tokens:], axis=1)

    def _threshold(self, stage: int, spec: SparsitySpec) -> Array:
        return self.thresholds()[stage] * spec.threshold

    def _counts(self, scores: Array, alive: Array, threshold: Array, spec: SparsitySpec) -> Array:
        """Tokens above the threshold among the alive ones, per image (or the batch mean)."""
        counts = jnp.sum((scores > threshold) & (alive > 0), axis=-1).astype(jnp.int32)
        if self.batch_rule == "mean":
            counts = jnp.full_like(counts, jnp.sum(counts) // counts.shape[0])
        lo, hi = spec.count_bounds(self.num_patches)
        return jnp.clip(counts, lo, hi)

    def _scored(self, stage: int, state: TokenState, cls_attn: Array,
                spec: SparsitySpec) -> tuple[Array, Array, Aux]:
        """Scores of the current patch tokens, the stage's (scaled) threshold, their stage aux."""
        scores = self.token_scores(state, cls_attn)
        threshold = self._threshold(stage, spec)
        return scores, threshold, {
            "token_scores": token_ops.scatter_to_grid(scores, state.patch_index, self.num_patches),
            "thresholds": jnp.broadcast_to(threshold, scores.shape[:1])}

    def select_tokens(self, stage: int, state: TokenState, cls_attn: Array, spec: SparsitySpec,
                      train: bool) -> tuple[TokenState, Aux]:
        if spec.rule == "topk":
            return super().select_tokens(stage, state, cls_attn, spec, train)
        scores, threshold, aux = self._scored(stage, state, cls_attn, spec)
        p, b = self.num_prefix_tokens, scores.shape[0]
        alive = state.keep[:, p:] if state.keep is not None else jnp.ones(scores.shape, jnp.float32)
        if spec.mode == "mask" and train:
            # Straight-through hard decisions: the gradient reaches theta and the scores.
            decisions = token_ops.sigmoid_threshold_hard(scores, threshold, self.threshold_tau)
            decisions = decisions * jax.lax.stop_gradient(alive)
            keep = jnp.concatenate([jnp.ones((b, p), jnp.float32), decisions], axis=1)
            hard = jax.lax.stop_gradient(decisions)
            return state.replace(keep=keep), {
                **aux, "decisions": decisions, "keep_masks": token_ops.scatter_to_grid(hard, state.patch_index,
                                                                                    self.num_patches),
                "kept_counts": jnp.sum(hard, axis=-1).astype(jnp.int32)}
        counts = self._counts(scores, alive, threshold, spec)
        new, mask = self.keep_counted(state, scores, counts)
        return new, {**aux, "keep_masks": mask, "kept_counts": counts}

    def per_image_counts(self, stage: int, state: TokenState, cls_attn: Array,
                         spec: SparsitySpec) -> tuple[Array, Array, Aux]:
        """Scores and counts at the first location (the bucket runner's input)."""
        scores, threshold, aux = self._scored(stage, state, cls_attn, spec)
        return scores, self._counts(scores, jnp.ones(scores.shape, jnp.float32), threshold, spec), aux

    def extra_macs(self, spec: SparsitySpec | None) -> float:
        """Head importance (one norm per head and token) in each block that scores tokens."""
        if spec is None or spec.is_dense:
            return 0.0
        return float(len(self.pruning_loc) * (self.num_prefix_tokens + self.num_patches) * self.embed_dim)


def threshold_params(params: Any) -> dict[str, Array]:
    """``{"score_predictor_0": theta_0, ...}`` from an AS-ViT params tree (plots, logs)."""
    return {name: sub["keep_threshold"] for name, sub in params.items()
            if name.startswith("score_predictor_") and "keep_threshold" in sub}


register_family("asvit", ASViT, "AS-ViT", "learned thresholds before blocks 4, 7, 10 (1, 2, 3 at test and demo "
                "size) on head-importance-weighted CLS attention, per-image counts", pruning_loc=(4, 7, 10),
                test={"pruning_loc": (1, 2, 3)}, demo={"pruning_loc": (1, 2, 3)})
