"""Static-shape token operations shared by every sparsification method.

Pure JAX (and NumPy for static index tables), no Flax. Every size that reaches XLA is a Python int (``k``, ``capacity``) or a
padded capacity with a validity mask, so a change of density changes which compiled function
runs, never the shapes inside one.

Layout conventions: tokens are ``[B, N, C]``; scores, masks and indices are ``[B, N]``;
attention logits are ``[B, H, N, N]``. "Patch" tokens exclude the prefix tokens (CLS, and the
distillation token of distilled DeiT), which are never pruned.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_MAX_EXPONENT = 60.0  # exp(60) ~ 1e26: finite in float32 even when summed over many keys


# ----------------------------------------------------------------------------------------------
# Fixed-k selection
# ----------------------------------------------------------------------------------------------


def topk_indices(scores: Array, k: int) -> Array:
    """Indices ``[B, k]`` of the ``k`` largest scores per row, in descending score order."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be a Python int known at trace time, got {type(k).__name__}")
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must lie in [1, {scores.shape[-1]}] (the number of scored tokens)")
    _, idx = jax.lax.top_k(scores, k)
    return idx


def batched_gather(x: Array, idx: Array) -> Array:
    """Gather along axis 1 per batch row: ``x[b, idx[b, i], ...]``. Works for ``[B, N]`` and ``[B, N, C]``."""
    expanded = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, expanded, axis=1)


def scatter_to_grid(values: Array, idx: Array, num_patches: int, fill: float = 0.0) -> Array:
    """Put per-token ``values [B, k, ...]`` back at their original patch positions.

    Returns ``[B, num_patches, ...]`` holding ``fill`` where no token was scattered. Used to draw
    kept-token maps and to recover a full feature map after pruning.
    """
    batch = values.shape[0]
    out = jnp.full((batch, num_patches) + values.shape[2:], fill, dtype=values.dtype)
    rows = jnp.arange(batch)[:, None]
    # Indices >= num_patches (e.g. EViT's fused token, which stands for no single patch) are dropped.
    return out.at[rows, idx].set(values, mode="drop")


