"""What the dense hierarchical backbones (Swin, ConvNeXt) share, so that neither copies the other.

:class:`HierarchicalBackbone` is a plain mixin, not a module and not a dataclass: it adds no
fields, only the zoo's static geometry, the stochastic-depth schedule, the dense-only check, the
shared part of the forward and the FLOP total. A model composes it with ``nn.Module`` (``class
SwinTransformer(HierarchicalBackbone, nn.Module)``) and keeps what is its own: its fields, the
stage widths (:attr:`stage_dims`), ``check_geometry``, ``check_images``, the stem and stages, the
head and :meth:`stage_macs`.
"""

from __future__ import annotations

import jax
import numpy as np

from saitjax.models.vit import Aux
from saitjax.sparsity import SparsityError, SparsitySpec

Array = jax.Array


class HierarchicalBackbone:
    """Shared properties and methods of a backbone whose stages halve the map after a patchify stem.

    The model provides the fields ``img_size``, ``patch_size``, ``in_chans``, ``depths``,
    ``num_classes``, ``drop_path_rate``, ``dtype``, an ``embed_dim`` (field or property), the
    property ``stage_dims``, the class attribute ``family`` (its name in messages) and the methods
    ``check_geometry``, ``check_images``, ``embed``, ``run_stage``, ``stage_module`` and ``stage_macs``.
    """

    # -- static geometry (the zoo's attributes) -----------------------------------------------

    distilled = False  # the zoo's flags: no distillation head, no CLS/prefix tokens
    num_prefix_tokens = 0

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        """All blocks of all stages (the zoo's ``depth``)."""
        return sum(self.depths)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Positions after the stem (stage 1: 56x56 = 3136 at 224 px)."""
        return self.grid_size ** 2

    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        """Map side of each stage's output (after its downsample)."""
        return tuple(self.grid_size // 2 ** i for i in range(self.num_stages))

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    def default_sparsity(self) -> SparsitySpec:
        return SparsitySpec.dense()

    def check_per_stage(self, name: str, values) -> None:
        """Raise a ValueError unless the field ``name`` has one entry per stage."""
        if len(values) != self.num_stages:
            raise ValueError(f"{name}={tuple(values)} needs one entry per stage (depths={tuple(self.depths)})")

    def drop_path_rates(self) -> tuple[tuple[float, ...], ...]:
        """Stochastic-depth rate of every block, linear over all blocks (0 .. drop_path_rate), per stage."""
        rates = np.linspace(0.0, self.drop_path_rate, self.depth).tolist()
        starts = np.cumsum((0,) + tuple(self.depths))
        return tuple(tuple(rates[starts[i]:starts[i + 1]]) for i in range(self.num_stages))

    # -- forward ------------------------------------------------------------------------------

    def check_spec(self, spec: SparsitySpec | None) -> None:
        if spec is not None and not spec.is_dense:
            raise SparsityError(f"{type(self).__name__} runs dense only; got sparsity {spec.describe()!r}. "
                                f"Pass sparsity=None (or 'dense'); token reduction on {self.family} is a model "
                                "of its own.")

    def forward_features(self, images: Array, train: bool, sparsity: SparsitySpec | None) -> tuple[Array, Aux]:
        """Checks, ``embed`` and every stage (``run_stage``): the last map ``[B, H, W, C]`` and ``aux``
        with empty ``keep_masks`` / ``keep_indices`` and the stage outputs as ``features``."""
        self.check_images(images)
        self.check_spec(sparsity)
        aux: Aux = {"keep_masks": (), "keep_indices": ()}
        x = self.embed(images.astype(self.dtype), train)
        features = []
        for i in range(self.num_stages):
            x = self.run_stage(i, x, train, aux, sparsity)
            features.append(x)
        aux["features"] = tuple(features)
        return x, aux

    # -- FLOPs (fvcore convention: MACs of convs, linear layers and attention matmuls) ---------

    def stem_macs(self) -> float:
        """The patchify conv: ``N * C * in_chans * patch^2``."""
        return float(self.num_patches * self.embed_dim * self.in_chans * self.patch_size ** 2)

    def analytic_macs(self, spec: SparsitySpec | None = None) -> float:
        """Multiply-accumulates of one forward (``saitjax.flops.analytic_gmacs`` uses it)."""
        self.check_geometry()
        self.check_spec(spec)
        return (self.stem_macs() + sum(self.stage_macs(i) for i in range(self.num_stages))
                + self.num_features * self.num_classes + self.sparsity_macs(spec))

    def sparsity_macs(self, spec: SparsitySpec | None) -> float:
        """MACs that ``spec`` adds to (predictors) or removes from (cheap paths) the dense forward;
        none for a dense backbone."""
        return 0.0


class HierarchicalStage:
    """Mixin for a stage module (``setup`` style) with ``downsample`` (a module or ``None``) and
    ``blocks``: the forward every stage shares, and :meth:`enter` for a model that runs the blocks
    itself (DynamicViT routing stage 3)."""

    def enter(self, x: Array) -> Array:
        """The map the blocks see: downsampled first if this stage downsamples."""
        return x if self.downsample is None else self.downsample(x)

    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.enter(x)
        for block in self.blocks:
            x = block(x, train)
        return x
