"""Training configs: shared defaults, typed ``key=value`` arguments, and validation.

A config file in ``configs/`` defines ``get_config(arg)``; it starts from :func:`base_config`,
sets what its recipe changes, and ends with :func:`finalize` (validate + lock). Every field is
checked with a message that names the field and the fix, before anything touches the workdir.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from typing import Any, Iterator, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from saitjax.sparsity import SparsityError


def load_config_module(path: str) -> Any:
    """The module of a config file such as ``configs/demo.py`` (``get_config``, maybe ``get_sweep``)."""
    import importlib.util

    if not os.path.isfile(path):
        raise ValueError(f"config file {path}: no such file")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load config file {path!r}: expected a .py file defining get_config(arg)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file such as ``configs/demo.py`` (as ``--config path:arg``)."""
    return load_config_module(path).get_config(arg)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every recipe (the DeiT fine-tuning recipe where one applies)."""
    c = ml_collections.ConfigDict()
    c.model = "deit_small_patch16_224"
    c.model_kwargs = ml_collections.ConfigDict({"num_classes": 1000, "drop_path_rate": 0.1})
    c.method = "dense"
    c.method_kwargs = ml_collections.ConfigDict()
    # How the model runs, not what it computes (README "Pods"): compute dtype (parameters and
    # optimizer state stay float32), attention kernel, per-block rematerialisation, and where
    # parameters and optimizer state live (saitjax/sharding.py: replicated or fsdp, plus rules).
    c.compute = ml_collections.ConfigDict(dict(precision="float32", attention="auto", remat="none",
                                               param_sharding="replicated", sharding_rules=(),
                                               fsdp_min_size=2 ** 14))

    c.data = ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir="", manual_dir="", train_split="train",
        eval_split="validation", image_size=224, crop_scale=(0.08, 1.0), hflip=True,
        randaugment="rand-m9-mstd0.5-inc1", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), shuffle_buffer=10_000, cache=False))
    c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                                             label_smoothing=0.1, prob=1.0))
    c.batch_size = 1024  # global, over all devices and processes
    # Durations: train_steps (> 0) when set, else train_epochs (> 0). Likewise optim.warmup_steps
    # over optim.warmup_epochs, and optim.lr over the rule lr = lr_per_512 * batch_size / 512.
    # "Unset" is None, never a magic number: a negative or NaN value is an error, not a default.
    c.train_steps = placeholder(int)
    c.train_epochs = 30.0
    c.optim = ml_collections.ConfigDict(dict(
        lr_per_512=5e-4, lr=placeholder(float), min_lr=1e-6, warmup_steps=placeholder(int), warmup_epochs=5.0,
        weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0,
        frozen=(), lr_multipliers=(), frozen_until_epoch=()))
    # densities: evaluated at every evaluation. sweep: densities of the final density sweep
    # (table, Pareto plot, kept-token pictures; empty = no sweep), timed at sweep_batch_sizes.
    c.eval = ml_collections.ConfigDict(dict(every_steps=1000, batch_size=256, densities=("dense",),
                                            keep_mask=False, sweep=(), sweep_batch_sizes=(1, 32)))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3, async_save=True))
    c.log_every_steps = 50
    c.seed = 0
    c.init = ""     # pretrained params (.npz / .safetensors / .pth) to start from
    c.teacher = ""  # frozen teacher for distillation: "" (none), "init" (= config.init) or a path
    c.plot = True
    return c


def shapes_demo_data(c: ml_collections.ConfigDict, dataset: str = "saitjax_shapes",
                     data_dir: str = "") -> None:
    """Data of every demo: the generated 64 px shapes, light crops (the object must stay), no mixing."""
    c.data.name = dataset
    c.data.data_dir = data_dir
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size = 64
    c.data.crop_scale = (0.85, 1.0)  # images are already at size; crops must keep the object
    c.data.randaugment = ""
    c.data.crop_pct = 1.0
    c.data.shuffle_buffer = 4096
    c.data.cache = True
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.mixup.label_smoothing = 0.1


def shapes_demo_recipe(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict) -> None:
    """Data, schedule and logging of the from-scratch demos (``a``: epochs, batch, lr, dataset, data_dir)."""
    shapes_demo_data(c, a.dataset, a.data_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr = a.lr
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 0.5
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 1.0
    c.eval.every_steps = 400  # and at the end (and by --mode eval)
    c.eval.batch_size = 256
    c.checkpoint.every_steps = 100
    c.log_every_steps = 20


def shapes_finetune_recipe(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict, config_file: str,
                           warmup_epochs: float = 0.0) -> None:
    """Data, schedule and logging of the demos that fine-tune the dense demo model (``a``: init,
    epochs, batch, lr, dataset, data_dir); evaluation at the end only."""
    if not a.init:
        raise ValueError(
            f"invalid config: {config_file} fine-tunes a dense demo model; first run "
            "`python -m saitjax.main --config configs/demo_dense.py --workdir DIR` and pass "
            f"init=DIR/export/params_step1560.npz ({config_file}:init=...)")
    c.init = a.init
    shapes_demo_data(c, a.dataset, a.data_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr = a.lr
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = warmup_epochs
    c.optim.weight_decay = 0.05
    c.optim.grad_clip_norm = 1.0
    c.eval.every_steps = 10_000  # at the end (and by --mode eval)
    c.eval.batch_size = 256
    c.checkpoint.every_steps = 100
    c.log_every_steps = 20


def imagenet_data(c: ml_collections.ConfigDict, data_dir: str = "", manual_dir: str = "") -> None:
    """ImageNet-1k through TFDS (docs/imagenet.md) with DeiT's augmentation and mixing."""
    c.data.name = "imagenet2012"
    c.data.data_dir = data_dir
    c.data.manual_dir = manual_dir
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.randaugment = "rand-m9-mstd0.5-inc1"
    c.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """``"epochs=30,model=deit_tiny_patch16_224"`` -> typed values, defaults for the rest."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} is not key=value (valid keys: {sorted(defaults)})")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config argument {key!r}.{hint} Valid keys: {sorted(defaults)}")
        out[key] = _cast(value, defaults[key], key)
    return out


def _cast(value: str, default: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(f"config argument {key}={value!r} is not a {type(default).__name__}") from None
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid config: {message}")


def _numbers(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(dotted.path, number)`` for every number in a config, tuples and pairs included."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else key)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        yield path, value


def _check_optim(o: ml_collections.ConfigDict) -> None:
    """Optimiser fields: an unset field (None) takes its rule; a set one must be in range."""
    if o.lr is not None:
        _require(o.lr > 0, f"optim.lr={o.lr!r} must be > 0")
    _require(o.lr_per_512 > 0, f"optim.lr_per_512={o.lr_per_512!r} must be > 0")
    _require(o.min_lr >= 0, f"optim.min_lr={o.min_lr!r} must be >= 0")
    _require(o.warmup_steps is None or o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps!r} must be >= 0")
    _require(o.warmup_epochs >= 0, f"optim.warmup_epochs={o.warmup_epochs!r} must be >= 0")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay!r} must be >= 0")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1}, optim.b2={o.b2} must lie in [0, 1)")
    _require(o.eps >= 0, f"optim.eps={o.eps!r} must be >= 0")
    _require(o.grad_clip_norm >= 0, f"optim.grad_clip_norm={o.grad_clip_norm!r} must be >= 0 (0 = off)")
    for field in ("lr_multipliers", "frozen_until_epoch"):
        for i, pair in enumerate(o[field]):
            _require(isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
                     and isinstance(pair[1], numbers.Real) and pair[1] >= 0,
                     f"optim.{field}[{i}]={pair!r} must be a (regex, number >= 0) pair")


PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16"}


def build_model(c: ml_collections.ConfigDict) -> Any:
    """The config's model: ``model_kwargs`` plus the ``compute`` fields the model has.

    ``compute.precision`` becomes the model's compute ``dtype``; ``attention`` and ``remat`` go to
    models that have them (the ViT family) and are refused, naming the field, by others.
    """
    import dataclasses

    from saitjax.models import create_model
    from saitjax.models.registry import model_entry
    from saitjax.models.core.attention import check_attention_impl
    from saitjax.models.core.remat import check_remat

    compute = c.compute
    _require(compute.precision in PRECISIONS,
             f"compute.precision={compute.precision!r}: choose float32 or bfloat16 (float16 would need loss "
             "scaling, which bfloat16's float32 exponent range makes unnecessary)")
    try:
        check_attention_impl(compute.attention)
        check_remat(compute.remat)
    except ValueError as err:
        raise ValueError(f"invalid config: compute.{err}") from None
    kwargs: dict[str, Any] = {"dtype": PRECISIONS[compute.precision]}
    try:
        fields = {f.name for f in dataclasses.fields(model_entry(c.model).constructor)}
    except ValueError as err:
        raise ValueError(f"invalid config: model: {err}") from None
    for field, default in (("attention", "auto"), ("remat", "none")):
        if field in fields:
            kwargs[field] = compute[field]
        else:
            _require(compute[field] == default, f"compute.{field}={compute[field]!r}: {c.model} has no "
                     f"{field} option (the ViT family has); leave compute.{field}={default!r}")
    overlap = set(kwargs) & set(c.model_kwargs)
    _require(not overlap, f"model_kwargs sets {sorted(overlap)}: set compute.precision / compute.attention / "
             "compute.remat instead")
    try:
        return create_model(c.model, **dict(c.model_kwargs), **kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid config: model / model_kwargs: {err}") from None


def validate(c: ml_collections.ConfigDict) -> None:
    """Check every field; raise ValueError naming the field and the fix."""
    from saitjax.methods import METHODS

    for path, value in _numbers(c, ""):  # NaN/inf pass every `<`/`>=` check below, or fail it misleadingly
        _require(math.isfinite(value), f"{path}={value!r} must be a finite number")
    model = build_model(c)
    _require(c.compute.param_sharding in ("replicated", "fsdp"),
             f"compute.param_sharding={c.compute.param_sharding!r}: choose replicated or fsdp")
    _require(isinstance(c.compute.fsdp_min_size, int) and c.compute.fsdp_min_size >= 0,
             f"compute.fsdp_min_size={c.compute.fsdp_min_size!r} must be an integer >= 0")
    from saitjax.sharding import check_rules

    check_rules(c.compute.sharding_rules)
    _require(c.method in METHODS, f"method={c.method!r} is unknown; choose one of {sorted(METHODS)}")
    _require(c.data.image_size == model.img_size,
             f"data.image_size={c.data.image_size} but {c.model} takes {model.img_size} px; set "
             f"data.image_size={model.img_size}, or model_kwargs.img_size={c.data.image_size} to run the "
             "model at that size (pretrained position embeddings are interpolated)")
    _require(bool(c.data.name), "data.name is empty: a TFDS name or imagefolder:/path")
    _require(c.batch_size > 0, f"batch_size={c.batch_size} must be positive")
    if c.train_steps is not None:
        _require(c.train_steps > 0, f"train_steps={c.train_steps} must be > 0")
    else:
        _require(c.train_epochs > 0, f"train_epochs={c.train_epochs!r} must be > 0 (or set train_steps)")
    _require(isinstance(c.seed, int) and 0 <= c.seed < 2**32, f"seed={c.seed!r} must be an integer in [0, 2**32)")
    _check_optim(c.optim)
    m = c.mixup
    _require(min(m.mixup_alpha, m.cutmix_alpha) >= 0, "mixup alphas must be >= 0 (0 = off)")
    _require(0 <= m.label_smoothing < 1 and 0 <= m.prob <= 1 and 0 <= m.switch_prob <= 1,
             "mixup.label_smoothing must lie in [0, 1), mixup.prob and switch_prob in [0, 1]")
    lo, hi = c.data.crop_scale
    _require(0 < lo <= hi <= 1, f"data.crop_scale={tuple(c.data.crop_scale)} must satisfy 0 < lo <= hi <= 1")
    _require(0 < c.data.crop_pct <= 1, f"data.crop_pct={c.data.crop_pct} must lie in (0, 1]")
    _require(c.eval.batch_size > 0 and c.eval.every_steps > 0, "eval.batch_size and eval.every_steps must be positive")
    _require(c.checkpoint.every_steps > 0 and c.checkpoint.max_to_keep > 0,
             "checkpoint.every_steps and checkpoint.max_to_keep must be positive")
    _require(c.log_every_steps > 0, "log_every_steps must be positive")
    _require(c.teacher in ("", "init") or c.teacher.endswith((".npz", ".safetensors", ".pth", ".pt")),
             f"teacher={c.teacher!r}: use '', 'init' or a params file")
    _require(c.teacher != "init" or bool(c.init), "teacher='init' needs config.init (the weights to copy)")
    _require(all(b > 0 for b in c.eval.sweep_batch_sizes), "eval.sweep_batch_sizes must be positive")
    method = METHODS[c.method](c, model)  # validates method_kwargs
    for text in tuple(c.eval.densities) + tuple(c.eval.sweep):
        try:
            for _, spec in method.eval_densities((text,)):  # parsed at the method's locations
                spec.check_depth(model.depth)
                model.check_spec(spec)
        except SparsityError as err:
            raise ValueError(f"invalid config: eval.densities/eval.sweep entry {text!r}: {err}") from None


def finalize(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validate, then lock: assigning a misspelt field afterwards raises.

    ``model_kwargs.img_size`` is filled in with the model's own size when the recipe leaves it
    out, so that ``--config.model_kwargs.img_size=384`` (what the image-size error suggests) is an
    override of an existing field, which a locked config accepts, rather than a new one.
    """
    validate(c)
    if "img_size" not in c.model_kwargs:
        model = build_model(c)
        if hasattr(model, "img_size"):
            c.model_kwargs.img_size = int(model.img_size)
    c.lock()
    return c


def to_dict(c: ml_collections.ConfigDict | Mapping) -> dict:
    """Plain JSON-able dict (tuples -> lists) for ``config.json`` and checkpoint metadata."""
    if isinstance(c, ml_collections.ConfigDict):
        c = c.to_dict()
    return {k: to_dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v
            for k, v in c.items()}
