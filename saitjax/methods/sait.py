"""SaiT dense/sparse training: one set of weights for every token density (methods.md §2.3).

Every step trains the dense forward (all tokens) and one sparse forward (masked attention, static
shapes) at a density that the host samples from ``densities`` with a generator seeded by
``(seed, step)``, so every process picks the same one and the spec stays a static argument of
the jitted step (one compilation per density). ``schedule="alternate"`` instead trains dense on
even steps and sparse on odd steps (half the cost per step). ``dense_warmup_epochs`` first train
densely only (the demo trains from scratch; fine-tuning from a checkpoint needs none).

Distillation (weights are ``method_kwargs``):

* logit KD, ``distill_weight``: KL from the frozen ``config.teacher`` to both passes
  (``distill_source="teacher"``, the default; ``teacher="init"`` = the initial dense weights),
  or from the current step's dense pass (stop-gradient) to the sparse pass
  (``distill_source="dense_pass"``: in-place distillation, no extra forward, no teacher file);
* token-selection KD, ``token_distill_weight``: KL between the dense pass's last-layer CLS
  attention over patch tokens (stop-gradient; the tokens the late blocks use) and the sparse
  pass's TIS at each pruning location, restricted to the tokens still alive there. Its gradient
  reaches the early blocks, which learn to score the tokens the late blocks will need.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saitjax import losses
from saitjax.methods.base import Method, Metrics
from saitjax.sparsity import SparsitySpec, parse_density

Array = jax.Array

SCHEDULES = ("joint", "alternate")
DISTILL_SOURCES = ("teacher", "dense_pass")


class SaiTMethod(Method):
    """Dense/sparse training with shared weights, logit KD and token-selection KD."""

    name = "sait"
    supports_model_state = False  # its loss applies the model with params only
    defaults: dict[str, Any] = {
        "locations": (3,),  # prune before these blocks (0-based)
        # capacity buckets (fractions of the patch tokens) of adaptive densities at inference
        "buckets": (0.25, 0.375, 0.5, 0.625, 0.75, 1.0),
        "densities": ("mass:0.8", "mass:0.85", "mass:0.9", "mass:0.95"),  # sparse pass, sampled per step
        "schedule": "joint",
        "dense_warmup_epochs": 0.0,
        "dense_weight": 1.0,
        "sparse_weight": 1.0,
        "distill_weight": 1.0,
        "distill_source": "teacher",
        "distill_temperature": 1.0,
        "token_distill_weight": 1.0,
    }

    def validate(self) -> None:
        kw = self.kw
        self.locations = tuple(int(l) for l in kw["locations"])
        self.buckets = tuple(float(b) for b in kw["buckets"])
        if kw["schedule"] not in SCHEDULES:
            raise ValueError(f"invalid config: method_kwargs.schedule={kw['schedule']!r}; choose one of {SCHEDULES}")
        if kw["distill_source"] not in DISTILL_SOURCES:
            raise ValueError(f"invalid config: method_kwargs.distill_source={kw['distill_source']!r}; "
                             f"choose one of {DISTILL_SOURCES}")
        if kw["distill_weight"] > 0 and kw["distill_source"] == "teacher" and not self.config.teacher:
            raise ValueError("invalid config: SaiT logit KD (method_kwargs.distill_weight > 0) from a teacher "
                             "needs config.teacher ('init' = the initial dense weights, or a params file); "
                             "or set method_kwargs.distill_source='dense_pass' to distil from the dense "
                             "pass of each step, or distill_weight=0")
        for key in ("dense_weight", "sparse_weight", "distill_weight", "token_distill_weight",
                    "dense_warmup_epochs"):
            if kw[key] < 0:
                raise ValueError(f"invalid config: method_kwargs.{key}={kw[key]} must be >= 0")
        if not kw["densities"]:
            raise ValueError("invalid config: method_kwargs.densities is empty; give e.g. ('mass:0.9',)")
        self.sparse_specs = []
        for text in kw["densities"]:
            try:
                spec = parse_density(text, self.locations, self.buckets)
                spec.check_depth(self.model.depth)
            except ValueError as err:
                raise ValueError(f"invalid config: method_kwargs.densities entry {text!r}: {err}") from None
            if spec.is_dense:
                raise ValueError(f"invalid config: method_kwargs.densities entry {text!r} is dense; the "
                                 "dense pass already runs every step")
            self.sparse_specs.append(spec.with_mode("mask"))
        self.warmup_steps = 0

    def bind_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        super().bind_schedule(total_steps, steps_per_epoch)
        self.warmup_steps = round(self.kw["dense_warmup_epochs"] * steps_per_epoch)

    @property
    def uses_teacher(self) -> bool:
        return self.kw["distill_weight"] > 0 and self.kw["distill_source"] == "teacher"

    def train_sparsity(self, step: int) -> SparsitySpec:
        """Dense during warm-up (and on even steps when alternating); else a sampled density."""
        if step < self.warmup_steps:
            return SparsitySpec.dense()
        if self.kw["schedule"] == "alternate" and (step - self.warmup_steps) % 2 == 0:
            return SparsitySpec.dense()
        pick = np.random.default_rng((int(self.config.seed), int(step))).integers(len(self.sparse_specs))
        return self.sparse_specs[int(pick)]

    def loss(self, params: Any, images: Array, targets: Array, *, spec: SparsitySpec,
             rng: Array, teacher_params: Any | None) -> tuple[Array, Metrics]:
        kw = self.kw
        dense_rng, sparse_rng = jax.random.split(rng)
        joint = kw["schedule"] == "joint" or spec.is_dense
        teacher = self.teacher_logits(teacher_params, images) if self.uses_teacher else None
        temperature = kw["distill_temperature"]
        metrics: Metrics = {}
        total = jnp.zeros((), jnp.float32)

        dense_logits, dense_aux = self.model.apply({"params": params}, images, train=True,
                                                   rngs={"dropout": dense_rng})
        if joint:
            metrics["loss_dense"] = losses.soft_cross_entropy(dense_logits, targets)
            total += kw["dense_weight"] * metrics["loss_dense"]
            if teacher is not None:
                metrics["loss_kd_dense"] = losses.kl_to_teacher(dense_logits, teacher, temperature)
                total += kw["distill_weight"] * metrics["loss_kd_dense"]
        else:  # alternate schedule, sparse step: the dense pass only provides (fixed) targets
            dense_logits = jax.lax.stop_gradient(dense_logits)
            dense_aux = jax.lax.stop_gradient(dense_aux)
        if spec.is_dense:
            return total, metrics

        logits, aux = self.model.apply({"params": params}, images, train=True, sparsity=spec,
                                       rngs={"dropout": sparse_rng})
        metrics["loss_sparse"] = losses.soft_cross_entropy(logits, targets)
        total += kw["sparse_weight"] * metrics["loss_sparse"]
        if kw["distill_weight"] > 0:
            source = teacher if teacher is not None else dense_logits
            metrics["loss_kd_sparse"] = losses.kl_to_teacher(logits, source, temperature)
            total += kw["distill_weight"] * metrics["loss_kd_sparse"]
        if kw["token_distill_weight"] > 0:
            metrics["loss_token_kd"] = token_selection_kd(
                dense_aux["cls_attn"], aux["token_scores"], aux["keep_masks"],
                self.model.num_prefix_tokens)
            total += kw["token_distill_weight"] * metrics["loss_token_kd"]
        metrics["kept_fraction"] = jnp.mean(aux["keep_masks"][-1])
        return total, metrics


def token_selection_kd(dense_cls_attn: Array, stage_scores: tuple[Array, ...],
                       stage_keep_masks: tuple[Array, ...], num_prefix: int) -> Array:
    """Mean over stages of ``KL(target || TIS)`` on the tokens alive at each stage.

    ``dense_cls_attn [B, H, N]``: the dense pass's last-block CLS attention (held fixed);
    ``stage_scores[s] [B, N_p]``: the sparse pass's TIS before stage ``s`` on the patch grid;
    ``stage_keep_masks[s] [B, N_p]``: tokens kept by stage ``s`` (alive before ``s + 1``).
    """
    target = jax.lax.stop_gradient(jnp.sum(dense_cls_attn[:, :, num_prefix:].astype(jnp.float32), axis=1))
    alive = jnp.ones_like(target)
    terms = []
    for scores, kept in zip(stage_scores, stage_keep_masks):
        terms.append(losses.masked_kl(target, scores, alive))
        alive = kept
    return jnp.mean(jnp.stack(terms))
