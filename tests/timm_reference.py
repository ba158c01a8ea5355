"""Parity tests import timm through saitjax's helper and skip where torch/timm are absent; helpers
that run or prepare the timm side of a comparison."""

import numpy as np
import pytest

import jax


def import_timm():
    """``(torch, timm)``, or skip the calling test."""
    pytest.importorskip("torch")
    from saitjax.convert.timm_import import import_timm as _import

    try:
        return _import()
    except ImportError as err:
        pytest.skip(f"timm not importable: {err}")


def randomised(reference):
    """A timm model with every parameter moved off its init (N(0, 0.02) added), in eval mode; layer
    scales (``*gamma``) drawn in [0.5, 1.5] instead (not ~1e-6), so that the blocks count."""
    import torch

    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) + 0.5)
            else:
                p.add_(torch.randn_like(p) * 0.02)
    return reference.eval()


def max_logit_diff(reference, model, params, size):
    """Largest |logit difference| of a timm classifier and a saitjax ``model`` on 2 random NHWC images."""
    import torch

    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits, _ = jax.jit(model.apply)({"params": params}, images)
    return float(np.abs(np.asarray(logits) - expected).max())


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
