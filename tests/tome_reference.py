"""PyTorch reference of the official ToMe forward pass on a timm DeiT, for parity tests.

Follows facebookresearch/ToMe (commit af95e4b): ``tome/merge.py`` (bipartite_soft_matching,
merge_wavg, merge_source), ``tome/patch/timm.py`` (ToMeBlock, ToMeAttention) and
``tome/utils.py`` (parse_r), re-implemented here rather than patched into the model. Per block:

* ``x_attn, k_mean = attn(norm1(x), size if prop_attn else None)``; logits are
  ``q @ k^T * scale`` and proportional attention then adds ``log(size_j)`` (after the scaling);
  the metric is the keys (after the qkv projection, unscaled) averaged over the heads.
  ``x = x + x_attn``.
* ``r_l = parse_r(L, r)[l]``, clamped to ``(N - protected) // 2`` (protected = CLS [+ DIST]).
  If ``r_l > 0``: L2-normalise the metric, A = tokens 0::2 (holds CLS), B = tokens 1::2
  (holds DIST when distilled); score A @ B^T with the CLS row (and the DIST column) at -inf;
  each A token's best B match; the ``r_l`` A tokens with the highest best-score merge into
  their match (size-weighted average, sizes add; source rows are OR-ed). Output order:
  ``[A kept (ascending), B (original order)]``, and with a DIST token
  ``[CLS, DIST, A kept[1:], B[1:]]``.
* ``x = x + mlp(norm2(x))``. Sizes (and sources) start as None, i.e. all ones (identity),
  and only exist from the first block that merges; attention before it has no size bias.

Deliberate differences from the official code:

* The official ``argsort(descending=True)`` is not stable; here the edge order uses
  ``torch.sort(stable=True, descending=True)`` (ties go to the lower A index). Ties have
  measure zero with real data; only the CLS row (-inf) ties when distilled, and it never merges.
* ``source`` is returned as the identity when no block merged (the official leaves it None),
  and ``size`` is returned as ``[B, N]`` (the official keeps ``[B, N, 1]``).
* Only plain DeiT-style models are accepted (no layer scale, qk-norm, gates, registers, ...);
  the official patch silently skips such modules, this reference refuses them instead.
"""

from __future__ import annotations

import math

from timm_reference import deit_logits, deit_tokens, timm_attention

# torch is imported inside the functions, so importing this module never needs torch (tests
# call tests/timm_reference.import_timm() first, which skips where torch/timm are absent).


def parse_r(num_layers, r):
    """Per-layer merge counts, as the official ``tome.utils.parse_r``.

    ``r`` is an int (the same r every layer), a tuple ``(r, inflect)`` with inflect in [-1, 1]
    (-1: decreasing schedule, 0: constant, +1: increasing), or a list (padded with zeros to
    ``num_layers``; a longer list is returned whole).
    """
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    inflect = 0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1)  # num_layers == 1 divides by zero, as the official
    return [int(lo + step * i) for i in range(num_layers)]


def _is_identity(module):
    import torch

    return module is None or isinstance(module, torch.nn.Identity)


def _check_plain_deit(model):
    assert getattr(model, "reg_token", None) is None, "register tokens are not supported"
    assert not getattr(model, "no_embed_class", False) and not getattr(model, "dynamic_img_size", False)
    assert getattr(model, "global_pool", "token") == "token" and _is_identity(model.fc_norm)
    assert _is_identity(model.norm_pre) and _is_identity(getattr(model, "patch_drop", None))
    for blk in model.blocks:
        for name in ("ls1", "ls2"):
            assert _is_identity(getattr(blk, name, None)), f"{name} (layer scale) is not supported"
        a = blk.attn
        for name in ("q_norm", "k_norm", "norm"):
            assert _is_identity(getattr(a, name, None)), f"attn.{name} is not supported"
        assert getattr(a, "gate", None) is None, "gated attention is not supported"


def _match(metric, r, distill):
    """Bipartite soft matching (CLS protected). Returns (kept A idx, merged A idx, their B idx)."""
    import torch

    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
    scores[:, 0, :] = -math.inf  # CLS (A[0]) never merges
    if distill:
        scores[:, :, 0] = -math.inf  # nothing merges into DIST (B[0])
    best, best_b = scores.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    kept = order[:, r:].sort(dim=-1).values  # ascending: CLS stays first
    return kept, src, best_b.gather(1, src)


def _merge(x, kept, src, dst, distill, reduce):
    """Apply a matching to x [B, N, C] (reduce 'sum' or 'amax' into B, self included)."""
    import torch

    c = x.shape[-1]
    a, bset = x[:, 0::2], x[:, 1::2]
    a_kept = a.gather(1, kept[..., None].expand(-1, -1, c))
    a_src = a.gather(1, src[..., None].expand(-1, -1, c))
    bset = bset.scatter_reduce(1, dst[..., None].expand(-1, -1, c), a_src, reduce=reduce)
    if distill:
        return torch.cat([a_kept[:, :1], bset[:, :1], a_kept[:, 1:], bset[:, 1:]], dim=1)
    return torch.cat([a_kept, bset], dim=1)


def tome_forward(model, images_nchw, r=8, prop_attn=True, return_info=False):
    """logits [B, classes] (eval mode, torch.no_grad) of timm DeiT `model` run the ToMe way.

    ``r``: anything ``parse_r`` accepts. With return_info=True also returns a dict: 'counts'
    (tokens after each block, incl. prefix), 'size' (final sizes [B, N_final]), 'source' (final
    [B, N_final, N_initial] 0/1 source matrix as official trace_source=True).
    """
    from saitjax.convert.timm_import import import_timm

    torch, _ = import_timm()
    _check_plain_deit(model)
    distill = getattr(model, "dist_token", None) is not None
    assert model.cls_token is not None, "ToMe's timm patch assumes a class token here"
    model.eval()
    with torch.no_grad():
        x = deit_tokens(model, images_nchw)
        b = x.shape[0]
        n0 = x.shape[1]
        protected = 1 + int(distill)

        size = None  # [B, N] once a block merged
        source = None  # [B, N, N0] once a block merged
        counts = []
        for blk, r_l in zip(model.blocks, parse_r(len(model.blocks), r)):
            x_attn, _, _, keys = timm_attention(blk.attn, blk.norm1(x), size if prop_attn else None)
            metric = keys.mean(dim=1)
            x = x + x_attn
            r_l = min(r_l, (x.shape[1] - protected) // 2)
            if r_l > 0:
                kept, src, dst = _match(metric, r_l, distill)
                if source is None:
                    source = torch.eye(n0, dtype=x.dtype).expand(b, n0, n0)
                source = _merge(source, kept, src, dst, distill, "amax")
                w = torch.ones_like(x[..., :1]) if size is None else size[..., None]
                x = _merge(x * w, kept, src, dst, distill, "sum")
                w = _merge(w, kept, src, dst, distill, "sum")
                x, size = x / w, w[..., 0]
            x = x + blk.mlp(blk.norm2(x))
            counts.append(x.shape[1])

        logits = deit_logits(model, x)

    if not return_info:
        return logits
    if size is None:
        size = torch.ones(b, n0, dtype=x.dtype)
        source = torch.eye(n0, dtype=x.dtype).expand(b, n0, n0)
    return logits, {"counts": counts, "size": size, "source": source}
