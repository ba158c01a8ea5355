"""AS-ViT demo: fine-tune the dense demo ViT into `asvit_demo_patch8_64` (2 CPU cores).

First train the dense model (about 6 minutes), then learn thresholds before blocks 1, 2, 3 under
a budget of 0.65 of the dense MACs, distilling from the dense weights:

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/asvit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/asvit_demo

Evaluated at "dense" and at the learned thresholds; the final sweep also scales the thresholds
(0.8x, 1.25x, 1.5x) to trade accuracy for speed from the one checkpoint. The thresholds start at
half the uniform score 1/64 (the official 0.001-0.003 are for 196 tokens) and are learned with
10x the backbone's learning rate so that they move within the short run.

Arguments: init (required), epochs, batch, lr, threshold_lr_mult, budget, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe

LOCATIONS = (1, 2, 3)


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=2e-4, threshold_lr_mult=10.0, budget=0.65,
                  data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "asvit_demo_patch8_64"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0
    c.model_kwargs.pruning_loc = LOCATIONS
    c.model_kwargs.threshold_init = (0.004, 0.006, 0.008)
    c.model_kwargs.buckets = tuple(i / 8 for i in range(1, 9))
    c.teacher = "init"

    c.method = "asvit"
    c.method_kwargs.update(base_rate=a.budget, ratio_weight=2.0, distill_weight=0.5)

    shapes_finetune_recipe(c, a, "configs/asvit_demo.py", warmup_epochs=0.0)
    c.optim.lr_multipliers = ((r"^score_predictor_", a.threshold_lr_mult),)

    locs = "/".join(map(str, LOCATIONS))
    c.eval.densities = ("dense", f"learned:1@{locs}")
    c.eval.sweep = ("dense", f"learned:0.8@{locs}", f"learned:1@{locs}", f"learned:1@{locs},chunks=8",
                    f"learned:1.25@{locs}", f"learned:1.5@{locs}")
    return finalize(c)
