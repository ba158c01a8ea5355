"""Dynamic spatial sparsification: every location of a map takes a slow or a fast path.

DynamicViT on hierarchical backbones (Rao et al., T-PAMI 2023; the official ``dyswin.py`` and
``dyconvnext.py``) removes no location: the spatial mixing (window attention, depthwise conv) stays
dense, and after it each location runs either the block's own MLP (slow path) or ``LN -> Linear``
(fast path), chosen by a predictor. The pieces here are shared by every backbone:

* :class:`RoutedBlock` -- a mixin that turns a block with :meth:`token_mix`, :meth:`channel_mlp` and
  a ``fast_path`` into the three forwards the method needs (dense, routed, two-stream training);
* :func:`route_by_score` / :func:`apply_route` -- the inference split (static counts) and the
  point-wise evaluation on gathered locations (real savings) or under a mask (the check);
* :func:`run_routed_blocks` -- the stage loop: plain blocks, predictors, routed blocks.

Routes are static in size: ``k`` slow locations per image, a Python int from the spec.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from saitjax.models.core import precision, token_ops

Array = jax.Array


class Route(NamedTuple):
    """Which locations of a flattened map ``[B, N]`` take the slow path.

    Gathered: ``order`` is a permutation per image (the ``k`` slow locations first, by score) and
    ``inverse`` its inverse; the slow path runs on ``k`` rows, the fast path on ``N - k``. Masked:
    ``mask`` is 0/1 ``[B, N]`` (1 = slow) and both paths run on every location.
    """

    k: int
    order: Array | None = None
    inverse: Array | None = None
    mask: Array | None = None


def route_by_score(scores: Array, k: int, gather: bool = True) -> Route:
    """The ``k`` highest-scoring locations of each image take the slow path (official: argsort
    descending, ``idx[:, :k]`` slow, the rest fast). ``gather=False`` gives the same split as a mask."""
    n = scores.shape[-1]
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"slow-path count k={k!r} must be a Python int in [0, {n}]")
    order = jnp.argsort(-scores.astype(jnp.float32), axis=-1)
    if gather:
        return Route(k, order=order, inverse=jnp.argsort(order, axis=-1))
    return Route(k, mask=token_ops.indices_to_mask(order[:, :k], n))


def apply_route(u: Array, route: Route, slow: Callable[[Array], Array], fast: Callable[[Array], Array]) -> Array:
    """``slow`` at the route's slow locations of ``u [B, H, W, C]``, ``fast`` elsewhere; both are
    point-wise maps ``[B, M, C] -> [B, M, C]``. Gathered: each runs only on its own rows."""
    b, h, w, c = u.shape
    flat = u.reshape(b, h * w, c)
    if route.mask is not None:
        y = jnp.where(route.mask[..., None] > 0, slow(flat), fast(flat))
    else:
        ordered = token_ops.batched_gather(flat, route.order)
        parts = [slow(ordered[:, :route.k])] if route.k else []
        parts += [fast(ordered[:, route.k:])] if route.k < h * w else []
        y = token_ops.batched_gather(jnp.concatenate(parts, axis=1), route.inverse)
    return y.reshape(b, h, w, c)


def mix_streams(slow_x: Array, fast_x: Array, mask: Array) -> Array:
    """``M * S + (1 - M) * F`` with a ``[B, H, W]`` mask on ``[B, H, W, C]`` streams."""
    m = mask[..., None].astype(slow_x.dtype)
    return slow_x * m + fast_x * (1 - m)


class FastPath(nn.Module):
    """The cheap path: ``LN -> Linear(C, C)`` (times ``gamma`` if the backbone uses layer scale)."""

    eps: float
    ls_init_value: float | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        y = nn.LayerNorm(self.eps, dtype=self.dtype, name="norm")(x)
        y = precision.dense(c, self.dtype, "fc", kernel_init=nn.initializers.truncated_normal(0.02))(y)
        if self.ls_init_value is not None:
            y = y * self.param("gamma", nn.initializers.constant(self.ls_init_value), (c,)).astype(y.dtype)
        return y


class RoutedBlock:
    """Mixin for a block whose MLP half may be replaced by a fast path per location.

    The block (a ``setup`` module) provides ``token_mix(x, train)`` (the dense spatial half),
    ``channel_mlp(u, train)`` (the slow path), ``fast_path`` (a module) and ``drop_path``.
    ``residual_from_mixed`` says where the point-wise branch adds: Swin adds it to the attention
    output (``u``), ConvNeXt to the block input (``x``) -- which in training is each stream itself.
    """

    residual_from_mixed: ClassVar[bool]

    def routed(self, x: Array, route: Route, train: bool = False) -> Array:
        """Inference (or fixed-route training): slow path on the route's slow locations only."""
        u = self.token_mix(x, train)
        y = apply_route(u, route, lambda t: self.channel_mlp(t, train), self.fast_path)
        return (u if self.residual_from_mixed else x) + self.drop_path(y, train)

    def two_stream(self, slow_x: Array, fast_x: Array, mask: Array, train: bool = True) -> tuple[Array, Array]:
        """Training with a sampled mask ``[B, H, W]``: the slow stream ``S`` and the fast stream ``F``
        share one spatial mixing of ``M S + (1 - M) F``; each location of the slow path reads the
        mixed map where it is slow and its own stream elsewhere (and vice versa), so the
        straight-through mask carries gradient into the predictor (the official scheme)."""
        m = mask[..., None].astype(slow_x.dtype)
        u = self.token_mix(mix_streams(slow_x, fast_x, mask), train)
        slow_in = u * m + slow_x * (1 - m)
        fast_in = u * (1 - m) + fast_x * m
        slow_base, fast_base = (u, u) if self.residual_from_mixed else (slow_x, fast_x)
        return (slow_base + self.drop_path(self.channel_mlp(slow_in, train), train),
                fast_base + self.drop_path(self.fast_path(fast_in), train))


