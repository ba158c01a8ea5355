"""Registered ViT/DeiT sizes (timm names) and tiny variants for tests and demos."""

from __future__ import annotations

from typing import Any, Callable

from saitjax.models.registry import register_model
from saitjax.models.vit import VisionTransformer

# (name suffix, width, heads) of the DeiT family; all depth 12, MLP ratio 4, qkv bias.
DEIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
# Tiny geometries: unit tests (64 patch tokens, 4 blocks) and the 2-core CPU demo.
TEST_GEOMETRY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
DEMO_GEOMETRY = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=8)


def register_family(prefix: str, constructor: Callable[..., Any], label: str, summary: str, *,
                    distilled: bool = True,
                    test: dict[str, Any] | None = None, demo: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
    """Register a method on every DeiT size, as timm names it, plus its test and demo sizes.

    ``{prefix}_deit_{size}[_distilled]_patch16_224`` with the method's constructor ``kwargs``
    (the DeiT weights load unchanged: ``timm_name`` is the DeiT twin);
    ``{prefix}_test[_distilled]_patch4_32`` and ``{prefix}_demo_patch8_64`` with ``test`` /
    ``demo`` overrides. ``summary`` says what the method does, after "<label> on DeiT-S: ".
    """
    for size, (dim, heads) in DEIT_SIZES.items():
        for dist in (False, True) if distilled else (False,):
            tag = "_distilled" if dist else ""
            register_model(
                f"{prefix}_deit_{size}{tag}_patch16_224", constructor,
                f"{label} on DeiT-{size[0].upper()}{' distilled' if dist else ''}: {summary}",
                timm_name=f"deit_{size}{tag}_patch16_224", tags=(prefix,) + (("distilled",) if dist else ()),
                img_size=224, patch_size=16, embed_dim=dim, depth=12, num_heads=heads, num_classes=1000,
                distilled=dist, **kwargs)
    small = [("test", TEST_GEOMETRY, test, False), ("demo", DEMO_GEOMETRY, demo, False)]
    if distilled:
        small.insert(1, ("test", TEST_GEOMETRY, test, True))
    for kind, geometry, overrides, dist in small:
        if overrides is None:
            continue
        tag = "_distilled" if dist else ""
        name = f"{prefix}_{kind}{tag}_patch{geometry['patch_size']}_{geometry['img_size']}"
        register_model(name, constructor, f"{kind}-size {label}{' (distilled)' if dist else ''}: {summary}",
                       tags=(prefix, kind) + (("distilled",) if dist else ()), distilled=dist,
                       **{**geometry, **kwargs, **overrides})


def _register_deit() -> None:
    for size, (dim, heads) in DEIT_SIZES.items():
        for distilled in (False, True):
            tag = "_distilled" if distilled else ""
            name = f"deit_{size}{tag}_patch16_224"
            register_model(
                name, VisionTransformer,
                f"DeiT-{size[0].upper()}{' distilled' if distilled else ''} (width {dim}, {heads} heads, depth 12) at 224 px",
                timm_name=name, tags=("deit",) + (("distilled",) if distilled else ()),
                img_size=224, patch_size=16, embed_dim=dim, depth=12, num_heads=heads,
                num_classes=1000, distilled=distilled)
    # Tiny variants: fast enough to initialise, run and differentiate in unit tests.
    register_model("vit_test_patch4_32", VisionTransformer,
                   "test-size ViT: 32 px, patch 4 (64 tokens), width 32, depth 4, 2 heads",
                   tags=("test",), **TEST_GEOMETRY)
    register_model("vit_test_distilled_patch4_32", VisionTransformer,
                   "test-size distilled ViT (CLS + distillation token)",
                   tags=("test", "distilled"), distilled=True, **TEST_GEOMETRY)
    # The embedded demo: trains to ~90 % on saitjax_shapes in a few minutes on 2 CPU cores
    # (~190 img/s for a training step), large enough for pruning to matter (64 patch tokens).
    register_model("vit_demo_patch8_64", VisionTransformer,
                   "demo ViT: 64 px, patch 8 (64 tokens), width 96, depth 4, 3 heads",
                   tags=("demo",), **DEMO_GEOMETRY)

_register_deit()
