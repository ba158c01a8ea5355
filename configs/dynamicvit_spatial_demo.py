"""DynamicViT-Swin demo: fine-tune the dense demo Swin into `dynamicvit_swin_demo_patch2_window4_64` (2 CPU cores).

First train the dense Swin, then fine-tune it with predictors before stage-3 blocks 1, 2, 3
sending 0.7 / 0.5 / 0.3 of the 8x8 stage-3 locations (44 / 31 / 19) through the MLP (slow path)
and the rest through LayerNorm + Linear (fast path):

    python -m saitjax.main --config configs/demo_dense.py:model=swin_demo_patch2_window4_64 \
        --workdir /tmp/swin_demo_dense
    python -m saitjax.main --config configs/dynamicvit_spatial_demo.py:init=/tmp/swin_demo_dense/export/params_step1560.npz \
        --workdir /tmp/dynamicvit_swin_demo

The dense weights are also the frozen distillation teacher. The official hierarchical recipe,
scaled down: loss CE + 10 * ratio + 0.5 * KL + 0.5 * MSE of the final map, new parameters
(predictors, fast paths) at ``lr``, the backbone at 0.2x and frozen for the first epoch.
Evaluated at "dense" and at the trained schedule, both timed at the end (a density sweep).

Arguments: init (required), epochs, batch, lr, rho, data_dir, dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe

MODEL = "dynamicvit_swin_demo_patch2_window4_64"
LOCATIONS = (1, 2, 3)


def get_config(arg: str | None = None):
    import saitjax

    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=1e-3, rho=0.7, data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = MODEL
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0
    c.model_kwargs.keep_rho = a.rho
    c.teacher = "init"

    c.method = "dynamicvit"
    c.method_kwargs.update(rho=a.rho, locations=LOCATIONS, ratio_weight=10.0, distill_weight=0.5,
                           token_distill_weight=0.5)

    shapes_finetune_recipe(c, a, "configs/dynamicvit_spatial_demo.py (dense model: configs/demo_dense.py:model="
                           "swin_demo_patch2_window4_64)", warmup_epochs=0.25)
    backbone = r"^(?!predictor_)(?!.*/fast_path/)"
    c.optim.lr_multipliers = ((backbone, 0.2),)
    c.optim.frozen_until_epoch = ((backbone, 1.0),)

    schedule = saitjax.create_model(MODEL, predictor_locations=LOCATIONS).keep_schedule(a.rho).describe()
    c.eval.densities = ("dense", schedule)
    c.eval.sweep = c.eval.densities  # at the end: img/s, pictures of the slow-path locations
    return finalize(c)
