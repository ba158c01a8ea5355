"""PyTorch reference of the official EViT forward pass on a timm DeiT, for parity tests.

Follows youweiliang/evit ``evit.py`` (``Attention.forward`` and ``Block.forward``), re-implemented
here on a timm DeiT rather than importing the official model. In each block of ``drop_loc``:

* ``x = x + attn(norm1(x))`` over all N current tokens;
* ``k = ceil(keep_rate * (N - 1))`` of the N - 1 non-CLS tokens are kept; when ``k == N - 1``
  the block is left alone (no fused token either);
* ``a = attn[:, :, 0, 1:].mean(heads)`` (post-softmax CLS attention); ``idx = topk(a, k,
  sorted=True)``, the kept tokens in descending ``a`` order;
* fusion: ``x_f = sum_{j not in idx} a_j x_j`` (raw weights), appended after the kept tokens;
* ``x = x + mlp(norm2(x))`` on ``[CLS, kept, (fused)]``.

Deliberate difference from the official code: with a distilled DeiT the official code scores
and may drop or fuse the distillation token (it sits at index 1, issue #15) and then reads the
distillation head from whatever token is at index 1. ``protect_dist=True`` (the saitjax
behaviour) keeps it beside CLS instead: patch tokens are ``x[:, 2:]`` and scores
``attn[:, :, 0, 2:]``. ``protect_dist=False`` reproduces the official behaviour.
"""

from __future__ import annotations

import math

from timm_reference import deit_logits, deit_tokens, timm_attention
from tome_reference import _check_plain_deit


def _fuse_step(x, probs, keep_rate, prefix, fuse_token):
    """The official in-block reduction on post-residual tokens x [B, N, C]; returns new x."""
    import torch

    n = x.shape[1] - prefix
    k = math.ceil(keep_rate * n)
    if k >= n:
        return x
    cls_attn = probs[:, :, 0, prefix:].mean(dim=1)  # [B, n]
    _, idx = torch.topk(cls_attn, k, dim=1, largest=True, sorted=True)
    c = x.shape[-1]
    patches = x[:, prefix:]
    kept = patches.gather(1, idx[..., None].expand(-1, -1, c))
    parts = [x[:, :prefix], kept]
    if fuse_token:
        dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
        weights = torch.where(dropped, cls_attn, torch.zeros_like(cls_attn))
        parts.append((patches * weights[..., None]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def evit_forward(model, images_nchw, keep_rate=0.7, drop_loc=(3, 6, 9), fuse_token=True,
                 protect_dist=True, return_counts=False):
    """logits [B, classes] (eval mode, no_grad) of timm DeiT ``model`` run the EViT way.

    With return_counts=True also returns the token count after each block (prefix included).
    """
    from saitjax.convert.timm_import import import_timm

    torch, _ = import_timm()
    _check_plain_deit(model)
    distill = getattr(model, "dist_token", None) is not None
    prefix = 1 + int(distill and protect_dist)
    model.eval()
    counts = []
    with torch.no_grad():
        x = deit_tokens(model, images_nchw)
        for i, blk in enumerate(model.blocks):
            x_attn, probs, _, _ = timm_attention(blk.attn, blk.norm1(x))
            x = x + x_attn
            if i in drop_loc:
                x = _fuse_step(x, probs, keep_rate, prefix, fuse_token)
            x = x + blk.mlp(blk.norm2(x))
            counts.append(x.shape[1])
        logits = deit_logits(model, x)
    return (logits, counts) if return_counts else logits
