"""Config validation: every bad value is an error that names its field (no training here)."""

from __future__ import annotations

import math
import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

from saitjax import train
from saitjax.config import validate

from train_fixtures import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _cli_config(name: str, *overrides: str):
    """The config exactly as ``python -m saitjax.main --config configs/NAME.py OVERRIDES`` builds it."""
    argv = ["saitjax.main", "--config", os.path.join(ROOT, "configs", f"{name}.py"), *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _suggested_fixes(message: str) -> list[str]:
    """``field=value`` assignments a message tells the user to make, as --config overrides."""
    return ["--config." + fix for fix in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)*=\d+)\b", message.split("; ", 1)[1])]


@pytest.mark.parametrize("name, bad, n_fixes", [
    ("demo", "--config.data.image_size=48", 2),            # data.image_size=64, model_kwargs.img_size=48
    ("deit_small_imagenet", "--config.data.image_size=384", 2),
    ("demo", "--config.train_epochs=0", 1),                 # ...or set train_steps
])
def test_every_suggested_fix_works_when_applied(name, bad, n_fixes):
    config = _cli_config(name, bad)
    with pytest.raises(ValueError) as err:
        validate(config)
    message = str(err.value)
    if "train_steps" in message:  # "(or set train_steps)": any positive count
        fixes = ["--config.train_steps=10"]
    else:
        fixes = _suggested_fixes(message)
    assert len(fixes) == n_fixes, message
    for fix in fixes:
        validate(_cli_config(name, bad, fix))  # the locked config accepts it, and it is valid


def test_empty_sweep_message_suggests_a_sweep_this_config_accepts(tmp_path):
    config = _cli_config("deit_small_imagenet")
    with pytest.raises(ValueError, match="config.eval.sweep is empty") as err:
        train.sweep_checkpoint(config, str(tmp_path / "w"))
    override = re.search(r"(--config\.eval\.sweep=)'(.*)'", str(err.value))
    fixed = _cli_config("deit_small_imagenet", override.group(1) + override.group(2))  # the shell drops the ''
    validate(fixed)
    assert fixed.eval.sweep and not os.path.exists(tmp_path / "w")



@pytest.mark.parametrize("field, value, message", [
    ("eval.densities", ("dense", 0.7), "is a float, not a string"),
    ("eval.densities", ("mass:0.8@1",), "'mass' needs a model of the sait_\\* family"),
    ("eval.sweep", ("dense", "topk:0.5@9"), "do not fit a 4-block model"),
])
def test_densities_the_model_cannot_run_are_refused_before_training(tmp_path, field, value, message):
    """The real reason, at start-up: not a trace-time error at the first evaluation."""
    import jax

    from saitjax import parallel
    from train_fixtures import tiny_data

    config = tiny_config(**{field: value})
    mesh = parallel.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match=message):
        train.Run(config, str(tmp_path / "w"), data=tiny_data(mesh, config), mesh=mesh)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"compute.precision": "float16"}, "compute.precision='float16': choose float32 or bfloat16 (float16 would "
                                       "need loss scaling"),
    ({"compute.attention": "flash"}, "compute.attention='flash': choose one of auto, fused, explicit"),
    ({"compute.remat": "dots"}, "compute.remat='dots': choose 'none', 'full' or a jax.checkpoint_policies"),
    ({"model": "swin_test_patch4_window4_32", "compute.remat": "full"},
     "compute.remat='full': swin_test_patch4_window4_32 has no remat option (the ViT family has); leave "
     "compute.remat='none'"),
    ({"model_kwargs.dtype": "bfloat16"}, "model_kwargs sets ['dtype']: set compute.precision"),
])
def test_compute_fields_are_checked(overrides, message):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(config)


def test_compute_fields_reach_the_model():
    from saitjax.config import build_model

    model = build_model(tiny_config(**{"compute.precision": "bfloat16", "compute.attention": "fused",
                                       "compute.remat": "dots_saveable"}))
    assert (model.dtype, model.attention, model.remat) == ("bfloat16", "fused", "dots_saveable")
    swin = build_model(tiny_config(model="swin_test_patch4_window4_32", **{"compute.precision": "bfloat16"}))
    assert swin.dtype == "bfloat16"
