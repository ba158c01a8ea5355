"""AS-ViT demo: fine-tune the dense demo ViT into `asvit_demo_patch8_64` (2 CPU cores).

First train the dense model (about 6 minutes), then learn thresholds before blocks 1, 2, 3 under
a FLOPs budget, distilling from the dense weights:

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/asvit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/asvit_demo

Evaluated at "dense" and at the learned thresholds; the final sweep also scales the thresholds
(0.8x, 1.25x, 1.5x) to trade accuracy for speed from the one checkpoint, and runs the learned
ones with 8 sorted micro-batches. Differences from the DeiT recipe, because the demo model is
small: the thresholds start below the uniform score 1/64 (0.004 / 0.006 / 0.008; the official
0.001-0.003 are for 196 tokens); the budget term, an absolute difference in GMACs as in the
official loss, is weighted 20 instead of 2, because the demo model's FLOPs are 139x smaller than
DeiT-S's (weight 2 let the thresholds drift to 0.73 of the dense FLOPs; the "same pull", 280,
held the budget but its gradient through the scores cost the backbone 13 points; 20 holds the
budget, measured); budget 0.6.

Arguments: init (required), epochs, batch, lr, threshold_lr_mult (1: one lr for every weight, as
official), budget, ratio_weight, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe

LOCATIONS = (1, 2, 3)


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=2e-4, threshold_lr_mult=1.0, budget=0.6,
                  ratio_weight=20.0, data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "asvit_demo_patch8_64"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0
    c.model_kwargs.pruning_loc = LOCATIONS
    c.model_kwargs.threshold_init = (0.004, 0.006, 0.008)
    c.model_kwargs.buckets = tuple(i / 8 for i in range(1, 9))
    c.teacher = "init"

    c.method = "asvit"
    c.method_kwargs.update(base_rate=a.budget, ratio_weight=a.ratio_weight, distill_weight=0.5)

    shapes_finetune_recipe(c, a, "configs/asvit_demo.py", warmup_epochs=0.0)
    if a.threshold_lr_mult != 1.0:
        c.optim.lr_multipliers = ((r"^score_predictor_", a.threshold_lr_mult),)

    locs = "/".join(map(str, LOCATIONS))
    c.eval.densities = ("dense", f"learned:1@{locs}")
    c.eval.sweep = ("dense", f"learned:0.8@{locs}", f"learned:1@{locs}", f"learned:1@{locs},chunks=8",
                    f"learned:1.25@{locs}", f"learned:1.5@{locs}")
    return finalize(c)
