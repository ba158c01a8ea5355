"""PyTorch (timm / DeiT / DynamicViT-style) state dicts -> saitjax Linen params.

The mapping is by rule, not by table: a model class lists regex renames from its PyTorch key
names to its Linen module path (``blocks.3.attn.qkv`` -> ``blocks_3/attn/qkv``); the leaf is
then matched against the model's own parameter tree, and the layout is fixed by what the leaf
is: a Linen ``kernel`` of a Linear is the transposed PyTorch weight, a conv kernel is
``(kh, kw, in, out)``, a LayerNorm ``weight`` becomes ``scale``. Anything left over -- unknown
keys, missing parameters, mismatched shapes -- is reported together in one error.

Models with BatchNorm (STViT-R's stem) also keep running statistics, the Linen ``batch_stats``
collection: :func:`convert_variables` maps ``running_mean`` / ``running_var`` there (``mean`` /
``var``) and returns every collection; :func:`convert_state_dict` returns params only and refuses
such a model rather than dropping its statistics.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from saitjax.models.vit import interpolate_pos_embed

# Buffers and bookkeeping that carry no learned weights.
IGNORED_KEYS = re.compile(r"(^|\.)(num_batches_tracked|relative_position_index|attn_mask)$")
# Wrapper prefixes added by DataParallel / torch.compile / EMA helpers.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

BASE_RENAMES: tuple[tuple[str, str], ...] = ((r"^blocks\.(\d+)\.", r"blocks_\1."),)


class ConversionError(ValueError):
    """A checkpoint that does not fit the target model; the message lists every problem."""


# PyTorch BatchNorm buffers -> (Linen collection, leaf).
STAT_LEAVES = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def expected_variable_shapes(model: nn.Module) -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """``{collection: {path: shape}}`` of everything ``model.init`` creates (``params``, and
    ``batch_stats`` for a BatchNorm model), without allocating it."""
    images = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    return {col: {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(dict(tree[col])).items()}
            for col in tree}


def expected_param_shapes(model: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{path: shape}`` of the model's parameters, without allocating them."""
    return expected_variable_shapes(model)["params"]


def stateful_collections(model: nn.Module) -> tuple[str, ...]:
    """Collections besides ``params`` that the model needs to run (e.g. ``("batch_stats",)``)."""
    return tuple(sorted(set(expected_variable_shapes(model)) - {"params"}))


def strip_wrappers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Remove ``module.``-style prefixes shared by every key."""
    keys = list(state_dict)
    for prefix in WRAPPER_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return strip_wrappers({k[len(prefix):]: v for k, v in state_dict.items()})
    return dict(state_dict)


def _key_map(model: nn.Module, keys: list[str]) -> Mapping[str, str]:
    """Per-key renames a model class needs before the regex renames (``checkpoint_key_map``):
    layout changes a regex cannot express, e.g. moving Swin's PatchMerging to the next stage."""
    hook = getattr(type(model), "checkpoint_key_map", None)
    return hook(keys) if hook is not None else {}


def _renames(model: nn.Module) -> tuple[tuple[str, str], ...]:
    return tuple(getattr(type(model), "checkpoint_renames", ())) + BASE_RENAMES


def _to_linen(value: np.ndarray, leaf: str, want: tuple[int, ...] | None = None) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:  # Linear (out, in) -> (in, out)
        return value.T
    if leaf == "kernel" and value.ndim == 4:  # Conv (out, in, kh, kw) -> (kh, kw, in, out)
        kernel = value.transpose(2, 3, 1, 0)
        # A 1x1 conv where the model has a Dense (the official DynamicViT-ConvNeXt predictors).
        return kernel[0, 0] if want is not None and len(want) == 2 and kernel.shape[:2] == (1, 1) else kernel
    return value


def _target_leaf(parent: tuple[str, ...], leaf: str, expected: Mapping) -> str | None:
    candidates = {"weight": ("kernel", "scale"), "bias": ("bias",)}.get(leaf, (leaf,))
    for name in candidates:
        if parent + (name,) in expected:
            return name
    return None


def fit_pos_embed(value: np.ndarray, model: nn.Module) -> np.ndarray:
    """A ``[1, prefix + g*g, C]`` position embedding resized to ``model``'s patch grid."""
    return np.asarray(interpolate_pos_embed(jnp.asarray(value), model.num_prefix_tokens, model.grid_size))


