"""STViT demo: fine-tune the dense demo ViT into `stvit_demo_patch8_64` (2 CPU cores, ~3 minutes).

First train the dense model (about 6 minutes), then fine-tune it with 9 semantic tokens (a 3x3
max-pooled grid of the 8x8 patch map) generated in block 1, updated in block 2, alone in block 3:

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/stvit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/stvit_demo

STViT-DeiT's recipe was never published (its code was not released); this is a fine-tuning in
miniature: the generation/update layers start as the dense blocks 1 and 2 (our reading, see
saitjax/models/stvit.py), logit distillation from the dense weights, a small learning rate. The
same weights run dense ("dense" = the DeiT forward) and at other token counts; evaluated at
"dense", "semantic:4@1", the trained "semantic:9@1" and "semantic:16@1".

Arguments: init (required), epochs, batch, lr, tokens, location, distill_weight, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=2e-4, tokens=9, location=1, distill_weight=1.0,
                  data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "stvit_demo_patch8_64"
    c.model_kwargs.update(num_classes=8, drop_path_rate=0.0, semantic_tokens=a.tokens,
                          semantic_location=a.location)
    c.method = "supervised"  # at the model's own spec: the semantic tokens are the forward pass
    if a.distill_weight:
        c.teacher = "init"
        c.method_kwargs.update(distill_weight=a.distill_weight)

    shapes_finetune_recipe(c, a, "configs/stvit_demo.py")
    c.eval.densities = ("dense", f"semantic:4@{a.location}", f"semantic:{a.tokens}@{a.location}",
                        f"semantic:16@{a.location}")
    c.eval.sweep = c.eval.densities
    return finalize(c)
