"""DynamicViT demo: fine-tune the dense demo ViT into `dynamicvit_demo_patch8_64` (2 CPU cores).

First train the dense model (about 6 minutes), then fine-tune it with predictors before blocks
1, 2, 3 keeping 0.7 / 0.49 / 0.343 of the 64 patch tokens (44 / 31 / 21):

    python -m saitjax.main --config configs/demo_dense.py --workdir /tmp/demo_dense
    python -m saitjax.main --config configs/dynamicvit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \
        --workdir /tmp/dynamicvit_demo

The dense weights are also the frozen distillation teacher. Evaluated at "dense" and at the
trained schedule "topk:0.7@1/2/3", both also timed at the end (a density sweep). Data and
augmentation are those of configs/demo_dense.py.

Arguments: init (required), epochs, batch, lr (predictors), backbone_lr_mult, rho, data_dir,
dataset.
"""

from saitjax.config import base_config, finalize, parse_arg, shapes_finetune_recipe

LOCATIONS = (1, 2, 3)


def get_config(arg: str | None = None):
    a = parse_arg(arg, init="", epochs=3.0, batch=64, lr=1e-3, backbone_lr_mult=0.1, rho=0.7,
                  data_dir="", dataset="saitjax_shapes")
    c = base_config()
    c.model = "dynamicvit_demo_patch8_64"
    c.model_kwargs.num_classes = 8
    c.model_kwargs.drop_path_rate = 0.0
    c.model_kwargs.keep_rho = a.rho
    c.teacher = "init"

    c.method = "dynamicvit"
    c.method_kwargs.update(rho=a.rho, locations=LOCATIONS, ratio_weight=2.0, distill_weight=0.5,
                           token_distill_weight=0.5)

    shapes_finetune_recipe(c, a, "configs/dynamicvit_demo.py", warmup_epochs=0.25)
    c.optim.lr_multipliers = ((r"^(?!predictor_)", a.backbone_lr_mult),)
    c.optim.frozen = (r"^cls_token$", r"^pos_embed$")

    locs = "/".join(map(str, LOCATIONS))
    c.eval.densities = ("dense", f"topk:{a.rho:g}@{locs}")
    c.eval.sweep = c.eval.densities  # at the end: img/s, pictures of the kept tokens
    return finalize(c)


def get_sweep(hyper):
    """ρ ∈ {0.5, 0.7, 0.9} from the dense demo model on 2-epoch schedules (README table):

    python -m saitjax.launch --config configs/dynamicvit_demo.py:init=/tmp/demo_dense/export/params_step1560.npz \\
        --workdir /tmp/dynamicvit_rho_sweep
    """
    return hyper.product([hyper.fixed("arg.epochs", 2.0), hyper.sweep("arg.rho", [0.5, 0.7, 0.9])])
