"""DynamicViT (Rao et al., NeurIPS 2021): learned per-token keep/drop predictors.

A light MLP ("PredictorLG") before each pruning stage scores the current patch tokens from a
local half of their features and the mean of a global half over the tokens still kept.

* Training (``train=True``, spec mode ``mask``, ``rngs={"gumbel": ...}``): hard Gumbel-softmax decisions,
  multiplied by the previous stage's (a dropped token stays dropped). All tokens stay in the
  sequence; ``state.keep`` carries the straight-through decisions into the multiplicative masked
  attention, which is how the predictors receive gradient.
* Inference (mode ``gather``): each predictor scores the current, already reduced tokens; the
  static ``floor(N * rho^s)`` best by keep log-probability are gathered.
* Mode ``mask`` with ``train=False`` applies the inference rule as a mask (even if a ``gumbel``
  rng is passed), so a masked forward equals the gathered one (the correctness check of both
  paths). ``train=True`` in mode ``mask`` without a ``gumbel`` rng is an error.

Parameter names: backbone as in :mod:`saitjax.models.vit`; predictors ``predictor_{s}`` with
``in_norm`` (LayerNorm eps 1e-5), ``in_fc`` (C->C), ``out_fc1`` (C->C/2), ``out_fc2``
(C/2->C/4), ``out_fc3`` (C/4->2). :attr:`DynamicViT.checkpoint_renames` maps the official
``score_predictor.{s}.in_conv/out_conv`` keys onto them.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.models.deit import register_family
from saitjax.models.core.predictors import Predictor, predictor_macs
from saitjax.models.vit import Aux, TokenState, VisionTransformer
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array

class DynamicViT(VisionTransformer):
    """ViT/DeiT with DynamicViT predictors before the blocks ``predictor_locations``.

    Without an explicit ``sparsity`` the model runs its own schedule: ``keep_rho``,
    ``keep_rho^2``, ... of the patch tokens at ``predictor_locations`` (gathered). Any ``topk``
    spec at those same locations works (e.g. ``SparsitySpec.hierarchical(0.9, (3, 6, 9))``).
    """

    predictor_locations: tuple[int, ...] = (3, 6, 9)
    keep_rho: float = 0.7
    predictor_eps: float = 1e-5
    gumbel_tau: float = 1.0  # temperature of the training-time Gumbel-softmax
    # Training decisions learn through the attention they mask (the explicit attention path).
    keep_gradient: ClassVar[bool] = True

    # Official DynamicViT checkpoint keys -> Linen paths (applied by saitjax.convert).
    checkpoint_renames = (
        (r"^score_predictor\.(\d+)\.in_conv\.0\.", r"predictor_\1.in_norm."),
        (r"^score_predictor\.(\d+)\.in_conv\.1\.", r"predictor_\1.in_fc."),
        (r"^score_predictor\.(\d+)\.out_conv\.0\.", r"predictor_\1.out_fc1."),
        (r"^score_predictor\.(\d+)\.out_conv\.2\.", r"predictor_\1.out_fc2."),
        (r"^score_predictor\.(\d+)\.out_conv\.4\.", r"predictor_\1.out_fc3."),
    )

    def setup(self):
        super().setup()
        # A list attribute names its modules predictor_0, predictor_1, ...
        self.predictor = [Predictor(self.predictor_eps, self.dtype)
                          for _ in self.predictor_locations]

    def keep_schedule(self, rho: float, mode: str = "gather") -> SparsitySpec:
        """DynamicViT's schedule for keep rate ``rho``: ``rho^s`` at ``predictor_locations``."""
        return SparsitySpec.hierarchical(rho, self.predictor_locations, mode)

    def default_sparsity(self) -> SparsitySpec:
        """The schedule the model was trained for: ``keep_rho^s`` at ``predictor_locations``."""
        return self.keep_schedule(self.keep_rho)

    def __call__(self, images: Array, *, train: bool = False,
                 sparsity: SparsitySpec | None = None) -> tuple[Array, Aux]:
        if self.is_initializing():
            # Create every predictor's parameters even when the init spec does not use them.
            c = self.embed_dim
            for predictor in self.predictor:
                predictor(jnp.zeros((1, 1, c), self.dtype), jnp.ones((1, 1), jnp.float32))
        return super().__call__(images, train=train, sparsity=sparsity)

    # -- pruning -------------------------------------------------------------------------------

    def check_spec(self, spec: SparsitySpec) -> None:
        if spec.is_dense:
            return
        if spec.rule != "topk":
            raise SparsityError(f"{type(self).__name__} keeps a fixed number of tokens per stage (rule 'topk'); "
                                f"{spec.needs_family()}")
        if tuple(spec.locations) != tuple(self.predictor_locations):
            raise SparsityError(
                f"{type(self).__name__} has predictors before blocks {tuple(self.predictor_locations)} "
                f"but the sparsity spec prunes at {tuple(spec.locations)}; use e.g. "
                f"SparsitySpec.hierarchical(rho, {tuple(self.predictor_locations)}) or the density "
                f"'topk:rho@{'/'.join(map(str, self.predictor_locations))}'")

    def select_tokens(self, stage: int, state: TokenState, cls_attn: Array, spec: SparsitySpec,
                      train: bool) -> tuple[TokenState, Aux]:
        """Score the patch tokens with ``predictor_{stage}`` and keep/drop them (see module doc)."""
        del cls_attn
        self.check_spec(spec)
        p = self.num_prefix_tokens
        patches = state.x[:, p:]
        b, n = patches.shape[:2]
        prev = state.keep[:, p:] if state.keep is not None else jnp.ones((b, n), jnp.float32)
        logp = self.predictor[stage](patches, prev)
        scores = logp[..., 0]
        k = spec.keep_counts(self.num_patches)[stage]
        if spec.mode == "gather":
            return self.keep_top(state, scores, k, "gather")
        prefix = jnp.ones((b, p), jnp.float32)
        # Sampling follows ``train``, never whether an rng happens to be passed: a training
        # forward without the rng would otherwise silently fall back to the deterministic rule.
        if train and not self.has_rng("gumbel"):
            raise ValueError(
                f"{type(self).__name__} training (train=True, mode 'mask') samples Gumbel keep decisions "
                "and needs the 'gumbel' rng: pass rngs={'gumbel': key, ...} to apply "
                "(or train=False for the deterministic inference rule)")
        if train:
            hard = token_ops.gumbel_softmax_hard(self.make_rng("gumbel"), logp, self.gumbel_tau)[..., 0]
            decisions = hard * prev  # hierarchical; straight-through values
            keep_mask = jax.lax.stop_gradient(decisions)
            return state.replace(keep=jnp.concatenate([prefix, decisions], axis=1)), {
                "keep_masks": keep_mask, "decisions": decisions}
        # Deterministic rule: the inference top-k among the tokens still kept.
        new, stage_aux = self.keep_top(state, scores, k, "mask")
        return new, {**stage_aux, "decisions": stage_aux["keep_masks"]}

    def extra_macs(self, spec: SparsitySpec | None) -> float:
        """Predictor MACs under ``spec``: each runs on the tokens present at its stage."""
        if spec is None or spec.is_dense:
            return 0.0
        self.check_spec(spec)
        n = self.num_patches
        if spec.mode == "mask":
            seen = [n] * len(spec.locations)
        else:
            seen = [n] + list(spec.keep_counts(n)[:-1])
        return float(sum(seen) * predictor_macs(self.embed_dim))


register_family("dynamicvit", DynamicViT, "DynamicViT", "predictors before blocks 3, 6, 9 (1, 2, 3 at test and demo size), "
                "keep 0.7 / 0.49 / 0.343 by default", distilled=False, predictor_locations=(3, 6, 9), keep_rho=0.7,
                test={"predictor_locations": (1, 2, 3)}, demo={"predictor_locations": (1, 2, 3)})