def indices_to_mask(idx: Array, num_patches: int, valid: Array | None = None) -> Array:
    """0/1 float mask ``[B, num_patches]`` with ones at ``idx`` (only where ``valid``, if given)."""
    ones = jnp.ones(idx.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    return scatter_to_grid(ones, idx, num_patches, 0.0)


def select_tokens(x: Array, idx: Array, num_prefix: int) -> Array:
    """Keep the prefix tokens and the patch tokens at ``idx``: ``[B, num_prefix + k, ...]``."""
    kept = batched_gather(x[:, num_prefix:], idx)
    return jnp.concatenate([x[:, :num_prefix], kept], axis=1)


# ----------------------------------------------------------------------------------------------
# Where each original patch lives: position maps
# ----------------------------------------------------------------------------------------------


def positions_after_gather(idx: Array, num_tokens: int, num_prefix: int) -> Array:
    """``old_to_new [B, num_tokens]`` of :func:`select_tokens`: the new position of every old
    token (prefix included), ``-1`` for the tokens it drops."""
    batch, k = idx.shape
    prefix = jnp.broadcast_to(jnp.arange(num_prefix, dtype=jnp.int32), (batch, num_prefix))
    new = jnp.broadcast_to(jnp.arange(num_prefix, num_prefix + k, dtype=jnp.int32), (batch, k))
    patches = scatter_to_grid(new, idx, num_tokens - num_prefix, fill=-1)
    return jnp.concatenate([prefix, patches], axis=1)


def relabel_source(source: Array, old_to_new: Array) -> Array:
    """Follow a reduction: ``source [B, N_p]`` (position of the token holding each original
    patch, ``-1`` = discarded) through ``old_to_new [B, N_old]``."""
    mapped = jnp.take_along_axis(old_to_new, jnp.maximum(source, 0), axis=1)
    return jnp.where(source >= 0, mapped, -1)


# ----------------------------------------------------------------------------------------------
# Keep-mask attention
# ----------------------------------------------------------------------------------------------


def visible_keys(keep: Array) -> Array:
    """Visibility ``G[b, i, j] = keep[b, j] + (1 - keep[b, j]) * [i == j]`` as ``[B, 1, N, N]``.

    A pruned key is invisible to every other query, but each token still sees itself, so no row
    of the attention matrix is ever empty (pruned rows stay well defined).
    """
    n = keep.shape[-1]
    eye = jnp.eye(n, dtype=keep.dtype)
    g = keep[:, None, :] + (1.0 - keep[:, None, :]) * eye[None]
    return g[:, None]


def masked_softmax(logits: Array, keep: Array | None, eps: float = 0.0) -> Array:
    """Softmax over keys where pruned keys are invisible (see :func:`visible_keys`).

    Multiplicative form ``G * exp(S - m) / sum(G * exp(S - m))`` so gradients flow into a
    straight-through ``keep`` (DynamicViT's predictors learn through this path). ``m`` is the
    maximum over visible keys only, so masked logits can never underflow the visible ones; for a
    0/1 ``keep`` the result equals a softmax restricted to the visible keys. ``eps > 0`` adds
    DynamicViT's smoothing ``(E + eps/N) / (sum E + eps)``. Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    if keep is None:
        return jax.nn.softmax(logits, axis=-1)
    g = visible_keys(keep.astype(jnp.float32))
    m = jnp.max(jnp.where(g > 0, logits, -jnp.inf), axis=-1, keepdims=True)
    # Invisible keys may exceed m; clipping their exponent keeps exp finite (inf * 0 = nan) while
    # leaving every visible entry, and the gradient w.r.t. keep in all sane cases, exact.
    e = jnp.exp(jnp.minimum(logits - jax.lax.stop_gradient(m), _MAX_EXPONENT)) * g
    n = logits.shape[-1]
    return (e + eps / n) / (jnp.sum(e, axis=-1, keepdims=True) + eps)


def head_importance(head_outputs: Array) -> Array:
    """AS-ViT's token-level head importance ``[B, H, N]`` from per-head outputs ``[B, H, N, d]``.

    ``I[h, j] = |O^h_j| / (sum_h' |O^h'_j| + 1e-8)``: how much of token ``j``'s attention output
    comes from head ``h``. Weighting CLS attention by it discounts heads that carry little signal.
    """
    norms = jnp.linalg.norm(head_outputs.astype(jnp.float32), axis=-1)
    return norms / (jnp.sum(norms, axis=1, keepdims=True) + 1e-8)


# ----------------------------------------------------------------------------------------------
# Straight-through estimators
# ----------------------------------------------------------------------------------------------


def straight_through(hard: Array, soft: Array) -> Array:
    """Forward value ``hard``, gradient of ``soft``."""
    return soft + jax.lax.stop_gradient(hard - soft)


def gumbel_softmax_hard(rng: Array, logits: Array, tau: float = 1.0) -> Array:
    """Hard Gumbel-softmax over the last axis with straight-through gradients (DynamicViT)."""
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits.astype(jnp.float32) + gumbel) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return straight_through(hard, soft)


def sigmoid_threshold_hard(scores: Array, threshold: Array | float, tau: float = 1e-4) -> Array:
    """Hard ``[scores > threshold]`` with the gradient of ``sigmoid((s - t) / tau)`` (AS-ViT)."""
    soft = jax.nn.sigmoid((scores.astype(jnp.float32) - threshold) / tau)
    hard = (soft > 0.5).astype(soft.dtype)
    return straight_through(hard, soft)


# ----------------------------------------------------------------------------------------------
# Per-image adaptive counts: rules, capacities and buckets
# ----------------------------------------------------------------------------------------------


def mass_keep_counts(scores: Array, mass: float) -> Array:
    """Per-row size of the smallest top-scored set whose score sum reaches ``mass`` of the total.

    ``scores [B, N]`` are non-negative (e.g. CLS attention) and are renormalised per row.
    ``mass >= 1`` keeps all ``N`` tokens by definition: the dense model.
    """
    if mass >= 1.0:
        return jnp.full(scores.shape[:1], scores.shape[-1], jnp.int32)
    probs = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-12)
    sorted_desc = -jnp.sort(-probs, axis=-1)
    before = jnp.cumsum(sorted_desc, axis=-1) - sorted_desc  # mass of the tokens ranked above
    # a token is needed while the mass before it is still short of the target
    return jnp.sum(before < mass, axis=-1).astype(jnp.int32)


def value_keep_counts(scores: Array, threshold: float, alive: Array | None = None) -> Array:
    """Per-row number of tokens whose renormalised score is at least ``threshold / N``.

    ``alive [B, N]`` (0/1, optional) restricts the rule to the tokens still kept: ``N`` is then
    each row's number of alive tokens and only alive tokens are counted.
    """
    if alive is None:
        alive = jnp.ones(scores.shape, jnp.float32)
    alive = alive.astype(jnp.float32)
    probs = scores * alive
    probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-12)
    n = jnp.maximum(jnp.sum(alive, axis=-1, keepdims=True), 1.0)
    return jnp.sum((probs >= threshold / n) & (alive > 0), axis=-1).astype(jnp.int32)


def capacity_select(scores: Array, counts: Array, capacity: int) -> tuple[Array, Array]:
    """Top-``capacity`` indices per row plus a validity mask ``rank < count`` (both ``[B, capacity]``).

    Static shape ``capacity`` with a per-image number of valid tokens: attention treats invalid
    slots as pruned keys, so each image behaves as if it kept exactly ``counts[b]`` tokens.
    """
    idx = topk_indices(scores, capacity)
    valid = jnp.arange(capacity)[None, :] < counts[:, None]
    return idx, valid


def choose_bucket(counts: Array, capacities: Sequence[int]) -> Array:
    """Index of the smallest capacity that holds the largest count in the batch (int32 scalar).

    ``capacities`` is increasing; counts above the last one map to the last bucket (it should be
    the full token count). Feed the result to ``jax.lax.switch``.
    """
    caps = jnp.asarray(capacities, jnp.int32)
    need = jnp.max(counts)
    return jnp.minimum(jnp.searchsorted(caps, need, side="left"), len(capacities) - 1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# In-block reduction: EViT fusion and ToMe merging
# ----------------------------------------------------------------------------------------------


def fuse_inattentive(patches: Array, weights: Array, keep_idx: Array) -> Array:
    """EViT's fused token ``sum_{j dropped} a_j x_j`` as ``[B, 1, C]``.

    ``weights [B, N]`` are the raw class-attention values (not renormalised, as in EViT). Computed
    as the full weighted sum minus the kept part, so no complement gather is needed.
    """
    w = weights.astype(patches.dtype)
    total = jnp.einsum("bn,bnc->bc", w, patches)
    kept = jnp.einsum("bk,bkc->bc", batched_gather(w, keep_idx), batched_gather(patches, keep_idx))
    return (total - kept)[:, None, :]


class MergePlan(NamedTuple):
    """ToMe's bipartite matching of one block (all ``int32``, static shapes).

    Tokens at even positions form set A (CLS is A's first), odd positions set B. ``src [B, r]``:
    the A tokens merged away; ``dst [B, r]``: the B token each of them joins; ``unmerged
    [B, |A| - r]``: the A tokens that stay, in ascending A order.
    """

    src: Array
    dst: Array
    unmerged: Array


def bipartite_soft_matching(metric: Array, r: int, num_prefix: int) -> MergePlan:
    """Pick the ``r`` A->B merges with the most similar keys (ToMe, Bolya et al. 2023).

    ``metric [B, N, d]``: the block's keys averaged over heads. Cosine similarity of every A token
    to every B token; each A token proposes its best B partner and the ``r`` best proposals merge.
    CLS (A's first token) never merges, and with a distillation token (B's first) nothing merges
    into it. The ranking uses a stable descending sort (ties go to the lower A index). No
    gradient flows through the matching, as in the official code.
    """
    if not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative Python int, got {r!r}")
    metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ jnp.swapaxes(b, -1, -2)  # [B, |A|, |B|]
    scores = scores.at[:, 0, :].set(-jnp.inf)
    if num_prefix > 1:
        scores = scores.at[:, :, 0].set(-jnp.inf)
    node_max = jnp.max(scores, axis=-1)
    node_idx = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    order = jnp.argsort(-node_max, axis=-1, stable=True).astype(jnp.int32)
    src = order[:, :r]
    return MergePlan(src=src, dst=batched_gather(node_idx, src), unmerged=jnp.sort(order[:, r:], axis=-1))


def merge_order(plan: MergePlan, num_tokens: int, num_prefix: int) -> tuple[Array, Array]:
    """``(kept_old, old_to_new)`` of a merge: the old position of each output token ``[B, N - r]``
    and the new position of every old token ``[B, N]`` (a merged A token maps to its B partner).

    ToMe's output order is ``[unmerged A (ascending), B (original order)]``; with a distillation
    token ``[CLS, dist, rest of unmerged A, rest of B]``. The next block splits by position, so
    this order decides later matches.
    """
    batch = plan.src.shape[0]
    num_b = num_tokens // 2
    a_pos = 2 * plan.unmerged
    b_pos = jnp.broadcast_to(2 * jnp.arange(num_b, dtype=jnp.int32) + 1, (batch, num_b))
    if num_prefix > 1:
        kept_old = jnp.concatenate([a_pos[:, :1], b_pos[:, :1], a_pos[:, 1:], b_pos[:, 1:]], axis=1)
    else:
        kept_old = jnp.concatenate([a_pos, b_pos], axis=1)
    n_new = kept_old.shape[1]
    rows = jnp.arange(batch)[:, None]
    new = jnp.broadcast_to(jnp.arange(n_new, dtype=jnp.int32), (batch, n_new))
    old_to_new = jnp.full((batch, num_tokens), -1, jnp.int32).at[rows, kept_old].set(new)
    partner = jnp.take_along_axis(old_to_new, 2 * plan.dst + 1, axis=1)
    return kept_old, old_to_new.at[rows, 2 * plan.src].set(partner)


def merge_weighted(x: Array, size: Array, plan: MergePlan, kept_old: Array) -> tuple[Array, Array]:
    """Size-weighted average merge: ``x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a)``.

    ``x [B, N, C]``, ``size [B, N]``. The scatter-add into B is a one-hot contraction, which is
    deterministic on every backend (a GPU scatter-add is not). Returns ``(x [B, N - r, C],
    size [B, N - r])`` in the order of ``kept_old``.
    """
    size = size.astype(jnp.float32)
    weighted = x.astype(jnp.float32) * size[..., None]
    xa, xb = weighted[:, 0::2], weighted[:, 1::2]
    sa, sb = size[:, 0::2], size[:, 1::2]
    onehot = jax.nn.one_hot(plan.dst, xb.shape[1], dtype=jnp.float32)  # [B, r, |B|]
    xb = xb + jnp.einsum("brn,brc->bnc", onehot, batched_gather(xa, plan.src))
    sb = sb + jnp.einsum("brn,br->bn", onehot, batched_gather(sa, plan.src))
    # Reassemble the full sequence and pick the survivors in output order.
    full_x = jnp.zeros(weighted.shape, jnp.float32).at[:, 0::2].set(xa).at[:, 1::2].set(xb)
    full_s = jnp.zeros(size.shape, jnp.float32).at[:, 0::2].set(sa).at[:, 1::2].set(sb)
    new_size = batched_gather(full_s, kept_old)
    new_x = batched_gather(full_x, kept_old) / new_size[..., None]
    return new_x.astype(x.dtype), new_size


# ----------------------------------------------------------------------------------------------
# Token replacement: semantic tokens (STViT)
# ----------------------------------------------------------------------------------------------


def adaptive_pool_bins(size_in: int, size_out: int) -> tuple[tuple[int, int], ...]:
    """PyTorch's adaptive-pooling bins ``[floor(i*in/out), ceil((i+1)*in/out))``.

    They overlap when ``out`` does not divide ``in`` (14 -> 4: [0,4), [3,7), [7,11), [10,14)),
    which ``jax.image.resize`` or a strided pool would not reproduce.
    """
    if not 0 < size_out <= size_in:
        raise ValueError(f"cannot pool {size_in} positions into {size_out} bins (need 0 < out <= in)")
    return tuple(((i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)) for i in range(size_out))


def adaptive_max_pool(grid: Array, out_h: int, out_w: int) -> Array:
    """``F.adaptive_max_pool2d`` on an NHWC map ``[B, H, W, C] -> [B, out_h, out_w, C]``.

    Static slices, rows then columns (the maximum over a rectangle is separable).
    """
    rows = jnp.stack([jnp.max(grid[:, a:b], axis=1) for a, b in adaptive_pool_bins(grid.shape[1], out_h)], axis=1)
    return jnp.stack([jnp.max(rows[:, :, a:b], axis=2) for a, b in adaptive_pool_bins(grid.shape[2], out_w)], axis=2)


# ----------------------------------------------------------------------------------------------
# Windows (Swin and the models built on it): partition/reverse, relative positions, shift masks
# ----------------------------------------------------------------------------------------------
# Windows are numbered row-major over the map and tokens row-major inside a window, as in timm
# and the official Swin code; that order makes the masks and relative-position tables of
# converted checkpoints line up. Indices and masks are NumPy at trace time: XLA sees constants.

# Logit added between tokens of different regions of a shifted window: -100, not -inf, exactly as
# timm and the official code (a float32 softmax then gives those pairs ~e-44, not an exact zero).
MASK_FILL = -100.0


def effective_window(resolution: int, window: int, shift: int) -> tuple[int, int]:
    """``(window, shift)`` actually used on a ``resolution x resolution`` map.

    A window covering the whole map shrinks to it and is never shifted (the rule of the official
    code and timm): Swin-T's last stage at 7x7 runs plain attention over all 49 tokens.
    """
    if resolution <= window:
        return resolution, 0
    return window, shift


def window_partition(x: Array, window: int) -> Array:
    """``[B, H, W, C]`` -> ``[B, num_windows, window, window, C]``, windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window, window, c)


