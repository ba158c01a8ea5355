"""The optimizer factory every training config uses: AdamW, a warm-up + decay schedule (optax's
schedules), and parameter groups selected by regexes over "/"-joined parameter paths.

    cfg = OptimizerConfig(lr=scaled_lr(5e-4, 1024), total_steps=300 * steps_per_epoch,
                          warmup_steps=5 * steps_per_epoch, grad_clip_norm=None,
                          lr_multipliers=((r"^(?!predictor)", 0.01),))
    tx, schedule = make_optimizer(cfg, params)

Groups follow the DeiT / timm conventions: no weight decay on biases, LayerNorm scales and
cls/dist tokens / position embeddings; ``lr_multipliers`` scale the whole update of a group
(weight decay included, as timm's ``lr_scale`` param groups do); ``frozen`` params get a zero
update and keep no Adam state; ``frozen_until_step`` zeroes the update of a group for the first
steps (DynamicViT trains its predictors on a fixed backbone first). Every user-given regex must
match some parameter, so that a misspelt group name fails loudly instead of doing nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

DECAYS = ("cosine", "linear", "constant")
DEFAULT_NO_WEIGHT_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)(cls_token|dist_token|pos_embed)$",
                           r"(^|/)keep_threshold$", r"(^|/)semantic_init/embedding$",
                           r"(^|/)relative_position_bias_table$")


def make_schedule(*, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                  warmup_init_lr: float = 0.0, decay: str = "cosine") -> optax.Schedule:
    """Linear warm-up ``warmup_init_lr -> base_lr`` over ``warmup_steps``, then a decay that
    reaches ``min_lr`` at ``total_steps`` and stays there: optax's schedules, joined, with the
    argument checks they leave out (jittable: no host sync)."""
    if not isinstance(total_steps, numbers.Integral) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed "
                         f"total_steps ({total_steps})")
    lrs = (("base_lr", base_lr), ("min_lr", min_lr), ("warmup_init_lr", warmup_init_lr))
    for name, value in lrs:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed base_lr ({base_lr})")
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAYS}")

    base, low, init = float(base_lr), float(min_lr), float(warmup_init_lr)
    decay_steps = total_steps - warmup_steps
    if decay == "constant":
        after = optax.constant_schedule(base)
    elif decay_steps == 0 or base == 0.0:  # nothing left to decay over, or nothing to decay
        after = optax.constant_schedule(low)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(base, decay_steps, alpha=low / base)
    else:
        after = optax.linear_schedule(base, low, decay_steps)
    if warmup_steps > 0:
        after = optax.join_schedules([optax.linear_schedule(init, base, warmup_steps), after],
                                     boundaries=[warmup_steps])
    return lambda count: jnp.asarray(after(count), jnp.float32)


def scaled_lr(lr_per_512: float, global_batch_size: int, reference_batch: int = 512) -> float:
    """DeiT's linear scaling rule, so that configs state one lr for any batch size."""
    if global_batch_size <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got global_batch_size="
                         f"{global_batch_size}, reference_batch={reference_batch}")
    return lr_per_512 * global_batch_size / reference_batch


