"""DynamicViT-DeiT on ImageNet-1k: the maintained official recipe (methods.md §4.7).

Start from converted dense DeiT weights, which are also the frozen distillation teacher:

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/dynamicvit_deit_imagenet.py:model=small,rho=0.7,init=deit_s.npz \
        --workdir gs://bucket/dynamicvit_s_0.7 --config.data.manual_dir=/data/imagenet_manual

Published DeiT-S results (top-1 / GMACs): rho 0.9 -> 79.8 / 4.0, rho 0.8 -> 79.8 / 3.4,
rho 0.7 -> 79.3 / 2.9. Without ``init`` the model trains from scratch and without a teacher
(distillation off): a valid run, but not the published recipe.

Recipe: 30 epochs at batch 1024, AdamW (wd 0.05), lr 1e-3 for the predictors and 0.01x for the
backbone, which stays frozen for the first 5 epochs; cls_token and pos_embed are never trained;
5 warm-up epochs, cosine to 1e-6; drop-path 0 (0.2 for base); ratio loss weight 2 (5 for base);
RandAugment, mixup 0.8 / cutmix 1.0, label smoothing 0.1. The official runs evaluate an EMA of
the weights (decay 0.9999); this trainer has no EMA, so expect a small gap.
Not reproduced either: random erasing 0.25.

Arguments: model (tiny/small/base), rho (0.7; the paper uses 0.9, 0.8, 0.7 and 0.5), init
(a converted dense DeiT .npz of the same size), data_dir, manual_dir, batch (1024), epochs (30).
Evaluated at "dense" and "topk:{rho}" (predictors before blocks 3, 6, 9).
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

SIZES = ("tiny", "small", "base")


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="small", rho=0.7, init="", data_dir="", manual_dir="", batch=1024,
                  epochs=30.0)
    if a.model not in SIZES:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {SIZES}")
    base = a.model == "base"
    c = base_config()
    c.model = f"dynamicvit_deit_{a.model}_patch16_224"
    c.model_kwargs.num_classes = 1000
    c.model_kwargs.drop_path_rate = 0.2 if base else 0.0
    c.model_kwargs.keep_rho = a.rho  # the default spec of the exported model
    c.init = a.init
    c.teacher = "init" if a.init else ""

    c.method = "dynamicvit"
    distill = 0.5 if a.init else 0.0
    c.method_kwargs.update(rho=a.rho, locations=(3, 6, 9), ratio_weight=5.0 if base else 2.0,
                           distill_weight=distill, token_distill_weight=distill)

    imagenet_data(c, a.data_dir, a.manual_dir)

    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = 5e-4  # = 1e-3 at batch 1024, the predictors' lr
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 5.0
    c.optim.weight_decay = 0.05
    backbone = r"^(?!predictor_)"  # every parameter that is not a predictor's
    c.optim.lr_multipliers = ((backbone, 0.01),)
    c.optim.frozen_until_epoch = ((backbone, 5.0),)
    c.optim.frozen = (r"^cls_token$", r"^pos_embed$")

    c.eval.densities = ("dense", f"topk:{a.rho:g}")
    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
