"""Registered ViT/DeiT sizes (timm names) and tiny variants for tests and demos."""

from __future__ import annotations

from saitjax.models.registry import register_model
from saitjax.models.vit import VisionTransformer

# (name suffix, width, heads) of the DeiT family; all depth 12, MLP ratio 4, qkv bias.
DEIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


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
                   tags=("test",), img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                   num_classes=10)
    register_model("vit_test_distilled_patch4_32", VisionTransformer,
                   "test-size distilled ViT (CLS + distillation token)",
                   tags=("test", "distilled"), img_size=32, patch_size=4, embed_dim=32, depth=4,
                   num_heads=2, num_classes=10, distilled=True)
    # The embedded demo: trains to ~90 % on saitjax_shapes in a few minutes on 2 CPU cores
    # (~190 img/s for a training step), large enough for pruning to matter (64 patch tokens).
    register_model("vit_demo_patch8_64", VisionTransformer,
                   "demo ViT: 64 px, patch 8 (64 tokens), width 96, depth 4, 3 heads",
                   tags=("demo",), img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                   num_classes=8)

_register_deit()
