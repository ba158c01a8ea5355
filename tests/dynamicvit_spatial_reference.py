"""PyTorch reference of DynamicViT's hierarchical models (T-PAMI "dynamic spatial sparsification"),
written from a reading of the official code, for parity tests of the JAX port.

Source read: raoyongming/DynamicViT at dd32af9, ``models/dyswin.py`` (``AdaSwinTransformer``,
``SwinTransformer_Teacher``) and ``models/dyconvnext.py`` (``AdaConvNeXt``, ``ConvNeXt_Teacher``),
plus the model construction in ``main.py`` / ``infer.py`` (sizes, ``SPARSE_RATIO``, ``PRUNING_LOC``).
Written here, not copied. Module names, parameter and buffer names follow the official layout, so
``state_dict()`` has the keys an official checkpoint has:

* DynamicSwin: the microsoft Swin layout (``patch_embed.{proj,norm}``, ``layers.{i}.blocks.{j}.*``,
  ``layers.{i}.downsample.{norm,reduction}`` at the end of stages 0-2, ``norm``, ``head``; buffers
  ``relative_position_index`` and, for shifted blocks, ``attn_mask``), plus in stage 3 (index 2)
  ``blocks.{j}.fastmlp.fc1.{0 LayerNorm, 1 Linear C->C}`` for every block ``j >= pruning_loc[0]``
  and ``score_predictor.{s}.in_conv.{0 LayerNorm eps 1e-5, 1 Linear}``, ``.out_conv.{0,2,4}``.
* DynamicCNN: the facebookresearch ConvNeXt layout (``downsample_layers.{0..3}``, ``stages.{i}.{j}.*``
  with the block layer scale ``gamma``, ``norm``, ``head``), plus ``stages.2.{j}.fast_path.{0 LN eps
  1e-6, 1 Linear C->C}`` and ``stages.2.{j}.fast_path_gamma`` for ``j >= pruning_loc[0]`` and a
  top-level ``score_predictor.{s}.in_conv.{0 channels-first LN eps 1e-6, 1 1x1 conv}``,
  ``.out_conv.{0,2,4}`` (1x1 convs).

Forward semantics (as the official code; see ``docs/methods-more.md`` section 7):

* eval: each predictor scores the *full* current map (global half = plain spatial mean), keeps the
  top ``int(N * ratio)`` locations (``argsort`` descending) for the slow path (the block's own MLP)
  and sends the rest to the fast path (``LN -> Linear``; ConvNeXt also ``* fast_path_gamma``);
  window attention / the depthwise conv stay dense. Returns logits only.
* train: hard Gumbel masks, two full-resolution streams ``[slow, fast]`` mixed by the current mask
  as the official Ada blocks mix them, merged after the last stage-3 block; returns
  ``(logits, featmap, decisions)``.
* ``teacher=True`` builds the dense official teacher (no fast paths, no predictors) whose forward
  returns ``(logits, featmap)``; :meth:`forward_dense` runs the same dense network on a student's
  own weights (slow path everywhere).

Deliberate differences from the official code, none of which changes a number it produces:

* Swin's ``BasicLayer.forward`` merges the two training streams ``if len(x) == 2``, which also fires
  at inference for a batch of exactly 2 images and crashes there; this reference tests the
  training flag instead, so inference runs at every batch size.
* the Gumbel noise can be passed in (``gumbel_noise``) so that a JAX port can be compared in
  training mode; without it ``F.gumbel_softmax`` draws it, as the official code does.
* eval forwards record the slow/fast index sets in ``model.last_decisions`` (for debugging parity).
* dropout layers (rate 0 in every released configuration) are left out; DropPath is timm's.
"""

from __future__ import annotations

from typing import Any, Sequence

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as err:  # the tests call pytest.importorskip("torch") before importing this module
    raise ImportError("dynamicvit_spatial_reference needs PyTorch (tests skip without it)") from err

Tensor = torch.Tensor
Decision = Any  # a [B, N, 1] / [B, 1, H, W] mask in training, [idx_slow, idx_fast] at inference

