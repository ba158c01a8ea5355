"""EViT training: supervised, with the official keep-rate warm-up, quantised to bound compilations.

The model reduces tokens with its own rule (``keep_rate`` at ``drop_loc``, ``fuse_token``; set
them in ``config.model_kwargs``). The official ``helpers.adjust_keep_rate`` keeps every token for
``shrink_start_epoch`` epochs, then lowers the rate along a cosine from 1 to ``keep_rate`` over
``shrink_epochs`` epochs. Every distinct rate is another static token schedule, i.e. another
compilation of the training step (147 along the official cosine 1 -> 0.7); here the rate is rounded
*up* to a grid of ``keep_rate_step`` above ``keep_rate``, so training compiles at most
``ceil((1 - keep_rate) / keep_rate_step) + 1`` times (7 for 0.7 in steps of 0.05). Fine-tuning
(the official ``finetune.sh``: ``shrink_start_epoch=0``, ``shrink_epochs=0``) compiles once.
EViT adds no loss term; logit distillation from ``config.teacher`` is available as for every method.
"""

from __future__ import annotations

import math
from typing import Any

from saitjax.methods.base import Method
from saitjax.sparsity import SparsitySpec


def warmup_keep_rate(epoch: float, keep_rate: float, shrink_start: float, shrink_epochs: float) -> float:
    """The official schedule: 1 before ``shrink_start``, cosine to ``keep_rate``, then constant."""
    if epoch < shrink_start:
        return 1.0
    if shrink_epochs <= 0 or epoch >= shrink_start + shrink_epochs:
        return keep_rate
    progress = (epoch - shrink_start) / shrink_epochs
    return keep_rate + (1.0 - keep_rate) * 0.5 * (math.cos(progress * math.pi) + 1.0)


def quantise_up(rate: float, keep_rate: float, step: float) -> float:
    """Round ``rate`` up to ``keep_rate + j * step`` (at most 1): a bounded set of schedules."""
    j = math.ceil((rate - keep_rate) / step - 1e-6)  # float noise is not a new rate
    return min(1.0, round(keep_rate + max(j, 0) * step, 10))


class EViTMethod(Method):
    """Supervised EViT training with the keep-rate warm-up (official names, in epochs)."""

    name = "evit"
    defaults: dict[str, Any] = {
        "shrink_start_epoch": 0.0,   # fine-tuning: 0 (the official fix of issue #3); from scratch: 10
        "shrink_epochs": 0.0,        # fine-tuning: 0 (constant rate); from scratch: 100
        "keep_rate_step": 0.05,      # warm-up rates are rounded up to this grid
        "distill_weight": 0.0,
        "distill_temperature": 1.0,
    }

    def validate(self) -> None:
        super().validate()
        kw = self.kw
        if not hasattr(self.model, "drop_loc"):
            raise ValueError(f"invalid config: method 'evit' needs an EViT model (evit_*), got {self.config.model!r}")
        for key in ("shrink_start_epoch", "shrink_epochs"):
            if kw[key] < 0:
                raise ValueError(f"invalid config: method_kwargs.{key}={kw[key]} must be >= 0")
        if not 0.0 < kw["keep_rate_step"] <= 1.0:
            raise ValueError(f"invalid config: method_kwargs.keep_rate_step={kw['keep_rate_step']} must lie in (0, 1]")
        self.locations = tuple(self.model.drop_loc)
        self.steps_per_epoch = 1

    def keep_rate(self, step: int) -> float:
        """The (quantised) keep rate of training step ``step``."""
        kw = self.kw
        rate = warmup_keep_rate(step / self.steps_per_epoch, self.model.keep_rate,
                                kw["shrink_start_epoch"], kw["shrink_epochs"])
        return quantise_up(rate, self.model.keep_rate, kw["keep_rate_step"])

    def train_sparsity(self, step: int) -> SparsitySpec:
        return SparsitySpec.evit(self.keep_rate(step), self.locations, self.model.fuse_token)
