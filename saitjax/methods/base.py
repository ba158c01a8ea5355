"""What a training method plugs into the method-agnostic trainer.

A method owns (1) its loss terms, computed from the model's ``(logits, aux)`` and an optional
frozen teacher, and (2) the sparsity of each step, chosen on the host from (seed, step) so that
every process agrees and the spec stays a static argument of the jitted step. The trainer owns
everything else: data, mixup, optimizer, sharding, checkpoints, logging.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from saitjax import losses
from saitjax.models.core.variables import as_variables
from saitjax.sparsity import SparsitySpec, parse_density

Array = jax.Array
Metrics = dict[str, Array]
# Key of the updated model state (BatchNorm statistics) in the metrics a loss returns.
MODEL_STATE = "model_state"


class Method:
    """Supervised training of the model at its own sparsity, with optional logit distillation.

    The model's ``default_sparsity()`` is dense for DeiT and the model's own schedule for methods
    that train with their static reduction in place (ToMe's ``r``; EViT adds a warm-up).
    """

    name = "dense"
    # Whether ``loss`` takes ``model_state`` (models with BatchNorm statistics, e.g. STViT-R).
    supports_model_state = True
    # Fields a config may set under ``method_kwargs``, with their defaults.
    defaults: dict[str, Any] = {"distill_weight": 0.0, "distill_temperature": 1.0}

    def __init__(self, config: ml_collections.ConfigDict, model: Any):
        self.config = config
        self.model = model
        unknown = set(config.method_kwargs) - set(self.defaults)
        if unknown:
            raise ValueError(f"invalid config: method_kwargs {sorted(unknown)} are not fields of method "
                             f"{self.name!r}; valid: {sorted(self.defaults)}")
        self.kw = {**self.defaults, **dict(config.method_kwargs)}
        self.validate()

    def validate(self) -> None:
        if self.kw["distill_weight"] > 0 and not self.config.teacher:
            raise ValueError("invalid config: method_kwargs.distill_weight > 0 needs a teacher "
                             "(config.teacher = 'init' or a params file)")

    def bind_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the trainer once durations are known (methods with epoch-based phases)."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch

    @property
    def uses_teacher(self) -> bool:
        return self.kw["distill_weight"] > 0

    def train_sparsity(self, step: int) -> SparsitySpec:
        """The (static) sparsity of training step ``step``; the same on every host."""
        return self.model.default_sparsity()

    def eval_densities(self, texts: tuple[str, ...] | None = None) -> list[tuple[str, SparsitySpec]]:
        """``(label, spec)`` pairs evaluated at each evaluation (or of the density strings ``texts``)."""
        locations = getattr(self, "locations", None) or (3, 6, 9)
        bucket_kw = {"buckets": self.buckets} if getattr(self, "buckets", None) else {}
        out = []
        for text in self.config.eval.densities if texts is None else texts:
            spec = parse_density(text, locations, **bucket_kw)
            if spec.describe() not in dict(out):
                out.append((spec.describe(), spec))
        return out

    def loss(self, params: Any, images: Array, targets: Array, *, spec: SparsitySpec,
             rng: Array, teacher_params: Any | None, model_state: dict[str, Any] | None = None
             ) -> tuple[Array, Metrics]:
        """Scalar loss and metrics for one (mixed) batch; ``targets`` are soft labels ``[B, K]``.

        ``model_state``: collections the model updates in training (BatchNorm ``batch_stats``);
        their new values come back in ``metrics[MODEL_STATE]`` for the trainer to keep.
        """
        variables = {"params": params, **(model_state or {})}
        kwargs = dict(train=True, sparsity=spec, rngs={"dropout": rng})
        if model_state:
            (logits, aux), new_state = self.model.apply(variables, images, mutable=list(model_state), **kwargs)
        else:
            logits, aux = self.model.apply(variables, images, **kwargs)
        loss = losses.soft_cross_entropy(logits, targets)
        metrics = {"loss_cls": loss}
        if model_state:
            metrics[MODEL_STATE] = new_state
        if self.uses_teacher:
            teacher_logits = self.teacher_logits(teacher_params, images)
            kd = losses.kl_to_teacher(logits, teacher_logits, self.kw["distill_temperature"])
            loss = loss + self.kw["distill_weight"] * kd
            metrics["loss_kd"] = kd
        return loss, metrics

    def teacher_logits(self, teacher_params: Any, images: Array) -> Array:
        logits, _ = self.model.apply(as_variables(teacher_params), images, train=False,
                                     sparsity=SparsitySpec.dense())
        return jax.lax.stop_gradient(logits)
