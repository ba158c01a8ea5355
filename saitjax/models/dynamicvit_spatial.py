"""DynamicViT on ConvNeXt and Swin: dynamic spatial sparsification (Rao et al., T-PAMI 2023).

``dynamicvit_convnext_{tiny,small,base}`` and ``dynamicvit_swin_{tiny,small,base}_patch4_window7_224``
as the official ``dyconvnext.py`` / ``dyswin.py`` build them: predictors before the stage-3 blocks
``predictor_locations`` (ConvNeXt-T, Swin-T: 1, 2, 3; -S/-B: 3, 6, 9 and 2, 4, 6), every later
stage-3 block "routed" -- its depthwise conv / window attention stays dense, and each location then
runs the block's MLP (slow path) or ``LN -> Linear`` (fast path). The slow-path share is
``keep_rho, keep_rho - 0.2, keep_rho - 0.4`` of all stage-3 locations, counted as the official
code counts (``int(N * ratio)`` in float64: 137 / 97 / 58 of 196 at 0.7). Stages 1, 2, 4 are dense.

Forward modes (the ``SparsitySpec``): dense (= the backbone: slow path everywhere), ``gather``
(inference: the slow path runs only on the gathered slow locations), ``mask`` without ``train``
(both paths everywhere, selected: equals ``gather``), ``mask`` with ``train`` (Gumbel decisions,
the official two-stream training; needs the ``gumbel`` rng). Unlike the official Swin model,
inference works at every batch size (the official one fails at batch 2).

Parameters: the backbone's, plus ``predictor_{s}`` (as DynamicViT's ViT predictor, global half a
plain mean) and ``fast_path/{norm,fc[,gamma]}`` in every routed block. Official checkpoints map on
through :attr:`checkpoint_renames` (``score_predictor``, ``fastmlp.fc1``, ``fast_path``,
``fast_path_gamma``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from saitjax.models.core import token_ops
from saitjax.models.convnext import CONVNEXT_SIZES, ConvNeXt, ConvNeXtBlock
from saitjax.models.core.predictors import Predictor, predictor_macs
from saitjax.models.registry import register_model
from saitjax.models.core.spatial_routing import FastPath, RoutedBlock, run_routed_blocks
from saitjax.models.swin import SWIN_DEMO_GEOMETRY, SWIN_SIZES, SwinBlock, SwinTransformer
from saitjax.models.vit import Aux
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array

SPARSE_STAGE = 2  # stage 3 (14x14 at 224 px), the only one the official models sparsify
PREDICTOR_RENAMES = ((r"^(?:layers\.2\.)?score_predictor\.(\d+)\.in_conv\.0\.", r"predictor_\1.in_norm."),
                     (r"^(?:layers\.2\.)?score_predictor\.(\d+)\.in_conv\.1\.", r"predictor_\1.in_fc."),
                     (r"^(?:layers\.2\.)?score_predictor\.(\d+)\.out_conv\.0\.", r"predictor_\1.out_fc1."),
                     (r"^(?:layers\.2\.)?score_predictor\.(\d+)\.out_conv\.2\.", r"predictor_\1.out_fc2."),
                     (r"^(?:layers\.2\.)?score_predictor\.(\d+)\.out_conv\.4\.", r"predictor_\1.out_fc3."))


class ConvNeXtRoutedBlock(RoutedBlock, ConvNeXtBlock):
    """ConvNeXt block with a fast path ``gamma_f * Linear(LN(u))`` (``gamma_f`` starts at the layer-scale init)."""

    residual_from_mixed: ClassVar[bool] = False

    def setup(self):
        super().setup()
        self.fast_path = FastPath(1e-6, self.ls_init_value, self.dtype)


class SwinRoutedBlock(RoutedBlock, SwinBlock):
    """Swin block with a fast path ``Linear(LN(u))`` (no layer scale, LayerNorm eps 1e-5)."""

    residual_from_mixed: ClassVar[bool] = True

    def setup(self):
        super().setup()
        self.fast_path = FastPath(1e-5, None, self.dtype)


class SpatialDynamicViT:
    """The DynamicViT part shared by :class:`DynamicViTConvNeXt` and :class:`DynamicViTSwin`.

    A mixin placed before the backbone class; the model declares the fields ``predictor_locations``
    (stage-3 block indices), ``keep_rho``, ``predictor_eps`` and ``gumbel_tau`` and the class
    attribute ``routed_block``.
    """

    routed_block: ClassVar[type]
    distill_every_location: ClassVar[bool] = True  # the method's feature distillation: all locations

    # -- schedule -------------------------------------------------------------------------------

    @property
    def routed_locations(self) -> int:
        """Locations of the sparsified stage's map (196 at 224 px): what the ratios are fractions of."""
        return self.stage_resolutions[SPARSE_STAGE] ** 2

    @property
    def keep_mask_cell(self) -> int:
        """Pixels per side of one location of a keep mask (16 at stage 3 with a 4-px stem)."""
        return self.patch_size * 2 ** SPARSE_STAGE

    def keep_schedule(self, rho: float, mode: str = "gather") -> SparsitySpec:
        """The official schedule for base rate ``rho``: ``rho, rho - 0.2, rho - 0.4`` at the predictors."""
        return SparsitySpec.linear(rho, self.predictor_locations, 0.2, mode)

    def default_sparsity(self) -> SparsitySpec:
        return self.keep_schedule(self.keep_rho)

    def slow_counts(self, spec: SparsitySpec) -> tuple[int, ...]:
        """Slow-path locations per stage: ``int(N * ratio)``, the official truncation (no epsilon)."""
        return tuple(int(self.routed_locations * r) for r in spec.keep_ratios)

    def check_geometry(self) -> None:
        super().check_geometry()
        locs, depth = tuple(self.predictor_locations), self.depths[SPARSE_STAGE]
        if not locs or any(b <= a for a, b in zip(locs, locs[1:])) or locs[0] < 0 or locs[-1] >= depth:
            raise ValueError(f"predictor_locations={locs} must be strictly increasing stage-3 block indices in "
                             f"[0, {depth - 1}] (depths[2]={depth}); official: (1, 2, 3) for depth 6 or 9, "
                             f"(2, 4, 6) or (3, 6, 9) for 18 or 27")

    def check_spec(self, spec: SparsitySpec | None) -> None:
        if spec is None or spec.is_dense:
            return
        name = type(self).__name__
        if spec.rule != "topk":
            raise SparsityError(f"{name} routes a fixed number of locations per stage (rule 'topk'); "
                                f"{spec.needs_family()}")
        if tuple(spec.locations) != tuple(self.predictor_locations):
            example = self.keep_schedule(0.7).describe()
            raise SparsityError(f"{name} has predictors before stage-3 blocks {tuple(self.predictor_locations)} "
                                f"but the sparsity spec routes at {tuple(spec.locations)}; use "
                                f"model.keep_schedule(rho) or a density such as {example!r}")

    # -- modules and forward ----------------------------------------------------------------------

    def __call__(self, images: Array, *, train: bool = False,
                 sparsity: SparsitySpec | None = None) -> tuple[Array, Aux]:
        """Without ``sparsity``, the model's own schedule (``keep_schedule(keep_rho)``, gathered)."""
        return super().__call__(images, train=train, sparsity=self.default_sparsity() if sparsity is None else sparsity)

    def build_stage(self, i: int, **overrides: Any) -> nn.Module:
        if i == SPARSE_STAGE:
            overrides = dict(routed_block=self.routed_block, routed_from=self.predictor_locations[0], **overrides)
        return super().build_stage(i, **overrides)

    def setup(self):
        super().setup()
        self.predictor = [Predictor(self.predictor_eps, self.dtype) for _ in self.predictor_locations]

    def run_stage(self, i: int, x: Array, train: bool, aux: Aux, sparsity: SparsitySpec | None) -> Array:
        stage = self.stage_module(i)
        if i == SPARSE_STAGE and self.is_initializing():
            self._create_routing_params(stage)
        if i != SPARSE_STAGE or sparsity is None or sparsity.is_dense:
            return super().run_stage(i, x, train, aux, sparsity)
        mode = "sample" if train and sparsity.mode == "mask" else sparsity.mode
        if mode == "sample" and not self.has_rng("gumbel"):
            raise ValueError(f"{type(self).__name__} training (train=True, mode 'mask') samples Gumbel decisions and "
                             "needs the 'gumbel' rng: pass rngs={'gumbel': key, ...} to apply (or train=False for "
                             "the deterministic inference rule)")

        def gumbel(logp: Array) -> Array:
            return token_ops.gumbel_softmax_hard(self.make_rng("gumbel"), logp, self.gumbel_tau)

        x, stage_aux = run_routed_blocks(stage.blocks, self.predictor, self.predictor_locations,
                                         self.slow_counts(sparsity), stage.enter(x), train=train, mode=mode,
                                         gumbel=gumbel)
        aux.update(stage_aux)
        return x

    def _create_routing_params(self, stage: nn.Module) -> None:
        """At init, create every predictor and fast path even if the init spec is dense."""
        c = self.stage_dims[SPARSE_STAGE]
        for predictor in self.predictor:
            predictor(jnp.zeros((1, 1, c), self.dtype), jnp.ones((1, 1), jnp.float32))
        for block in stage.blocks[self.predictor_locations[0]:]:
            block.fast_path(jnp.zeros((1, 1, c), self.dtype))

    # -- FLOPs ----------------------------------------------------------------------------------

    def sparsity_macs(self, spec: SparsitySpec | None) -> float:
        """Predictors on every location, minus what the fast path saves in each routed block
        (``2 r N C^2`` becomes ``2 r k C^2 + (N - k) C^2``); 0 for the dense spec."""
        if spec is None or spec.is_dense:
            return 0.0
        n, c, r = self.routed_locations, self.stage_dims[SPARSE_STAGE], self.mlp_ratio
        counts, locs = self.slow_counts(spec), tuple(self.predictor_locations)
        delta = len(locs) * n * predictor_macs(c)
        for j in range(locs[0], self.depths[SPARSE_STAGE]):
            k = counts[max(s for s, loc in enumerate(locs) if loc <= j)]
            delta += 2 * r * k * c * c + (n - k) * c * c - 2 * r * n * c * c
        return float(delta)


