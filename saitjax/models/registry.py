"""Model registry: timm-style names -> configured Linen modules.

``create_model("deit_small_patch16_224", num_classes=10)`` builds a module; nothing is
initialised until ``model.init``. Each entry also records what a converter, a data pipeline or a
benchmark needs to know about the model (its timm twin, input normalisation, crop ratio).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Mapping

import flax.linen as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model name."""

    name: str
    constructor: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    description: str
    timm_name: str | None = None  # the timm model with the same backbone weights
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    tags: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, constructor: Callable[..., nn.Module], description: str, *,
                   timm_name: str | None = None, tags: tuple[str, ...] = (), **defaults: Any) -> None:
    """Register ``name``; ``defaults`` are the constructor's keyword arguments for it."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(name, constructor, dict(defaults), description, timm_name, tags=tags)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``, or a ValueError that suggests close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See saitjax.list_models() for all "
                         f"{len(_REGISTRY)} registered names.") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace constructor fields.

    Example: ``create_model("deit_small_patch16_224", num_classes=10, drop_path_rate=0.1)``.
    """
    entry = model_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.constructor)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{name} has no field(s) {unknown}; valid fields: {sorted(fields)}")
    return entry.constructor(**{**entry.defaults, **overrides})


def list_models(pattern: str | None = None, tag: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an fnmatch ``pattern`` and a ``tag``."""
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if tag:
        names = [n for n in names if tag in _REGISTRY[n].tags]
    return names
