"""ConvNeXt (Liu et al., CVPR 2022, "A ConvNet for the 2020s"): a dense convolutional backbone.

Built as timm (>= 0.9) builds ``convnext_{tiny,small,base}``, with Linen paths close to timm's keys:
``stem/{conv,norm}`` (Conv 4x4 stride 4, LayerNorm), ``stages_{i}/downsample/{norm,conv}`` (at the
*start* of stage ``i > 0``: LayerNorm, Conv 2x2 stride 2), ``stages_{i}/blocks_{j}/{conv_dw,norm,
mlp/{fc1,fc2},gamma}``, then ``norm`` and ``head`` (global average pool -> LayerNorm -> Linear).

Details that decide parity with timm and the official code: every LayerNorm is channels-last with
eps 1e-6, the depthwise conv is 7x7 with padding 3 (``feature_group_count=C``), the GELU is exact,
the layer scale ``gamma`` multiplies the MLP output before drop path, and the head norm runs on
the *pooled* vector (timm's default ``head_norm_first=False``).

Like :class:`saitjax.models.swin.SwinTransformer`, subclasses swap pieces through
:meth:`ConvNeXt.build_stem`, :meth:`ConvNeXt.build_stage`, :meth:`ConvNeXt.run_stage` and the FLOP
hooks :meth:`ConvNeXt.stem_macs` / :meth:`ConvNeXt.stage_macs`, without copying the forward.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saitjax.models.hierarchical import HierarchicalBackbone, HierarchicalStage
from saitjax.models.registry import register_model
from saitjax.models.vit import Aux, DropPath, Mlp, check_nhwc_images
from saitjax.sparsity import SparsitySpec

Array = jax.Array

LN_EPS = 1e-6
_dense_init = nn.initializers.truncated_normal(0.02)  # timm: trunc_normal_(std=.02) on convs and linears


DEPTHWISE_IMPLS = ("auto", "grouped", "shifted")


def _shifted_sum(padded: Array, kernel: Array, height: int, width: int) -> Array:
    """``sum_ij padded[:, i:i+H, j:j+W] * kernel[i, j, 0]``: one fused loop on XLA CPU."""
    k = kernel.shape[0]
    return sum(padded[:, i:i + height, j:j + width] * kernel[i, j, 0] for i in range(k) for j in range(k))


def _pad(x: Array, pad: int) -> Array:
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


@jax.custom_vjp
def depthwise_shifted(x: Array, kernel: Array) -> Array:
    """Depthwise "same" correlation of ``x [B, H, W, C]`` with ``kernel [k, k, 1, C]`` as shifted adds.

    Its gradient is written out too: autodiff of the k^2 slices gives k^2 full-size pads (24x the
    forward time on CPU). The input gradient is the same shifted sum with the flipped kernel; the
    kernel gradient, per kernel row, one batched matmul ``[C, W+k-1, B*H] x [C, B*H, W]`` whose
    diagonals are the k column taps (2.4x faster than k^2 separate reductions on CPU).
    """
    _, h, w, _ = x.shape
    return _shifted_sum(_pad(x, kernel.shape[0] // 2), kernel, h, w)


def _depthwise_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return depthwise_shifted(x, kernel), (x, kernel)


def _depthwise_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    b, h, w, c = x.shape
    k = kernel.shape[0]
    dx = _shifted_sum(_pad(g, k // 2), kernel[::-1, ::-1], h, w)
    padded = _pad(x, k // 2)
    g_t = jnp.transpose(g, (3, 0, 1, 2)).reshape(c, b * h, w)
    rows = []
    for i in range(k):
        x_t = jnp.transpose(padded[:, i:i + h], (3, 0, 1, 2)).reshape(c, b * h, w + k - 1)
        corr = jnp.einsum("cnu,cnw->cuw", x_t, g_t)  # corr[c, u, v] = sum_n x[c, n, u] g[c, n, v]
        rows.append(jnp.stack([jnp.trace(corr[:, j:j + w, :], axis1=1, axis2=2) for j in range(k)], axis=0))
    dk = jnp.stack(rows)[:, :, None, :]  # [k, k, 1, C]
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """``k x k`` depthwise conv with "same" padding on ``[B, H, W, C]``; parameters as ``nn.Conv``'s
    (``kernel [k, k, 1, C]``, ``bias [C]``), so checkpoints do not depend on ``impl``.

    Why two ways: XLA's CPU backend runs a grouped convolution 10-20x slower than the ``k^2``
    shifted multiply-adds it is (measured on 2 cores: ConvNeXt-T stage 1 at batch 1, 18.6 vs
    0.8 ms; stage 3 at batch 32, 159 vs 15 ms), which made the depthwise conv, 2 % of ConvNeXt's
    FLOPs, most of its CPU time. ``impl="auto"`` takes ``shifted`` on CPU and the backend's
    ``grouped`` conv (cuDNN, TPU) elsewhere; results agree to float rounding.
    """

    kernel_size: int = 7
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise_impl={self.impl!r}: choose one of {DEPTHWISE_IMPLS}")
        c, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", _dense_init, (k, k, 1, c)).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,)).astype(self.dtype)
        x = x.astype(self.dtype)
        pad = k // 2
        impl = self.impl if self.impl != "auto" else ("shifted" if jax.default_backend() == "cpu" else "grouped")
        if impl == "grouped":
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        else:
            y = depthwise_shifted(x, kernel)
        return y + bias


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma * MLP(LN(dwconv(x))))`` on a ``[B, H, W, dim]`` map (timm's channels-last path).

    Written with ``setup`` and two named halves, :meth:`token_mix` (the depthwise conv) and
    :meth:`channel_mlp` (norm, MLP, layer scale), so that a routed variant (DynamicViT's
    fast/slow paths) reuses them under the same parameter names.
    """

    dim: int
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    depthwise_impl: str = "auto"

    def setup(self):
        self.conv_dw = DepthwiseConv(self.kernel_size, self.depthwise_impl, self.dtype)
        self.norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)
        self.mlp = Mlp(self.mlp_ratio, 0.0, self.dtype)
        if self.ls_init_value is not None:
            self.gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value), (self.dim,))
        self.drop_path = DropPath(self.drop_path_rate)

    def token_mix(self, x: Array, train: bool = False) -> Array:
        """The spatial part: the depthwise conv."""
        return self.conv_dw(x)

    def channel_mlp(self, u: Array, train: bool = False) -> Array:
        """The point-wise part on the mixed map: ``gamma * MLP(LN(u))`` (before drop path)."""
        y = self.mlp(self.norm(u), train)
        return y * self.gamma.astype(y.dtype) if self.ls_init_value is not None else y

    def __call__(self, x: Array, train: bool = False) -> Array:
        return x + self.drop_path(self.channel_mlp(self.token_mix(x, train), train), train)


