"""Parity tests import timm through saitjax's helper and skip where torch/timm are absent."""

import pytest


def import_timm():
    """``(torch, timm)``, or skip the calling test."""
    pytest.importorskip("torch")
    from saitjax.convert.timm_import import import_timm as _import

    try:
        return _import()
    except ImportError as err:
        pytest.skip(f"timm not importable: {err}")


def deit_tokens(model, images_nchw):
    """A timm DeiT's input tokens ``[CLS, (DIST), patches] + pos_embed`` (the official peers' start)."""
    import torch

    x = model.patch_embed(images_nchw.float())
    prefix = [model.cls_token.expand(x.shape[0], -1, -1)]
    if getattr(model, "dist_token", None) is not None:
        prefix.append(model.dist_token.expand(x.shape[0], -1, -1))
    return torch.cat(prefix + [x], dim=1) + model.pos_embed


def deit_logits(model, x):
    """A timm DeiT's head on final tokens: CLS, averaged with DIST's head when distilled (eval)."""
    x = model.norm(x)
    if getattr(model, "dist_token", None) is not None:
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    return model.head(x[:, 0])


def timm_attention(attn, x, size=None):
    """A timm attention module run by hand: ``(output, probs [B,H,N,N], heads [B,H,N,d], keys [B,H,N,d])``.

    ``heads`` are the per-head outputs ``probs @ V`` before the projection; ``size [B, N]`` adds
    ToMe's proportional-attention bias ``log(size_j)`` to the logits (after the scaling).
    """
    b, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).float().reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    heads = probs @ v
    return attn.proj(heads.transpose(1, 2).reshape(b, n, c)), probs, heads, k