def _as_pairs(value: Any, name: str) -> tuple:
    # YAML/JSON configs give lists or dicts; the frozen dataclass must stay hashable.
    items = value.items() if isinstance(value, Mapping) else value
    pairs = tuple(tuple(item) for item in items)
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"{name} entries must be (regex, value) pairs, got {pair!r}")
    return pairs


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything that defines the optimizer; hashable, so it can live in a static config."""

    lr: float                      # peak lr (already scaled)
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 1e-6
    warmup_init_lr: float = 0.0
    decay: str = "cosine"
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = None      # global-norm clipping (None/0 = off)
    no_weight_decay: tuple[str, ...] = DEFAULT_NO_WEIGHT_DECAY
    frozen: tuple[str, ...] = ()             # regexes: these params get zero updates
    lr_multipliers: tuple[tuple[str, float], ...] = ()   # (regex, multiplier); first match wins
    frozen_until_step: tuple[tuple[str, int], ...] = ()  # (regex, step): zero update before step

    def __post_init__(self) -> None:
        # Normalise list/dict values from YAML configs to tuples (frozen dataclass: bypass).
        normalised = {name: (v,) if isinstance(v := getattr(self, name), str) else tuple(v)
                      for name in ("no_weight_decay", "frozen")}
        normalised["lr_multipliers"] = tuple(
            (r, float(m)) for r, m in _as_pairs(self.lr_multipliers, "lr_multipliers"))
        normalised["frozen_until_step"] = _as_pairs(self.frozen_until_step, "frozen_until_step")
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        # Reuse the schedule's own checks (steps, min_lr, warm-up lr, decay name).
        make_schedule(base_lr=self.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                      min_lr=self.min_lr, warmup_init_lr=self.warmup_init_lr, decay=self.decay)
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm >= 0:
            raise ValueError("grad_clip_norm must be None, 0 (off) or > 0, "
                             f"got {self.grad_clip_norm!r}")
        for regex, mult in self.lr_multipliers:
            if not mult >= 0 or not math.isfinite(mult):
                raise ValueError(f"lr multiplier for {regex!r} must be finite and >= 0, "
                                 f"got {mult!r}")
        for regex, step in self.frozen_until_step:
            if not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"frozen_until_step for {regex!r} must be an int >= 0, "
                                 f"got {step!r}")
        for regex in self._all_regexes():
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"invalid regex {regex!r} in OptimizerConfig: {err}") from None

    def _all_regexes(self) -> list[str]:
        return (list(self.no_weight_decay) + list(self.frozen)
                + [r for r, _ in self.lr_multipliers] + [r for r, _ in self.frozen_until_step])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(path: tuple) -> str:
    """``(DictKey('blocks_0'), DictKey('attn'), ...)`` -> ``'blocks_0/attn/...'``."""
    return "/".join(_key_name(k) for k in path)


def _map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), tree)


def _first_match(pairs: tuple, path: str, default: Any) -> Any:
    for regex, value in pairs:
        if re.search(regex, path):
            return value
    return default


def _check_regexes_match(config: OptimizerConfig, params: Any) -> list[str]:
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    user = (list(config.frozen) + [r for r, _ in config.lr_multipliers]
            + [r for r, _ in config.frozen_until_step])
    for regex in user:
        if not any(re.search(regex, p) for p in paths):
            shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise ValueError(f"regex {regex!r} in OptimizerConfig matches no parameter "
                             f"({len(paths)} params, e.g. {shown})")
    return paths


class _CountState(NamedTuple):
    count: jax.Array


def _scale_by_group(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiply each leaf's update by a constant chosen from its path (timm's ``lr_scale``)."""

    def update(updates, state, params=None):
        del params
        def scale(p, u):
            m = multiplier(param_path(p))
            return u if m == 1.0 else u * jnp.asarray(m, u.dtype)

        scaled = jax.tree_util.tree_map_with_path(scale, updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _freeze_until(threshold: Callable[[str], int]) -> optax.GradientTransformation:
    """Zero each leaf's update while the optimizer's own step count is below its threshold."""

    def init(params):
        del params
        return _CountState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params

        def gate(p, u):
            until = threshold(param_path(p))
            return u if until <= 0 else jnp.where(state.count >= until, u, jnp.zeros_like(u))

        gated = jax.tree_util.tree_map_with_path(gate, updates)
        return gated, _CountState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimizerConfig,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the config's schedule and parameter groups; returns ``(tx, schedule)``.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``s) is only used to check that every
    user-given regex selects something; groups are recomputed from paths when traced.
    """
    _check_regexes_match(config, params)
    schedule = make_schedule(base_lr=config.lr, total_steps=config.total_steps,
                             warmup_steps=config.warmup_steps, min_lr=config.min_lr,
                             warmup_init_lr=config.warmup_init_lr, decay=config.decay)
    no_decay = tuple((r, False) for r in config.no_weight_decay)

    trainable: list[optax.GradientTransformation] = []
    if config.grad_clip_norm:  # inside the trainable branch: frozen grads don't count
        trainable.append(optax.clip_by_global_norm(config.grad_clip_norm))
    trainable.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    if config.weight_decay > 0:
        trainable.append(optax.add_decayed_weights(
            config.weight_decay, mask=lambda tree: _map_paths(
                lambda path: _first_match(no_decay, path, True), tree)))
    trainable.append(optax.scale_by_learning_rate(schedule))

    frozen = tuple((r, "frozen") for r in config.frozen)
    tx = optax.partition(
        {"train": optax.chain(*trainable), "frozen": optax.set_to_zero()},
        lambda tree: _map_paths(lambda path: _first_match(frozen, path, "train"), tree))
    stages = [tx]
    if config.lr_multipliers:
        mults = config.lr_multipliers
        stages.append(_scale_by_group(lambda path: _first_match(mults, path, 1.0)))
    if config.frozen_until_step:
        untils = config.frozen_until_step
        stages.append(_freeze_until(lambda path: _first_match(untils, path, 0)))
    return (optax.chain(*stages) if len(stages) > 1 else tx), schedule


def param_groups_summary(config: OptimizerConfig, params: Any) -> str:
    """A few lines for the training log: what is frozen, decayed and scaled, in params/tensors."""
    _check_regexes_match(config, params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    groups: dict[str, list[int]] = {}

    def add(name: str, size: int) -> None:
        entry = groups.setdefault(name, [0, 0])
        entry[0] += size
        entry[1] += 1

    total = 0
    no_decay = tuple((r, False) for r in config.no_weight_decay)
    frozen = tuple((r, True) for r in config.frozen)
    for key_path, leaf in leaves:
        path, size = param_path(key_path), math.prod(getattr(leaf, "shape", ()))
        total += size
        if _first_match(frozen, path, False):
            add("frozen", size)
            continue
        decayed = config.weight_decay > 0 and _first_match(no_decay, path, True)
        add(f"weight decay {config.weight_decay:g}" if decayed else "no weight decay", size)
        mult = _first_match(config.lr_multipliers, path, 1.0)
        if mult != 1.0:
            add(f"lr x{mult:g}", size)
        until = _first_match(config.frozen_until_step, path, 0)
        if until > 0:
            add(f"frozen until step {until}", size)

    def fmt(n: int) -> str:
        return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)

    lines = [f"optimizer: AdamW lr={config.lr:g} ({config.decay}, warmup {config.warmup_steps}/"
             f"{config.total_steps} steps, min_lr={config.min_lr:g}), "
             f"clip={config.grad_clip_norm or 'off'}",
             f"  params: {fmt(total)} in {len(leaves)} tensors"]
    order = ["frozen", f"weight decay {config.weight_decay:g}", "no weight decay"]
    for name in order + sorted(k for k in groups if k not in order):
        if name in groups:
            size, count = groups[name]
            lines.append(f"  {name}: {fmt(size)} in {count} tensors")
    return "\n".join(lines)


__all__ = ["make_schedule", "scaled_lr", "OptimizerConfig", "make_optimizer",
           "param_groups_summary", "param_path", "DEFAULT_NO_WEIGHT_DECAY"]
