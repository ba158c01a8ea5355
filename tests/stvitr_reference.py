"""PyTorch reference of STViT-R for the parity tests, written from a reading of the official code.

Source read: changsn/STViT-R, ``models/swin_transformer.py``, ``models/layers.py``,
``models/multi_scale.py``, ``models/build.py``, ``config.py`` as stored at commit 0565ca2
(``docs/methods-more.md`` section 6 reads the same files at b4a27a0, with line numbers). Written
here, not copied; module names and buffers follow the official ``state_dict`` layout so that the
converter sees the keys an official checkpoint has:

* ``Mlp``, ``window_partition``/``window_reverse``, ``WindowAttention``, ``SwinTransformerBlock``
  (relative-position buffer, ``attn_mask`` buffer with -100, roll by -shift/+shift, no layer
  scale: ``use_layer_scale`` is never passed by ``build.py``), ``PatchMerging`` (x0, x1, x2, x3 =
  [0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2]), ``BasicLayer`` (downsample at the *end*):
  swin_transformer.py, classes of the same names.
* ``Attention`` (separate ``q``/``kv``, ``(q @ k^T) * scale``), ``Block`` (the same ``norm1`` on
  queries and keys; ``local=True`` attends within s x s groups of the square token grid; layer
  scales always), ``SemanticAttentionBlock`` (adaptive max pool per window, 10x10 stride-4
  ``F.unfold`` neighbourhoods, keys ``norm1([Z0; unfold])``, no shortcut on the pooled tokens,
  drop-path on the MLP branch only), ``Conv2d_BN`` / ``PatchEmbed`` (conv-BN-Hardswish twice, no
  LayerNorm): layers.py (methods-more: :153-214 SemanticAttentionBlock, :199 the unfold,
  :233-290 the stem).
* ``Deit`` (stage 3: hard-coded per-index roles 0/6/12 Swin, 1/7/13 generation, 2/8/14 global
  update on ``[Z; X]``, odd others local, even others global, 5/11/17 recovery;
  ``semantic_token2`` added to the queries of layer 2 only, when ``use_global``) and the
  ``SwinTransformer`` assembly (layers 0/1/3 BasicLayer, 2 Deit; final LN, average pool, head):
  swin_transformer.py (methods-more: :424-559 Deit).
* Defaults as ``build.py`` + ``config.py`` apply them: ``use_global=False``, ``shortcut=False``,
  ``relative_pos=False``, ``use_conv_pos=False``, ``sample_window_size=3`` (constructor default;
  the config value is not forwarded), LayerNorm eps 1e-5 everywhere (``nn.LayerNorm`` is passed
  to ``Deit``), BN eps 1e-5. Options the released runs do not use (conv positions, relative
  positions in the semantic blocks, the pooled-token shortcut) are not reproduced.

timm provides ``DropPath`` and ``trunc_normal_``, as in the official imports.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_reference import import_timm

_, _timm = import_timm()
from timm.layers import DropPath, trunc_normal_  # noqa: E402  (after the torchvision stand-in)


def window_partition(x, w):
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, c)


def window_reverse(windows, w, h, wd):
    b = windows.shape[0] // ((h // w) * (wd // w))
    x = windows.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, -1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.window, self.heads, self.scale = window, heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window=7, shift=0, drop_path=0.0):
        super().__init__()
        self.resolution = resolution
        if resolution <= window:  # the whole map is one window, never shifted
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        mask = None
        if shift:
            region = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for label, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
                region[:, rows, cols] = label
            labels = window_partition(region, window).view(-1, window * window)
            diff = labels[:, None, :] - labels[:, :, None]
            mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        b, n, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = self.attn(window_partition(y, w).view(-1, w * w, c), self.attn_mask)
        y = window_reverse(y.view(-1, w, w, c), w, r, r)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + self.drop_path(y.reshape(b, n, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, rates, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinTransformerBlock(dim, resolution, heads, window, window // 2 if i % 2 else 0,
                                                          rates[i]) for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, y):
        b, n1, c = x.shape
        n2, h = y.shape[1], self.heads
        q = self.q(x).reshape(b, n1, h, c // h).permute(0, 2, 1, 3)
        k, v = self.kv(y).reshape(b, n2, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        self.last_probs = attn
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n1, c))


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path=0.0, local=False, window=3, layer_scale=1e-5):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, 4 * dim)
        self.layer_scale_1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale * torch.ones(dim))
        self.local, self.window = local, window

    def forward(self, x, y=None):
        shortcut = x
        if y is None:
            y = x
        x = self.norm1(x)
        if self.local:
            b, n, c = x.shape
            side, s = int(math.sqrt(n)), self.window
            g = x.view(b, side // s, s, side // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
            out = self.attn(g, g).view(b, side // s, side // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, c)
        else:
            out = self.attn(x, self.norm1(y))
        x = shortcut + self.drop_path(self.layer_scale_1 * out)
        return x + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(x)))


class SemanticAttentionBlock(nn.Module):
    def __init__(self, dim, heads, window=7, sample=3, drop_path=0.0, layer_scale=1e-5):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, 4 * dim)
        self.layer_scale_1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale * torch.ones(dim))
        self.window, self.sample = window, sample

    def forward(self, x):
        b, n, c = x.shape
        side, w, s = int(math.sqrt(n)), self.window, self.sample
        x = x.view(b, side, side, c)
        windows = window_partition(x, w).permute(0, 3, 1, 2)  # [B*nW, C, w, w]
        pooled = F.adaptive_max_pool2d(windows, (s, s)).view(-1, c, s * s).transpose(1, 2)  # [B*nW, s*s, C]
        queries = self.norm1(pooled)
        near = F.unfold(x.permute(0, 3, 1, 2), kernel_size=10, stride=4)  # [B, C*100, L]
        near = near.view(b, c, 10, 10, -1).permute(0, 4, 2, 3, 1).reshape(-1, 100, c)
        keys = self.norm1(torch.cat([pooled, near], dim=1))
        z = self.layer_scale_1 * self.attn(queries, keys)  # no shortcut (config SHORTCUT False)
        z = z.view(b, side // w, side // w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, c)
        return z + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(z)))


class Deit(nn.Module):
    """Stage 3 (official class name): roles by hard-coded layer index."""

    def __init__(self, dim, resolution, depth, heads, window, sample, rates, use_global=False):
        super().__init__()
        self.resolution = resolution
        if use_global:
            n_sem = (resolution // window) ** 2 * sample * sample
            self.semantic_token2 = nn.Parameter(torch.zeros(1, n_sem, dim))
            trunc_normal_(self.semantic_token2, std=0.02)
        self.use_global = use_global
        blocks = []
        for i in range(depth):
            if i in (0, 6, 12):
                blocks.append(SwinTransformerBlock(dim, resolution, heads, window, 0, rates[i]))
            elif i in (1, 7, 13):
                blocks.append(SemanticAttentionBlock(dim, heads, window, sample, rates[i]))
            elif i in (2, 5, 8, 11, 14, 17):
                blocks.append(Block(dim, heads, rates[i]))
            else:
                blocks.append(Block(dim, heads, rates[i], local=bool(i % 2), window=sample))
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging(resolution, dim)

    def forward(self, x):
        self.semantic_probs = []
        for i, blk in enumerate(self.blocks):
            k = i % 6
            if k == 0:
                x = blk(x)
            elif k == 1:
                z = blk(x)
            elif k == 2:
                queries = z + self.semantic_token2 if (self.use_global and i == 2) else z
                z = blk(queries, torch.cat([z, x], dim=1))
                self.semantic_probs.append(blk.attn.last_probs)
            elif k in (3, 4):
                z = blk(z)
            else:
                x = blk(x, z)
        return self.downsample(x)


class Conv2d_BN(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, 3, 2, 1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    def __init__(self, dim, in_chans=3):
        super().__init__()
        self.proj = nn.Sequential(Conv2d_BN(in_chans, dim // 2), nn.Hardswish(),
                                  Conv2d_BN(dim // 2, dim), nn.Hardswish())

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class STViTR(nn.Module):
    """``SwinTransformer`` of the official models/swin_transformer.py with build.py's arguments."""

    def __init__(self, img_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window=7,
                 num_classes=1000, sample_window_size=3, use_global=False, drop_path_rate=0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim, res = embed_dim * 2 ** i, img_size // 4 // 2 ** i
            own = rates[sum(depths[:i]):sum(depths[:i + 1])]
            if i == 2:
                self.layers.append(Deit(dim, res, depth, num_heads[i], window, sample_window_size, own, use_global))
            else:
                self.layers.append(BasicLayer(dim, res, depth, num_heads[i], window, own, i < len(depths) - 1))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.head = nn.Linear(embed_dim * 2 ** (len(depths) - 1), num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))