class ConvNeXtDownsample(nn.Module):
    """Halve the map: LayerNorm then Conv 2x2 stride 2, ``[B, H, W, C]`` -> ``[B, H/2, W/2, out_dim]``."""

    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm")(x)
        return nn.Conv(self.out_dim, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                       kernel_init=_dense_init, name="conv")(x)


class ConvNeXtStem(nn.Module):
    """Patchify stem: Conv ``p x p`` stride ``p`` then LayerNorm, ``[B, H, W, 3]`` -> ``[B, H/p, W/p, C]``."""

    patch_size: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, kernel_init=_dense_init,
                    name="conv")(images)
        return nn.LayerNorm(LN_EPS, dtype=self.dtype, name="norm")(x)


class ConvNeXtStage(HierarchicalStage, nn.Module):
    """One stage: optional downsample to ``dim``, then ``len(drop_path_rates)`` blocks.

    Blocks from index ``routed_from`` on are built as ``routed_block`` (same arguments) when it is
    given: how DynamicViT's ConvNeXt puts its fast/slow blocks into stage 3 without a copy of the stage.
    """

    dim: int
    drop_path_rates: Sequence[float]
    has_downsample: bool = False
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6
    dtype: Any = jnp.float32
    routed_block: Any = None
    routed_from: int = 0
    depthwise_impl: str = "auto"

    def setup(self):
        self.downsample = ConvNeXtDownsample(self.dim, self.dtype) if self.has_downsample else None
        self.blocks = [(self.routed_block if self.routed_block is not None and j >= self.routed_from
                        else ConvNeXtBlock)(dim=self.dim, kernel_size=self.kernel_size, mlp_ratio=self.mlp_ratio,
                                            ls_init_value=self.ls_init_value, drop_path_rate=rate, dtype=self.dtype,
                                            depthwise_impl=self.depthwise_impl)
                       for j, rate in enumerate(self.drop_path_rates)]