def window_reverse(windows: Array, height: int, width: int) -> Array:
    """Inverse of :func:`window_partition`: ``[B, num_windows, w, w, C]`` -> ``[B, H, W, C]``."""
    b, _, window, _, c = windows.shape
    x = windows.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def relative_position_index(window: int) -> np.ndarray:
    """``[w*w, w*w]`` int32: row of the ``(2w-1)^2``-entry bias table for each query/key pair.

    The pair's offset ``(dy, dx)``, each shifted into ``0..2w-2``, flattened as ``dy * (2w-1) + dx``.
    """
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, N, N], each in 0..2w-2
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray | None:
    """``[num_windows, w*w, w*w]`` additive mask of shifted-window attention (``None``: no shift).

    After the cyclic shift by ``-shift`` a window at the bottom/right edge holds tokens from
    opposite sides of the map. The map is cut into 3x3 regions (``[0, R-w)``, ``[R-w, R-s)``,
    ``[R-s, R)`` per axis); pairs from different regions get :data:`MASK_FILL`.
    """
    if shift == 0:
        return None
    region = np.zeros((resolution, resolution), np.float32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            region[rows, cols] = label
            label += 1
    labels = np.asarray(window_partition(region[None, :, :, None], window)).reshape(-1, window * window)
    different = labels[:, None, :] != labels[:, :, None]
    return np.where(different, MASK_FILL, 0.0).astype(np.float32)


def cyclic_shift(x: Array, shift: int) -> Array:
    """Roll a ``[B, H, W, C]`` map by ``shift`` along H and W (``torch.roll`` semantics)."""
    return x if shift == 0 else jnp.roll(x, (shift, shift), axis=(1, 2))