# Official sizes (main.py / infer.py) and predictor placements (stage-3 block indices).
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), pruning_loc=(1, 2, 3)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), pruning_loc=(2, 4, 6)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), pruning_loc=(2, 4, 6)),
    # tiny test size: 32 px, patch 4, window 4 -> maps 8, 4, 2, 1 (stage 3: 2x2 = 4 locations)
    "test": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), pruning_loc=(1, 2, 3),
                 img_size=32, patch_size=4, window_size=4, num_classes=10),
}
CONVNEXT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), pruning_loc=(1, 2, 3)),
    "small": dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), pruning_loc=(3, 6, 9)),
    "base": dict(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3), pruning_loc=(3, 6, 9)),
    # tiny test size: feed 32 px images (stage-3 map 2x2); any size with a stage-3 map >= 2x2 works
    "test": dict(dims=(16, 32, 64, 128), depths=(1, 1, 4, 1), pruning_loc=(1, 2, 3), num_classes=10),
}
_ALIASES = {"t": "tiny", "s": "small", "b": "base"}


def sparse_ratios(base_rate: float) -> list[float]:
    """``[r, r - 0.2, r - 0.4]`` in Python float arithmetic, as main.py's ``SPARSE_RATIO``: the
    rounding matters (``0.7 - 0.2 = 0.49999999999999994``, so 97 of 196 locations, not 98)."""
    return [base_rate, base_rate - 0.2, base_rate - 0.4]


def slow_counts(num_locations: int, ratios: Sequence[float]) -> list[int]:
    """Slow-path sizes per predictor, ``int(N * ratio)`` as ``PredictorLG`` computes them."""
    return [int(num_locations * r) for r in ratios]


# ----------------------------------------------------------------------------------------------
# shared pieces


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _trunc_normal_(t: Tensor, std: float = 0.02) -> Tensor:
    """timm's ``trunc_normal_`` (cut at +-2 absolute, i.e. +-100 std at 0.02) = torch's defaults."""
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class DropPath(nn.Module):
    """Per-sample stochastic depth, timm semantics (scaled by 1 / keep); identity at eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


def _drop_path(rate: float) -> nn.Module:
    """The official ``DropPath(p) if p > 0 else nn.Identity()`` (no parameters either way)."""
    return DropPath(rate) if rate > 0.0 else nn.Identity()


def batch_index_select(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b]]`` for ``x`` of [B, N, C] or [B, N] (the official helper's semantics)."""
    b, n = x.shape[:2]
    flat = (idx + torch.arange(b, device=x.device).view(b, 1) * n).reshape(-1)
    return x.reshape(b * n, *x.shape[2:])[flat].reshape(b, idx.shape[1], *x.shape[2:])


def batch_index_fill(x: Tensor, x1: Tensor, x2: Tensor, idx1: Tensor, idx2: Tensor) -> Tensor:
    """``x`` with rows ``idx1[b]`` set to ``x1[b]`` and rows ``idx2[b]`` to ``x2[b]`` (out of place)."""
    b, n, c = x.shape
    offset = torch.arange(b, device=x.device).view(b, 1) * n
    out = x.reshape(b * n, c).clone()
    out[(idx1 + offset).reshape(-1)] = x1.reshape(-1, c)
    out[(idx2 + offset).reshape(-1)] = x2.reshape(-1, c)
    return out.reshape(b, n, c)


def hard_gumbel(logits: Tensor, dim: int, noise: Tensor | None = None) -> Tensor:
    """``F.gumbel_softmax(logits, tau=1, hard=True, dim=dim)``; with ``noise`` (standard Gumbel
    samples of the logits' shape) the same straight-through computation on that noise, so that a
    port can be fed identical draws. The values are exactly 0 / 1 either way."""
    if noise is None:
        return F.gumbel_softmax(logits, hard=True, dim=dim)
    soft = (logits + noise).softmax(dim)
    hard = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def _top_split(score: Tensor, ratio: float) -> list[Tensor]:
    """``[idx_slow, idx_fast]``: the official ``argsort(descending)`` split at ``int(N * ratio)``."""
    keep = int(score.shape[1] * ratio)
    order = torch.argsort(score, dim=1, descending=True)
    return [order[:, :keep], order[:, keep:]]


