"""Loss terms shared by the methods (pure jax.numpy, no Flax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def soft_cross_entropy(logits: Array, targets: Array, weights: Array | None = None) -> Array:
    """Mean cross-entropy against soft targets ``[B, K]`` (mixup/cutmix, label smoothing).

    ``weights [B]`` (e.g. the validity mask of a padded eval batch) weight the mean.
    """
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
    return weighted_mean(per_example, weights)


def kl_to_teacher(student_logits: Array, teacher_logits: Array, temperature: float = 1.0,
                  weights: Array | None = None) -> Array:
    """``KL(softmax(teacher/T) || softmax(student/T)) * T^2``, summed over classes, mean over batch.

    The teacher is held fixed (stop-gradient): it is a frozen copy outside the optimizer.
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t)
    per_example = jnp.sum(jnp.exp(log_p_t) * (log_p_t - jax.nn.log_softmax(s)), axis=-1)
    return weighted_mean(per_example, weights) * temperature ** 2


def weighted_mean(values: Array, weights: Array | None = None) -> Array:
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def correct_top1(logits: Array, labels: Array) -> Array:
    """``[B]`` 0/1 float: is the arg-max class the label?"""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def masked_kl(target: Array, scores: Array, alive: Array, eps: float = 1e-8) -> Array:
    """``KL(p || q)`` per row between two non-negative score maps restricted to ``alive`` tokens.

    Both ``target`` and ``scores`` (``[B, N]``) are renormalised over the alive tokens; ``eps``
    keeps the log finite where a score is exactly zero. Mean over the batch.
    """
    alive = alive.astype(jnp.float32)

    def normalise(x: Array) -> Array:
        x = x.astype(jnp.float32) * alive
        return x / jnp.maximum(jnp.sum(x, axis=-1, keepdims=True), eps)

    p, q = normalise(target), normalise(scores)
    return jnp.mean(jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)), axis=-1))
