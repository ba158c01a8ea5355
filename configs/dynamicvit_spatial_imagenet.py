"""DynamicViT on ConvNeXt / Swin on ImageNet-1k: the published T-PAMI recipe (methods-more.md §7.4).

Start from converted dense weights (timm or official), which are also the frozen teacher:

    python -m saitjax.tools.convert --src convnext_tiny.safetensors --out convnext_t.npz
    python -m saitjax.main --config configs/dynamicvit_spatial_imagenet.py:model=convnext_tiny,rho=0.7,init=convnext_t.npz \
        --workdir gs://bucket/dynamicvit_convnext_t_0.7 --config.data.manual_dir=/data/imagenet_manual

Published (DynamicViT README; top-1 / GFLOPs): ConvNeXt-T 0.7 81.59 / 3.6, 0.9 82.06 / 3.9;
-S 0.7 82.57 / 5.8; -B 0.7 83.45 / 10.2; Swin-T 0.7 80.91 / 4.0; -S 83.21 / 6.9; -B 83.43 / 12.1.

Recipe (README commands, optim_factory.py): 120 epochs, lr 4e-3 at batch 4096 (128 x 8 GPUs x 4
accumulation) for the new parameters (predictors, fast paths), 0.2x for the backbone, which is
frozen for the first 5 epochs; 20 warm-up epochs; AdamW wd 0.05; drop-path 0.2 (tiny, small) or
0.5 (base); loss CE + 10 * ratio + 0.5 * KL + 0.5 * MSE of the final normed map (every location).
Not reproduced: the EMA of the weights (0.9999) the official runs evaluate, random erasing.

Arguments: model (convnext_{tiny,small,base} or swin_{tiny,small,base}), rho (0.7; > 0.4),
init (a converted dense .npz of the same backbone), data_dir, manual_dir, batch (4096), epochs (120).
Evaluated at "dense" and at the trained schedule (rho, rho - 0.2, rho - 0.4 of the 14x14 locations).
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

MODELS = {"convnext_tiny": "dynamicvit_convnext_tiny", "convnext_small": "dynamicvit_convnext_small",
          "convnext_base": "dynamicvit_convnext_base", "swin_tiny": "dynamicvit_swin_tiny_patch4_window7_224",
          "swin_small": "dynamicvit_swin_small_patch4_window7_224",
          "swin_base": "dynamicvit_swin_base_patch4_window7_224"}


def get_config(arg: str | None = None):
    import saitjax

    a = parse_arg(arg, model="convnext_tiny", rho=0.7, init="", data_dir="", manual_dir="", batch=4096,
                  epochs=120.0)
    if a.model not in MODELS:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {tuple(MODELS)}")
    c = base_config()
    c.model = MODELS[a.model]
    c.model_kwargs.num_classes = 1000
    c.model_kwargs.drop_path_rate = 0.5 if a.model.endswith("base") else 0.2
    c.model_kwargs.keep_rho = a.rho
    c.init = a.init
    c.teacher = "init" if a.init else ""

    model = saitjax.create_model(c.model)
    c.method = "dynamicvit"
    distill = 0.5 if a.init else 0.0
    c.method_kwargs.update(rho=a.rho, locations=tuple(model.predictor_locations), ratio_weight=10.0,
                           distill_weight=distill, token_distill_weight=distill)

    imagenet_data(c, a.data_dir, a.manual_dir)

    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = 5e-4  # = 4e-3 at batch 4096
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 20.0
    c.optim.weight_decay = 0.05
    backbone = r"^(?!predictor_)(?!.*/fast_path/)"  # every parameter that is not new
    c.optim.lr_multipliers = ((backbone, 0.2),)
    c.optim.frozen_until_epoch = ((backbone, 5.0),)

    c.eval.densities = ("dense", model.keep_schedule(a.rho).describe())
    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
