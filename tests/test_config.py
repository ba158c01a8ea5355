"""Config validation: every bad value is an error that names its field (no training here)."""

from __future__ import annotations

import math
import re

import pytest

from saitjax import train
from saitjax.config import validate

from train_fixtures import tiny_config


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", -0.001, "optim.lr=-0.001 must be > 0"),
    ("optim.lr", 0.0, "optim.lr=0.0 must be > 0"),
    ("optim.lr", math.nan, "optim.lr=nan must be a finite number"),
    ("optim.lr", math.inf, "optim.lr=inf must be a finite number"),
    ("optim.lr_per_512", -5e-4, "optim.lr_per_512=-0.0005 must be > 0"),
    ("optim.min_lr", -1e-6, "optim.min_lr=-1e-06 must be >= 0"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1 must be >= 0"),
    ("optim.warmup_epochs", -2.0, "optim.warmup_epochs=-2.0 must be >= 0"),
    ("optim.weight_decay", math.inf, "optim.weight_decay=inf must be a finite number"),
    ("optim.eps", -1e-8, "optim.eps=-1e-08 must be >= 0"),
    ("optim.b2", math.nan, "optim.b2=nan must be a finite number"),
    ("optim.grad_clip_norm", -1.0, "optim.grad_clip_norm=-1.0 must be >= 0"),
    ("optim.lr_multipliers", (("head", -2.0),), "optim.lr_multipliers[0]=('head', -2.0)"),
    ("optim.frozen_until_epoch", (("head", math.nan),), "optim.frozen_until_epoch[0][1]=nan"),
    ("train_steps", -5, "train_steps=-5 must be > 0"),
    ("seed", -1, "seed=-1 must be an integer"),
    ("data.mean", (0.5, math.nan, 0.5), "data.mean[1]=nan must be a finite number"),
    ("mixup.cutmix_alpha", math.inf, "mixup.cutmix_alpha=inf must be a finite number"),
])
def test_bad_numbers_are_errors_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match="invalid config: " + re.escape(message)):
        validate(tiny_config(**{field: value}))


def test_unset_lr_and_durations_take_their_rules():
    """None (unset) means "use the rule"; only a set value overrides it."""
    config = tiny_config(**{"optim.lr": None, "optim.warmup_steps": None, "train_steps": None,
                            "train_epochs": 2.0, "optim.warmup_epochs": 0.5, "optim.lr_per_512": 1e-3})
    validate(config)
    total, warmup, steps_per_epoch = train.durations(config, num_train_examples=64)
    assert (total, warmup, steps_per_epoch) == (8, 2, 4)
    assert train.optimizer_config(config, total, warmup, steps_per_epoch).lr == pytest.approx(1e-3 * 16 / 512)
    config = tiny_config(**{"optim.lr": 2e-3})
    assert train.optimizer_config(config, 16, 2, 4).lr == 2e-3
