"""Sweep axes for a config's ``get_sweep(hyper)``, the big_vision way.

A config file may define::

    def get_sweep(hyper):
        return hyper.product([
            hyper.sweep("arg.rho", [0.5, 0.7, 0.9]),      # an argument of get_config(arg)
            hyper.sweep("config.optim.lr", [1e-3, 3e-4]),  # a config field, set after get_config
        ])

Every helper returns a list of points (dicts of key -> value); ``python -m saitjax.launch``
turns each point into one run. Keys are ``arg.NAME`` (the ``name=value`` arguments after the
config path: they may change several fields at once, as ``rho`` does in the DynamicViT demo) or
``config.a.b`` (one field, as ``--config.a.b=value``). This module imports nothing heavy, so
config files can use it freely.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

Point = dict[str, Any]
PREFIXES = ("arg.", "config.")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key.startswith(PREFIXES) or key in PREFIXES:
        raise ValueError(f"sweep key {key!r} must be 'arg.NAME' (an argument of get_config) or "
                         "'config.FIELD' (a config field, e.g. 'config.optim.lr')")
    return key


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One axis: ``key`` takes each of ``values`` in turn."""
    values = list(values)
    if not values:
        raise ValueError(f"sweep({key!r}, ...) has no values")
    return [{_check_key(key): value} for value in values]


def fixed(key: str, value: Any) -> list[Point]:
    """``key`` set to ``value`` in every run (one point)."""
    return [{_check_key(key): value}]


def _axes(axes: Sequence[Any]) -> list[list[Point]]:
    if len(axes) == 1 and isinstance(axes[0], (list, tuple)) and axes[0] and isinstance(axes[0][0], list):
        axes = axes[0]  # product([a, b]) as well as product(a, b)
    return [list(axis) for axis in axes]


def _merge(points: Iterable[Point]) -> Point:
    merged: Point = {}
    for point in points:
        for key, value in point.items():
            if key in merged:
                raise ValueError(f"sweep key {key!r} is set by two axes of one product/zip")
            merged[key] = value
    return merged


def product(*axes: Any) -> list[Point]:
    """Every combination of the axes (the last axis varies fastest)."""
    return [_merge(combo) for combo in itertools.product(*_axes(axes))]


def zipit(*axes: Any) -> list[Point]:
    """The axes side by side: point i of each, merged (all axes must be equally long)."""
    axes_ = _axes(axes)
    lengths = {len(axis) for axis in axes_}
    if len(lengths) > 1:
        raise ValueError(f"zipit needs axes of one length, got lengths {sorted(lengths)}")
    return [_merge(points) for points in zip(*axes_)]


def chain(*axes: Any) -> list[Point]:
    """The points of each axis one after another (e.g. two separate small grids)."""
    return [point for axis in _axes(axes) for point in axis]