def run_routed_blocks(blocks: Sequence[Any], predictors: Sequence[Any], locations: Sequence[int],
                      counts: Sequence[int], x: Array, *, train: bool, mode: str,
                      gumbel: Callable[[Array], Array] | None = None) -> tuple[Array, dict[str, Any]]:
    """Run a stage's blocks with predictors before blocks ``locations`` (``counts[s]`` slow locations).

    Blocks before ``locations[0]`` are plain; every later block is a :class:`RoutedBlock` using the
    most recent route. Each predictor scores the whole current map (plain global mean; the masks of
    the stages are independent, not nested). ``mode``: ``gather`` (slow path on gathered locations),
    ``mask`` (both paths everywhere, selected), or ``sample`` (training: ``gumbel(log_probs)`` gives
    hard straight-through keep values ``[B, N]`` and the two streams run; merged at the end).

    Returns the map and ``keep_masks`` (0/1 slow masks ``[B, N]`` per stage), ``slow_indices``
    (gathered modes) and ``decisions`` (straight-through masks in ``sample`` mode, the hard masks
    otherwise).
    """
    first = locations[0]
    for block in blocks[:first]:
        x = block(x, train)
    b, h, w, c = x.shape
    masks, decisions, slow_indices = [], [], []
    streams = None
    mask = None
    route = None
    for j in range(first, len(blocks)):
        if j in locations:
            s = list(locations).index(j)
            current = x if streams is None else mix_streams(*streams, mask)
            logp = predictors[s](current.reshape(b, h * w, c), jnp.ones((b, h * w), jnp.float32))
            if mode == "sample":
                keep = gumbel(logp)[..., 0]
                decisions.append(keep)
                masks.append(jax.lax.stop_gradient(keep))
                mask = keep.reshape(b, h, w)
                streams = streams or (x, x)
            else:
                route = route_by_score(logp[..., 0], counts[s], gather=mode == "gather")
                hard = route.mask if route.mask is not None else token_ops.indices_to_mask(
                    route.order[:, :route.k], h * w)
                masks.append(hard)
                decisions.append(hard)
                if route.order is not None:
                    slow_indices.append(route.order[:, :route.k])
        if mode == "sample":
            streams = blocks[j].two_stream(*streams, mask, train)
        else:
            x = blocks[j].routed(x, route, train)
    if mode == "sample":
        x = mix_streams(*streams, mask)
    aux = {"keep_masks": tuple(masks), "decisions": tuple(decisions)}
    if slow_indices:
        aux["slow_indices"] = tuple(slow_indices)
    return x, aux
