"""DynamicViT training: Gumbel keep decisions, a keep-ratio loss and distillation from the dense model.

``L = CE + ratio_weight * L_ratio + distill_weight * KL(teacher || student)
+ token_distill_weight * L_tok`` (methods.md §4.6). The teacher is the same network at the dense
spec with the frozen initial weights (``config.teacher = "init"``); it needs no predictor
parameters. Training runs the full token sequence in ``mask`` mode; evaluation gathers.

One method for every backbone: the model says its schedule (``model.keep_schedule(rho)``: ``rho^s``
of the tokens on a ViT, ``rho, rho - 0.2, rho - 0.4`` of the stage-3 locations on ConvNeXt/Swin)
and what the token distillation covers (the kept tokens on a ViT; every location of the final
normed map where ``model.distill_every_location``, as the official hierarchical loss, whose
published weights are ``ratio_weight=10``, ``distill_weight=token_distill_weight=0.5``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from saitjax import losses
from saitjax.methods.base import Method, Metrics
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array


def ratio_loss(decisions: Sequence[Array], ratios: Sequence[float]) -> Array:
    """``mean_s mean_b (mean_i D^s[b, i] - rho_s)^2`` on the (straight-through) hard decisions.

    Per image, so every image -- not just the batch on average -- is pushed to the budget.
    """
    if len(decisions) != len(ratios) or not decisions:
        raise ValueError(f"need one keep ratio per stage: {len(decisions)} decisions, {len(ratios)} ratios")
    terms = [jnp.mean((jnp.mean(d.astype(jnp.float32), axis=-1) - r) ** 2)
             for d, r in zip(decisions, ratios)]
    return jnp.mean(jnp.stack(terms))


def token_distill_loss(student_tokens: Array, teacher_tokens: Array, keep: Array) -> Array:
    """MSE to the teacher's tokens ``[B, N, C]``, averaged over the tokens kept by ``keep [B, N]``.

    Pruned tokens are free to drift (the classifier never sees them); 0 if nothing is kept.
    """
    teacher = jax.lax.stop_gradient(teacher_tokens.astype(jnp.float32))
    per_token = jnp.mean((student_tokens.astype(jnp.float32) - teacher) ** 2, axis=-1)
    w = jax.lax.stop_gradient(keep.astype(jnp.float32))
    count = jnp.sum(w)
    return jnp.where(count > 0, jnp.sum(per_token * w) / jnp.maximum(count, 1.0), 0.0)


class DynamicViTMethod(Method):
    """DynamicViT (Rao et al. 2021) on a ``dynamicvit_*`` model."""

    name = "dynamicvit"
    supports_model_state = False  # its loss applies the model with params only
    defaults: ClassVar[dict[str, Any]] = {
        "rho": 0.7,                    # keep rho, rho^2, ... of the patch tokens at the locations
        "locations": (3, 6, 9),        # must equal the model's predictor_locations
        "ratio_weight": 2.0,
        "distill_weight": 0.5,         # logit KL to the dense teacher
        "token_distill_weight": 0.5,   # MSE to the teacher's final patch tokens (kept tokens only)
        "distill_temperature": 1.0,
        "gumbel_tau": 1.0,
    }

    def __init__(self, config, model: Any):
        super().__init__(config, model)
        # The model's Gumbel temperature comes from the method config (training only).
        self.train_model = model.clone(gumbel_tau=float(self.kw["gumbel_tau"]))

    @property
    def locations(self) -> tuple[int, ...]:
        return tuple(int(l) for l in self.kw["locations"])

    def validate(self) -> None:
        kw = self.kw
        model_locations = getattr(self.model, "predictor_locations", None)
        if model_locations is None:
            raise ValueError(f"invalid config: method 'dynamicvit' needs a DynamicViT model "
                             f"(e.g. model='dynamicvit_deit_small_patch16_224'), not {type(self.model).__name__}")
        if self.locations != tuple(model_locations):
            raise ValueError(f"invalid config: method_kwargs.locations={self.locations} but the model has "
                             f"predictors before blocks {tuple(model_locations)}; set "
                             f"method_kwargs.locations={tuple(model_locations)}")
        if not 0.0 < kw["rho"] <= 1.0:
            raise ValueError(f"invalid config: method_kwargs.rho={kw['rho']} must lie in (0, 1]")
        try:
            self.model.keep_schedule(kw["rho"])
        except SparsityError as err:
            raise ValueError(f"invalid config: method_kwargs.rho={kw['rho']}: {err}") from None
        for key in ("ratio_weight", "distill_weight", "token_distill_weight"):
            if kw[key] < 0:
                raise ValueError(f"invalid config: method_kwargs.{key}={kw[key]} must be >= 0")
        if not kw["gumbel_tau"] > 0 or not kw["distill_temperature"] > 0:
            raise ValueError("invalid config: method_kwargs.gumbel_tau and distill_temperature must be > 0")
        if self.uses_teacher and not self.config.teacher:
            raise ValueError("invalid config: method_kwargs.distill_weight / token_distill_weight > 0 "
                             "need a teacher (config.teacher = 'init' or a params file), or set both to 0")

    @property
    def uses_teacher(self) -> bool:
        return self.kw["distill_weight"] > 0 or self.kw["token_distill_weight"] > 0

    def train_sparsity(self, step: int) -> SparsitySpec:
        """The same every step: the model's schedule for rho, masked (all tokens stay)."""
        return self.model.keep_schedule(self.kw["rho"], mode="mask")

    def loss(self, params: Any, images: Array, targets: Array, *, spec: SparsitySpec,
             rng: Array, teacher_params: Any | None) -> tuple[Array, Metrics]:
        kw = self.kw
        dropout_rng, gumbel_rng = jax.random.split(rng)
        logits, aux = self.train_model.apply({"params": params}, images, train=True, sparsity=spec,
                                             rngs={"dropout": dropout_rng, "gumbel": gumbel_rng})
        if "decisions" not in aux:
            raise ValueError(f"DynamicViT training needs a mask-mode spec with keep decisions, got {spec.describe()} "
                             f"(mode {spec.mode!r})")
        decisions = aux["decisions"]
        cls = losses.soft_cross_entropy(logits, targets)
        ratio = ratio_loss(decisions, spec.keep_ratios)
        loss = cls + kw["ratio_weight"] * ratio
        metrics: Metrics = {"loss_cls": cls, "loss_ratio": ratio}
        for s, d in enumerate(decisions):
            metrics[f"kept_fraction_{s}"] = jnp.mean(jax.lax.stop_gradient(d))
        if self.uses_teacher:
            if teacher_params is None:
                raise ValueError("method 'dynamicvit' distils from a teacher but got teacher_params=None")
            t_logits, t_tokens = self.teacher_outputs(teacher_params, images)
            p = self.model.num_prefix_tokens
            kd = losses.kl_to_teacher(logits, t_logits, kw["distill_temperature"])
            every = getattr(self.model, "distill_every_location", False)
            covered = jnp.ones(t_tokens[:, p:].shape[:2], jnp.float32) if every else decisions[-1]
            tok = token_distill_loss(aux["tokens"][:, p:], t_tokens[:, p:], covered)
            loss = loss + kw["distill_weight"] * kd + kw["token_distill_weight"] * tok
            metrics.update(loss_kd=kd, loss_token=tok)
        return loss, metrics

    def teacher_outputs(self, teacher_params: Any, images: Array) -> tuple[Array, Array]:
        """Frozen dense teacher: logits and final normalised tokens ``[B, N, C]``."""
        logits, aux = self.model.apply({"params": teacher_params}, images, train=False,
                                       sparsity=SparsitySpec.dense())
        return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(aux["tokens"])

    def teacher_logits(self, teacher_params: Any, images: Array) -> Array:
        return self.teacher_outputs(teacher_params, images)[0]