class ConvNeXt(HierarchicalBackbone, nn.Module):
    """ConvNeXt classifier returning ``(logits, aux)``; dense only.

    ``aux``: ``features`` (tuple of the four stage outputs ``[B, H_i, W_i, C_i]``, NHWC, in order,
    before the head norm: what detection/segmentation necks and a later token-sparse variant read),
    ``tokens`` (the last map flattened, ``[B, H_4*W_4, C_4]``, with the head's LayerNorm applied
    at every location -- ConvNeXt's classifier norms only the pooled vector; these are the
    per-location features DynamicViT distils, as its official teacher computes them), and empty ``keep_masks`` / ``keep_indices`` (nothing is pruned).
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    depthwise_impl: str = "auto"  # see DepthwiseConv: shifted multiply-adds on CPU, grouped conv elsewhere

    # timm keys -> Linen paths (the official facebookresearch layout is first renamed onto timm's
    # by checkpoint_key_map). Conv/Linear layouts and LayerNorm weight -> scale are the converter's.
    checkpoint_renames = ((r"^stem\.0\.", "stem.conv."), (r"^stem\.1\.", "stem.norm."),
                          (r"^stages\.(\d+)\.", r"stages_\1."), (r"\.downsample\.0\.", ".downsample.norm."),
                          (r"\.downsample\.1\.", ".downsample.conv."), (r"\.blocks\.(\d+)\.", r".blocks_\1."),
                          (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head."))

    family = "ConvNeXt"  # in the dense-only message

    # -- static geometry (the rest: HierarchicalBackbone) ---------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.dims[0]

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.dims)

    def check_geometry(self) -> None:
        """Raise a ValueError naming the field and a fix if the stages cannot halve the image evenly."""
        self.check_per_stage("dims", self.dims)
        unit = self.patch_size * 2 ** (self.num_stages - 1)
        if self.img_size % unit:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size * 2**(stages-1) = {unit}: "
                             f"{self.num_stages - 1} stride-2 downsamples would drop rows (use e.g. "
                             f"{unit * max(1, round(self.img_size / unit))})")

    # -- overridable pieces -------------------------------------------------------------------

    def build_stem(self) -> nn.Module:
        """Images ``[B, H, W, in_chans]`` -> map ``[B, H/4, W/4, dims[0]]``; called as ``stem(x, train)``."""
        return ConvNeXtStem(self.patch_size, self.dims[0], self.dtype)

    def build_stage(self, i: int, **overrides: Any) -> nn.Module:
        """Stage ``i``: a map ``[B, H, W, C_{i-1}]`` -> ``[B, H', W', C_i]``; called as ``stage(x, train)``.
        ``overrides``: further :class:`ConvNeXtStage` fields (a routed block type)."""
        return ConvNeXtStage(self.dims[i], self.drop_path_rates()[i], has_downsample=i > 0,
                             kernel_size=self.kernel_size, mlp_ratio=self.mlp_ratio,
                             ls_init_value=self.ls_init_value, dtype=self.dtype,
                             depthwise_impl=self.depthwise_impl, **overrides)

    def embed(self, images: Array, train: bool) -> Array:
        """The stem: the first map of :meth:`forward_features`."""
        return self.stem(images, train)

    def run_stage(self, i: int, x: Array, train: bool, aux: Aux, sparsity: SparsitySpec | None) -> Array:
        """Run stage ``i`` (a subclass whose stage reports more may add entries to ``aux``)."""
        return self.stages[i](x, train)

    def stage_module(self, i: int) -> nn.Module:
        return self.stages[i]

    def setup(self):
        self.check_geometry()
        self.stem = self.build_stem()
        self.stages = [self.build_stage(i) for i in range(self.num_stages)]
        self.norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype)

    # -- forward ------------------------------------------------------------------------------

    def check_images(self, images: Array) -> None:
        check_nhwc_images(images, self.img_size, self.in_chans,
                          f"a multiple of {self.patch_size * 2 ** (self.num_stages - 1)}")

    def __call__(self, images: Array, *, train: bool = False,
                 sparsity: SparsitySpec | None = None) -> tuple[Array, Aux]:
        x, aux = self.forward_features(images, train, sparsity)
        b, h, w, c = x.shape
        pooled = self.norm(jnp.mean(x, axis=(1, 2)))
        logits = self.head(self.head_drop(pooled, deterministic=not train)).astype(jnp.float32)
        aux["tokens"] = self.norm(x).reshape(b, h * w, c)
        return logits, aux

    # -- FLOPs (fvcore convention: MACs of convs and linear layers; norms, GELU, pooling not counted)

    def stage_macs(self, i: int) -> float:
        """Downsample conv (if any) ``N * 4 C_{i-1} C_i`` plus every block: depthwise ``N k^2 C``,
        MLP ``2 r N C^2``."""
        r, c = self.stage_resolutions[i], self.dims[i]
        n = r * r
        down = n * 4 * self.dims[i - 1] * c if i > 0 else 0
        block = n * self.kernel_size ** 2 * c + 2 * self.mlp_ratio * n * c * c
        return float(down + self.depths[i] * block)

    # -- checkpoints --------------------------------------------------------------------------

    @classmethod
    def checkpoint_key_map(cls, keys: Sequence[str]) -> dict[str, str]:
        """Rename the official (facebookresearch/ConvNeXt) layout onto timm's; timm keys map to themselves.

        The official code keeps the stem and the downsamples together in ``downsample_layers.{i}``
        and names the block layers ``dwconv`` / ``pwconv1`` / ``pwconv2``, blocks directly under
        ``stages.{i}.{j}``, the head norm ``norm`` and the classifier ``head``.
        """
        if not any(k.startswith("downsample_layers.") for k in keys):
            return {k: k for k in keys}

        def rename(key: str) -> str:
            key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
            key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
            key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
            for old, new in (("dwconv", "conv_dw"), ("pwconv1", "mlp.fc1"), ("pwconv2", "mlp.fc2")):
                key = key.replace(f".{old}.", f".{new}.")
            key = re.sub(r"^norm\.", "head.norm.", key)
            return re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)

        return {k: rename(k) for k in keys}


# timm's names and sizes: (depths, dims); published GFLOPs (MACs) 4.5 / 8.7 / 15.4 at 224 px.
CONVNEXT_SIZES = {"tiny": ((3, 3, 9, 3), (96, 192, 384, 768)), "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
                  "base": ((3, 3, 27, 3), (128, 256, 512, 1024))}
# Tiny test size: 32 px -> maps 8, 4, 2, 1 (the 7x7 depthwise conv sees zero padding at every stage).
CONVNEXT_TEST_GEOMETRY = dict(img_size=32, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=10)


def guess_convnext_name(state_dict: Mapping[str, Any]) -> str | None:
    """Registered ConvNeXt whose width and stage-3 depth match a timm or official state dict, if any."""
    sd = {ConvNeXt.checkpoint_key_map(list(state_dict)).get(k, k): v for k, v in state_dict.items()}
    stem = sd.get("stem.0.weight")
    if stem is None or np.shape(stem)[2:] != (4, 4) or not any(".conv_dw." in k for k in sd):
        return None
    third = {int(m.group(1)) for k in sd for m in [re.match(r"stages\.2\.blocks\.(\d+)\.", k)] if m}
    for size, (depths, dims) in CONVNEXT_SIZES.items():
        if np.shape(stem)[0] == dims[0] and len(third) == depths[2]:
            return f"convnext_{size}"
    return None


def _register() -> None:
    for size, (depths, dims) in CONVNEXT_SIZES.items():
        register_model(f"convnext_{size}", ConvNeXt, f"ConvNeXt-{size[0].upper()} (depths {depths}, dims {dims}) "
                       "at 224 px", timm_name=f"convnext_{size}", tags=("convnext",), img_size=224,
                       depths=depths, dims=dims, num_classes=1000)
    register_model("convnext_test", ConvNeXt, "test-size ConvNeXt: 32 px (maps 8/4/2/1), dims 16/32/64/128, "
                   "depths 1/1/2/1", tags=("convnext", "convnext_test"), **CONVNEXT_TEST_GEOMETRY)


_register()