class DynamicViTConvNeXt(SpatialDynamicViT, ConvNeXt):
    """ConvNeXt with DynamicViT's fast/slow paths in stage 3 (the official "DynamicCNN")."""

    predictor_locations: tuple[int, ...] = (1, 2, 3)
    keep_rho: float = 0.7
    predictor_eps: float = 1e-6  # channels-first LayerNorm of the official predictor
    gumbel_tau: float = 1.0

    routed_block: ClassVar[type] = ConvNeXtRoutedBlock
    family = "DynamicViT-ConvNeXt"
    checkpoint_renames = PREDICTOR_RENAMES + (
        (r"\.fast_path\.0\.", ".fast_path.norm."), (r"\.fast_path\.1\.", ".fast_path.fc."),
        (r"\.fast_path_gamma$", ".fast_path.gamma")) + ConvNeXt.checkpoint_renames


class DynamicViTSwin(SpatialDynamicViT, SwinTransformer):
    """Swin with DynamicViT's fast/slow paths in stage 3 (the official "DynamicSwin")."""

    predictor_locations: tuple[int, ...] = (1, 2, 3)
    keep_rho: float = 0.7
    predictor_eps: float = 1e-5
    gumbel_tau: float = 1.0

    routed_block: ClassVar[type] = SwinRoutedBlock
    family = "DynamicViT-Swin"
    checkpoint_renames = PREDICTOR_RENAMES + (
        (r"\.fastmlp\.fc1\.0\.", ".fast_path.norm."), (r"\.fastmlp\.fc1\.1\.", ".fast_path.fc.")
    ) + SwinTransformer.checkpoint_renames


