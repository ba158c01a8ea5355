"""STViT demo: fine-tune the dense demo ViT into `stvit_demo_patch8_64` (2 CPU cores, ~4 minutes).

First train the dense model (about 6 minutes), then fine-tune it with 9 semantic tokens (a 3x3
max-pooled grid of the 8x8 patch map) generated in block 1, updated in block 2, alone in block 3:

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/stvit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/stvit_demo

STViT-DeiT's recipe was never published (its code was not released); this is a fine-tuning in
miniature: the generation/update layers start as the dense blocks 1 and 2 (our reading, see
saitjax/models/stvit.py), 6 epochs at lr 5e-4, no distillation. Measured (README): 84.15 % at
9 tokens (0.46 of the dense FLOPs) against the dense model's 79.30 % -- and 86.05 % for the
dense model fine-tuned with the same 6 epochs (configs/tome_demo.py:r=0,lr=5e-4,epochs=6),
the fair control. 3 epochs at 2e-4 reach only 75-76 %; logit distillation (``distill_weight=1``,
teacher = the dense weights, or the 86 % control via --config.teacher) did not help (76.0 /
82.8 %). The same weights run dense ("dense" = the DeiT forward, 76.1 % after this fine-tuning:
it trains the semantic path only) and at other token counts; evaluated at "dense",
"semantic:4@1", the trained "semantic:9@1" and "semantic:16@1".

Arguments: init (required), epochs, batch, lr, tokens, location, distill_weight, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=6.0, batch=64, lr=5e-4, tokens=9, location=1, distill_weight=0.0,
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