def perturb_(model: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Move every parameter off its init (``+ N(0, scale)``; layer scales ``*gamma`` drawn in
    [0.5, 1.5] instead of ~1e-6) so that every block, both paths and the predictors count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


# ----------------------------------------------------------------------------------------------
# DynamicSwin (dyswin.py)


class Mlp(nn.Module):
    """Swin's ``fc1 -> GELU (exact erf) -> fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FastMlp(nn.Module):
    """The Swin fast path ``fastmlp``: ``fc1 = Sequential(LayerNorm(C), Linear(C, C))``, nothing else
    (no activation, no layer scale; the official ``hidden_features`` argument is unused)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc1(x)


def window_partition(x: Tensor, w: int) -> Tensor:
    """[B, H, W, C] -> [B * nW, w, w, C], windows row-major within each image."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, c)


def window_reverse(windows: Tensor, w: int, h: int, wd: int) -> Tensor:
    """Inverse of :func:`window_partition`."""
    b = windows.shape[0] // ((h // w) * (wd // w))
    x = windows.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, -1)


class WindowAttention(nn.Module):
    """W-MSA with the relative-position bias table; ``q`` scaled by ``head_dim ** -0.5`` before ``q k^T``."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, w*w
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        _trunc_normal_(self.relative_position_bias_table)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """``SwinTransformerBlock``, or with ``ada=True`` the ``AdaSwinTransformerBlock`` (adds ``fastmlp``).

    Maps no larger than the window are one unshifted window of the whole map (official rule).
    """

    def __init__(self, dim: int, resolution: tuple[int, int], heads: int, window: int = 7, shift: int = 0,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, ada: bool = False):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        assert 0 <= shift < window
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.drop_path = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = ada
        if ada:
            self.fastmlp = FastMlp(dim)
        self.register_buffer("attn_mask", self._shift_mask() if shift else None)

    def _shift_mask(self) -> Tensor:
        """[nW, w*w, w*w]: 0 within a region of the rolled map, -100 across regions."""
        h, wd = self.resolution
        w, s = self.window, self.shift
        region = torch.zeros(1, h, wd, 1)
        cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
        label = 0
        for rows in cuts:
            for cols in cuts:
                region[:, rows, cols, :] = label
                label += 1
        labels = window_partition(region, w).view(-1, w * w)
        diff = labels[:, None, :] - labels[:, :, None]
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def attend(self, x: Tensor) -> Tensor:
        """``x + DropPath(SW-MSA(LN1(x)))`` on the whole map (dense in every mode)."""
        b, n, c = x.shape
        h, wd = self.resolution
        w, s = self.window, self.shift
        y = self.norm1(x).view(b, h, wd, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, w).view(-1, w * w, c), self.attn_mask)
        y = window_reverse(y.view(-1, w, w, c), w, h, wd)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        return x + self.drop_path(y.reshape(b, n, c))

    def slow(self, x: Tensor) -> Tensor:
        return self.drop_path(self.mlp(self.norm2(x)))

    def fast(self, x: Tensor) -> Tensor:
        return self.drop_path(self.fastmlp(x))

    def forward(self, x: Tensor | list[Tensor], mask: Decision | None = None) -> Tensor | list[Tensor]:
        if mask is None:  # plain block (also an Ada block run densely)
            x = self.attend(x)
            return x + self.slow(x)
        if self.training:
            # two streams: attention on the mixed map; each stream's FFN input takes the fresh x_a
            # where the mask routes it and its own *previous* value elsewhere; both residuals are x_a
            s, f = x
            x_a = self.attend(s * mask + f * (1 - mask))
            s_in = x_a * mask + s * (1 - mask)
            f_in = x_a * (1 - mask) + f * mask
            return [x_a + self.slow(s_in), x_a + self.fast(f_in)]
        idx1, idx2 = mask
        x_a = self.attend(x)
        y1 = self.slow(batch_index_select(x_a, idx1))
        y2 = self.fast(batch_index_select(x_a, idx2))
        return x_a + batch_index_fill(torch.zeros_like(x_a), y1, y2, idx1, idx2)