# Test sizes: a 4x4 stage-3 map (16 locations: 11 / 7 / 4 slow at 0.7), four stage-3 blocks.
CONVNEXT_TEST = dict(img_size=64, depths=(1, 1, 4, 1), dims=(16, 32, 64, 128), num_classes=10)
SWIN_TEST = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2, 4, 2),
                 num_heads=(2, 4, 8, 16), num_classes=10)


def guess_dynamicvit_spatial_name(state_dict: Mapping[str, Any], backbone_name: str | None) -> str | None:
    """``dynamicvit_<backbone>`` if a Swin / ConvNeXt state dict carries DynamicViT's extra keys."""
    routed = any(".fastmlp." in k or ".fast_path" in k or "score_predictor." in k for k in state_dict)
    return f"dynamicvit_{backbone_name}" if routed and backbone_name else backbone_name


def _register() -> None:
    for size, (depths, dims) in CONVNEXT_SIZES.items():
        locs = (1, 2, 3) if depths[2] == 9 else (3, 6, 9)
        register_model(f"dynamicvit_convnext_{size}", DynamicViTConvNeXt,
                       f"DynamicViT on ConvNeXt-{size[0].upper()}: predictors before stage-3 blocks {locs}, slow path "
                       "(MLP) on 0.7 / 0.5 / 0.3 of the 14x14 locations, fast path elsewhere", timm_name=f"convnext_{size}",
                       tags=("dynamicvit_spatial",), img_size=224, depths=depths, dims=dims,
                       num_classes=1000, predictor_locations=locs, keep_rho=0.7)
    for size, (dim, depths, heads) in SWIN_SIZES.items():
        locs = (1, 2, 3) if depths[2] == 6 else (2, 4, 6)
        name = f"swin_{size}_patch4_window7_224"
        register_model(f"dynamicvit_{name}", DynamicViTSwin,
                       f"DynamicViT on Swin-{size[0].upper()}: predictors before stage-3 blocks {locs}, slow path "
                       "(MLP) on 0.7 / 0.5 / 0.3 of the 14x14 locations, fast path elsewhere", timm_name=name,
                       tags=("dynamicvit_spatial",), img_size=224, patch_size=4, window_size=7, embed_dim=dim,
                       depths=depths, num_heads=heads, num_classes=1000, predictor_locations=locs, keep_rho=0.7)
    register_model("dynamicvit_convnext_test", DynamicViTConvNeXt,
                   "test-size DynamicViT-ConvNeXt: 64 px (stage-3 map 4x4), dims 16/32/64/128, depths 1/1/4/1",
                   tags=("dynamicvit_spatial", "dynamicvit_spatial_test"), **CONVNEXT_TEST)
    register_model("dynamicvit_swin_demo_patch2_window4_64", DynamicViTSwin,
                   "demo-size DynamicViT-Swin (swin_demo_patch2_window4_64): predictors before stage-3 blocks 1, 2, "
                   "3, slow path on 44 / 31 / 19 of the 8x8 locations", tags=("dynamicvit_spatial", "demo"),
                   predictor_locations=(1, 2, 3), **SWIN_DEMO_GEOMETRY)
    register_model("dynamicvit_swin_test_patch4_window4_64", DynamicViTSwin,
                   "test-size DynamicViT-Swin: 64 px, window 4 (stage-3 map 4x4), width 32, depths 2/2/4/2",
                   tags=("dynamicvit_spatial", "dynamicvit_spatial_test"), **SWIN_TEST)


_register()