def _describe(items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def convert_state_dict(state_dict: Mapping[str, Any], model: nn.Module, *, model_name: str = "model",
                       resize_pos_embed: bool = True, strict: bool = True,
                       skip_mismatched: str | None = None) -> dict[str, Any]:
    """Convert a PyTorch state dict (numpy arrays) into a nested Linen ``params`` dict.

    ``resize_pos_embed`` interpolates position embeddings from another resolution. With
    ``strict=False`` parameters absent from the checkpoint are simply left out (e.g. the new
    modules of a sparse variant loading dense weights); unknown keys and shape mismatches always
    raise, except mismatches at paths matching the regex ``skip_mismatched`` (e.g. ``^head/``
    when fine-tuning to another number of classes), which are left out. A model with running
    statistics (BatchNorm) raises: use :func:`convert_variables`, which keeps them.
    """
    expected = expected_variable_shapes(model)
    extra = sorted(set(expected) - {"params"})
    if extra:
        raise ConversionError(
            f"{model_name} keeps {', '.join(extra)} (BatchNorm running statistics) besides params; "
            "convert_state_dict returns params only and would drop them. Use convert_variables(state_dict, "
            "model) -> {'params': ..., 'batch_stats': ...} (or saitjax.convert.load_variables).")
    return _convert(state_dict, model, expected, model_name, resize_pos_embed, strict, skip_mismatched)["params"]


def convert_variables(state_dict: Mapping[str, Any], model: nn.Module, *, model_name: str = "model",
                      resize_pos_embed: bool = True, strict: bool = True,
                      skip_mismatched: str | None = None) -> dict[str, Any]:
    """Like :func:`convert_state_dict`, returning every collection the model has:
    ``{"params": ..., "batch_stats": ...}`` (just ``{"params": ...}`` for a model without BatchNorm).

    BatchNorm ``running_mean`` / ``running_var`` become ``batch_stats`` ``mean`` / ``var`` at the
    module's path; ``num_batches_tracked`` is skipped. ``strict`` covers the statistics too.
    """
    expected = expected_variable_shapes(model)
    return _convert(state_dict, model, expected, model_name, resize_pos_embed, strict, skip_mismatched)


def _convert(state_dict, model, expected, model_name, resize_pos_embed, strict, skip_mismatched):
    converted: dict[str, dict[tuple[str, ...], np.ndarray]] = {col: {} for col in expected}
    unknown, mismatched = [], []
    state_dict = strip_wrappers(state_dict)
    key_map = _key_map(model, list(state_dict))
    for key, value in state_dict.items():
        if IGNORED_KEYS.search(key):
            continue
        value = np.asarray(value)
        name = key_map.get(key, key)
        for pattern, repl in _renames(model):
            name = re.sub(pattern, repl, name)
        *parent, leaf = name.split(".")
        collection, target = STAT_LEAVES.get(leaf, ("params", None))
        shapes = expected.get(collection, {})
        target = _target_leaf(tuple(parent), leaf, shapes) if target is None else target
        if target is None or tuple(parent) + (target,) not in shapes:
            unknown.append(f"{key} {tuple(value.shape)}")
            continue
        path = tuple(parent) + (target,)
        want = shapes[path]
        value = _to_linen(value, target, want)
        if path == ("pos_embed",) and value.shape != want and resize_pos_embed and value.ndim == 3:
            value = fit_pos_embed(value, model)
        if tuple(value.shape) != want:
            if skip_mismatched and re.search(skip_mismatched, "/".join(path)):
                continue
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {want} at {'/'.join(path)}")
            continue
        converted[collection][path] = value.astype(np.float32) if value.dtype != np.float32 else value
    missing = sorted(("/".join(p) if col == "params" else f"{col}:{'/'.join(p)}") + f" {shapes[p]}"
                     for col, shapes in expected.items() for p in set(shapes) - set(converted[col])
                     if not (skip_mismatched and re.search(skip_mismatched, "/".join(p))))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):{_describe(mismatched)}")
    if unknown:
        problems.append(f"{len(unknown)} checkpoint key(s) the model does not have:{_describe(unknown)}")
    if missing and strict:
        problems.append(f"{len(missing)} model parameter(s) missing from the checkpoint:{_describe(missing)}")
    if problems:
        raise ConversionError(
            f"checkpoint does not fit {model_name}: " + "; ".join(problems)
            + "\nIs it a checkpoint of another model? Pass the matching --model/model= name "
              "(saitjax.list_models()), or num_classes=... if only the head differs.")
    return {col: traverse_util.unflatten_dict(flat) for col, flat in converted.items()}


def guess_model_name(state_dict: Mapping[str, Any]) -> str | None:
    """Name of a registered DeiT (or Swin, STViT-R, ConvNeXt, their DynamicViT variants) whose backbone shapes match ``state_dict``, if any."""
    from saitjax.models.deit import DEIT_SIZES

    sd = strip_wrappers(state_dict)
    if "cls_token" not in sd and "patch_embed.proj.weight" in sd:
        from saitjax.models.dynamicvit_spatial import guess_dynamicvit_spatial_name
        from saitjax.models.swin import guess_swin_name

        return guess_dynamicvit_spatial_name(sd, guess_swin_name(sd))
    if "stem.0.weight" in sd or "downsample_layers.0.0.weight" in sd:  # timm / official ConvNeXt
        from saitjax.models.convnext import guess_convnext_name
        from saitjax.models.dynamicvit_spatial import guess_dynamicvit_spatial_name

        return guess_dynamicvit_spatial_name(sd, guess_convnext_name(sd))
    if "cls_token" not in sd and "patch_embed.proj.2.c.weight" in sd:
        from saitjax.models.stvitr import guess_stvitr_name

        return guess_stvitr_name(sd)
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        return None
    width = int(np.shape(sd["cls_token"])[-1])
    distilled = "dist_token" in sd
    for size, (dim, _) in DEIT_SIZES.items():
        if dim == width:
            return f"deit_{size}{'_distilled' if distilled else ''}_patch16_224"
    return None