class PatchMerging(nn.Module):
    """2x2 merge (x0..x3 = [0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2]) -> LN(4C) -> Linear(4C, 2C)."""

    def __init__(self, resolution: tuple[int, int], dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h, wd = self.resolution
        assert n == h * wd and h % 2 == 0 and wd % 2 == 0
        x = x.view(b, h, wd, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinPredictor(nn.Module):
    """dyswin.py ``PredictorLG``: ``LN(eps 1e-5) -> Linear -> GELU``, local half + plain mean of the
    global half, ``C -> C/2 -> C/4 -> 2`` with GELUs, log-softmax over the last axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def log_probs(self, x: Tensor) -> Tensor:
        """[B, N, 2] log-probabilities; channel 0 = "slow path"."""
        x = self.in_conv(x)
        b, n, c = x.shape
        pooled = x[:, :, c // 2:].mean(dim=1, keepdim=True).expand(b, n, c // 2)
        return self.out_conv(torch.cat([x[:, :, :c // 2], pooled], dim=2))

    def forward(self, x: Tensor | list[Tensor], mask: Decision | None, ratio: float,
                noise: Tensor | None = None) -> tuple[Tensor | list[Tensor], Decision]:
        if self.training and mask is not None:  # score the map the previous decision assembles
            s, f = x
            x = s * mask + f * (1 - mask)
        else:
            s = f = x
        pred = self.log_probs(x)
        if self.training:  # keeps the streams as they are; the next block mixes them by the new mask
            return [s, f], hard_gumbel(pred, dim=2, noise=noise)[:, :, 0:1]
        return x, _top_split(pred[:, :, 0], ratio)


class SwinPatchEmbed(nn.Module):
    """Conv(p x p, stride p) -> flatten -> LayerNorm (``patch_norm=True``)."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, dim: int):
        super().__init__()
        self.img_size = img_size
        self.patches_resolution = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        assert tuple(x.shape[2:]) == self.img_size, f"input {tuple(x.shape[2:])} != model {self.img_size}"
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinStage(nn.Module):
    """``BasicLayer``: blocks (shift on odd blocks), optional predictors, PatchMerging at the end."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, heads: int, window: int, mlp_ratio: float,
                 drop_path: Sequence[float], downsample: bool, sparse_ratio: Sequence[float] | None = None,
                 pruning_loc: Sequence[int] | None = None):
        super().__init__()
        first_ada = pruning_loc[0] if sparse_ratio is not None else depth
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i],
                      ada=i >= first_ada) for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None
        self.sparse_ratio = None if sparse_ratio is None else [float(r) for r in sparse_ratio]
        self.pruning_loc = None if pruning_loc is None else [int(j) for j in pruning_loc]
        if sparse_ratio is not None:
            self.score_predictor = nn.ModuleList([SwinPredictor(dim) for _ in self.pruning_loc])

    def forward(self, x: Tensor, dense: bool = False,
                gumbel_noise: Sequence[Tensor] | None = None) -> tuple[Tensor, list[Decision]]:
        decisions: list[Decision] = []
        if self.sparse_ratio is None or dense:
            for blk in self.blocks:
                x = blk(x)
        else:
            mask, s = None, 0
            for j, blk in enumerate(self.blocks):
                if j in self.pruning_loc:
                    noise = None if gumbel_noise is None else gumbel_noise[s]
                    x, mask = self.score_predictor[s](x, mask, self.sparse_ratio[s], noise)
                    decisions.append(mask)
                    s += 1
                x = blk(x) if j < self.pruning_loc[0] else blk(x, mask)
            # official: ``if len(x) == 2`` -- also true for an inference batch of 2 (crash); see module doc
            if self.training:
                x = x[0] * mask + x[1] * (1 - mask)
        if self.downsample is not None:
            x = self.downsample(x)
        return x, decisions


class AdaSwinTransformer(nn.Module):
    """DynamicSwin (``teacher=False``) or its dense teacher ``SwinTransformer_Teacher`` (``teacher=True``).

    ``forward(images)``: eval -> logits; train -> ``(logits, featmap [B, L, C], decisions)`` with
    ``decisions`` the three [B, N, 1] hard masks; teacher -> ``(logits, featmap)`` in both modes.
    ``gumbel_noise`` (train only): one [B, N, 2] standard-Gumbel tensor per predictor.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int | Sequence[int] = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1, sparse_ratio: Sequence[float] = (0.9, 0.7, 0.5),
                 pruning_loc: Sequence[int] = (4, 8, 12), teacher: bool = False):
        super().__init__()
        self.teacher = teacher
        self.num_layers = len(depths)
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.patch_embed = SwinPatchEmbed(_pair(img_size), _pair(patch_size), in_chans, embed_dim)
        res = self.patch_embed.patches_resolution
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            sparse = i == 2 and not teacher
            self.layers.append(SwinStage(
                int(embed_dim * 2 ** i), (res[0] // 2 ** i, res[1] // 2 ** i), depths[i], num_heads[i], window_size,
                mlp_ratio, dpr[sum(depths[:i]):sum(depths[:i + 1])], i < self.num_layers - 1,
                sparse_ratio if sparse else None, pruning_loc if sparse else None))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.last_decisions: list[Decision] = []

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor, dense: bool = False,
                         gumbel_noise: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, list[Decision]]:
        """``(pooled [B, C], featmap = norm(x) [B, L, C], decisions of stage 3)``."""
        x = self.patch_embed(x)
        decisions: list[Decision] = []
        for layer in self.layers:
            x, d = layer(x, dense=dense, gumbel_noise=gumbel_noise)
            if d:
                decisions = d
        featmap = self.norm(x)
        return featmap.mean(dim=1), featmap, decisions

    def forward_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The dense network on these weights (every Ada block on its slow path): ``(logits, featmap)``."""
        pooled, featmap, _ = self.forward_features(x, dense=True)
        return self.head(pooled), featmap

    def forward(self, x: Tensor, gumbel_noise: Sequence[Tensor] | None = None):
        if self.teacher:
            return self.forward_dense(x)
        pooled, featmap, decisions = self.forward_features(x, gumbel_noise=gumbel_noise)
        logits = self.head(pooled)
        if self.training:
            return logits, featmap, decisions
        self.last_decisions = decisions
        return logits


# ----------------------------------------------------------------------------------------------
# DynamicCNN (dyconvnext.py)


class LayerNorm(nn.Module):
    """ConvNeXt's LayerNorm: ``channels_last`` = ``F.layer_norm``; ``channels_first`` normalises over
    axis 1 by hand (biased variance, ``(x - u) / sqrt(s + eps)``)."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(data_format)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.data_format = eps, data_format

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """``Block``, or with ``ada=True`` the official ``AdaBlock`` (adds ``fast_path``, ``fast_path_gamma``).

    NCHW in and out; the FFN runs channels-last: ``gamma * pwconv2(GELU(pwconv1(LN(u))))``.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, ada: bool = False):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = _drop_path(drop_path)
        self.ada = ada
        if ada:
            self.fast_path = nn.Sequential(LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim))
            self.fast_path_gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                                    if layer_scale_init_value > 0 else None)

    def slow(self, u: Tensor) -> Tensor:
        """``forward_ffn`` on channels-last input."""
        y = self.pwconv2(self.act(self.pwconv1(self.norm(u))))
        return y if self.gamma is None else self.gamma * y

    def fast(self, u: Tensor) -> Tensor:
        """The fast path on channels-last input: ``fast_path_gamma * Linear(LN(u))``."""
        y = self.fast_path(u)
        return y if self.fast_path_gamma is None else self.fast_path_gamma * y

    def forward(self, x: Tensor | list[Tensor], mask: Decision | None = None) -> Tensor | list[Tensor]:
        if mask is None:  # plain block (also an Ada block run densely)
            y = self.slow(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return x + self.drop_path(y)
        if self.training:
            # two streams: dwconv on the mixed map; each stream's FFN input takes the conv output where
            # the mask routes it and its own previous value elsewhere; each residual is its own stream
            s, f = x
            u = self.dwconv(s * mask + f * (1 - mask))
            s_in = (u * mask + s * (1 - mask)).permute(0, 2, 3, 1)
            f_in = (u * (1 - mask) + f * mask).permute(0, 2, 3, 1)
            s = s + self.drop_path(self.slow(s_in).permute(0, 3, 1, 2))
            f = f + self.drop_path(self.fast(f_in).permute(0, 3, 1, 2))
            return [s, f]
        idx1, idx2 = mask
        b, c, h, w = x.shape
        u = self.dwconv(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y1 = self.slow(batch_index_select(u, idx1))
        y2 = self.fast(batch_index_select(u, idx2))
        y = batch_index_fill(torch.zeros_like(u), y1, y2, idx1, idx2)
        return x + self.drop_path(y.reshape(b, h, w, c).permute(0, 3, 1, 2))


class ConvNeXtPredictor(nn.Module):
    """dyconvnext.py ``PredictorLG``: channels-first ``LN(eps 1e-6) -> 1x1 conv -> GELU``, local half +
    plain spatial mean of the global half, 1x1 convs ``C -> C/2 -> C/4 -> 2``, log-softmax over channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(LayerNorm(dim, eps=1e-6, data_format="channels_first"), nn.Conv2d(dim, dim, 1),
                                     nn.GELU())
        self.out_conv = nn.Sequential(nn.Conv2d(dim, dim // 2, 1), nn.GELU(), nn.Conv2d(dim // 2, dim // 4, 1),
                                      nn.GELU(), nn.Conv2d(dim // 4, 2, 1), nn.LogSoftmax(dim=1))

    def log_probs(self, x: Tensor) -> Tensor:
        """[B, 2, H, W] log-probabilities; channel 0 = "slow path"."""
        x = self.in_conv(x)
        b, c, h, w = x.shape
        pooled = x[:, c // 2:].mean(dim=(2, 3), keepdim=True).expand(b, c // 2, h, w)
        return self.out_conv(torch.cat([x[:, :c // 2], pooled], dim=1))

    def forward(self, x: Tensor | list[Tensor], mask: Decision | None, ratio: float,
                noise: Tensor | None = None) -> tuple[Tensor | list[Tensor], Decision]:
        if self.training and mask is not None:
            s, f = x
            x = s * mask + f * (1 - mask)
        else:
            s = f = x
        pred = self.log_probs(x)
        if self.training:
            if noise is not None:  # given per location, row-major: [B, H*W, 2] -> [B, 2, H, W]
                b, _, h, w = pred.shape
                noise = noise.reshape(b, h, w, 2).permute(0, 3, 1, 2)
            return [s, f], hard_gumbel(pred, dim=1, noise=noise)[:, 0:1]
        return x, _top_split(pred[:, 0].reshape(pred.shape[0], -1), ratio)


class AdaConvNeXt(nn.Module):
    """DynamicCNN (``teacher=False``) or its dense teacher ``ConvNeXt_Teacher`` (``teacher=True``).

    Fully convolutional (no image size). ``forward(images)``: eval -> logits; train -> ``(logits,
    featmap, decisions)`` with ``featmap = norm(x.permute(0, 2, 3, 1))`` of shape **[B, H, W, C]**
    (as official; flatten to [B, H*W, C] row-major to compare with Swin-style maps) and the three
    [B, 1, H, W] hard masks; teacher -> ``(logits, featmap)`` in both modes. ``gumbel_noise`` (train
    only): one [B, H*W, 2] standard-Gumbel tensor per predictor, locations row-major.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
                 sparse_ratio: Sequence[float] = (0.75, 0.5, 0.25), pruning_loc: Sequence[int] = (1, 2, 3),
                 teacher: bool = False):
        super().__init__()
        self.teacher = teacher
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm(dims[0], 1e-6, "channels_first"))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], 1e-6, "channels_first"), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.pruning_loc = [int(j) for j in pruning_loc]
        first_ada = depths[2] if teacher else self.pruning_loc[0]
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                ConvNeXtBlock(dims[i], dpr[cur + j], layer_scale_init_value, ada=i == 2 and j >= first_ada)
                for j in range(depths[i])]))
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.sparse_ratio = [float(r) for r in sparse_ratio]
        if not teacher:
            self.score_predictor = nn.ModuleList([ConvNeXtPredictor(dims[2]) for _ in self.pruning_loc])
        self.apply(self._init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)
        self.last_decisions: list[Decision] = []

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _trunc_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def _head(self, x: Tensor, featmap_too: bool) -> tuple[Tensor, Tensor | None]:
        featmap = self.norm(x.permute(0, 2, 3, 1)) if featmap_too else None
        return self.head(self.norm(x.mean(dim=(-2, -1)))), featmap

    def forward_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The dense network on these weights (every Ada block on its slow path): ``(logits, featmap)``."""
        for i in range(4):
            x = self.downsample_layers[i](x)
            for blk in self.stages[i]:
                x = blk(x)
        return self._head(x, True)

    def forward(self, x: Tensor, gumbel_noise: Sequence[Tensor] | None = None):
        if self.teacher:
            return self.forward_dense(x)
        for i in range(2):
            x = self.downsample_layers[i](x)
            for blk in self.stages[i]:
                x = blk(x)
        x = self.downsample_layers[2](x)
        mask, s, decisions = None, 0, []
        for j, blk in enumerate(self.stages[2]):
            if j in self.pruning_loc:
                noise = None if gumbel_noise is None else gumbel_noise[s]
                x, mask = self.score_predictor[s](x, mask, self.sparse_ratio[s], noise)
                decisions.append(mask)
                s += 1
            x = blk(x) if j < self.pruning_loc[0] else blk(x, mask)
        if self.training:
            x = x[0] * mask + x[1] * (1 - mask)
        x = self.downsample_layers[3](x)
        for blk in self.stages[3]:
            x = blk(x)
        logits, featmap = self._head(x, self.training)
        if self.training:
            return logits, featmap, decisions
        self.last_decisions = decisions
        return logits


# ----------------------------------------------------------------------------------------------
# builders


def _size(table: dict[str, dict[str, Any]], size: str) -> dict[str, Any]:
    key = _ALIASES.get(size, size)
    if key not in table:
        raise ValueError(f"unknown size {size!r}; one of {sorted(table)}")
    return dict(table[key])


def dynamic_swin(size: str = "tiny", base_rate: float = 0.7, **kw: Any) -> AdaSwinTransformer:
    """DynamicSwin-T/S/B (or ``"test"``) as main.py builds it: ``sparse_ratio = sparse_ratios(base_rate)``,
    the official ``pruning_loc``, window 7 at 224 px; any constructor argument in ``kw`` overrides
    (e.g. ``img_size``, ``window_size``, ``drop_path_rate``, ``teacher=True``)."""
    cfg = _size(SWIN_SIZES, size)
    cfg.setdefault("drop_path_rate", 0.0)
    cfg["sparse_ratio"] = sparse_ratios(base_rate)
    cfg.update(kw)
    return AdaSwinTransformer(**cfg)


def dynamic_convnext(size: str = "tiny", base_rate: float = 0.7, **kw: Any) -> AdaConvNeXt:
    """DynamicCNN-T/S/B (or ``"test"``) as main.py builds it: ``sparse_ratio = sparse_ratios(base_rate)``,
    the official ``pruning_loc``; any constructor argument in ``kw`` overrides."""
    cfg = _size(CONVNEXT_SIZES, size)
    cfg["sparse_ratio"] = sparse_ratios(base_rate)
    cfg.update(kw)
    return AdaConvNeXt(**cfg)
