"""EViT-DeiT on ImageNet-1k: the official fine-tuning recipe (finetune.sh), or training from scratch.

Fine-tune converted dense DeiT weights (EViT adds no parameters):

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/evit_deit_imagenet.py:model=small,keep=0.7,init=deit_s.npz \
        --workdir gs://bucket/evit_s_0.7 --config.data.manual_dir=/data/imagenet_manual

Published DeiT-S results (official README, fused / unfused): keep 0.9 -> 79.8 / 79.9, 0.8 -> 79.8 /
79.7, 0.7 -> 79.5 / 79.4, 0.6 -> 78.9 / 79.1, 0.5 -> 78.5 / 78.4 % top-1 at 4.0 / 3.5 / 3.0 / 2.6 /
2.3 GMACs (saitjax counts 4.02 / 3.48 / 3.03 / 2.64 / 2.31 for the fused schedule).

Fine-tuning recipe (finetune.sh): 30 epochs at batch 2048 (256 x 8 GPUs), lr 2e-5 per 512 images
(8e-5 at 2048), cosine to 2e-6, no warm-up, weight decay 1e-6, the keep rate constant from the
first step (``shrink_start_epoch=0``: the official default of 10 cost accuracy, issue #3), DeiT
augmentation (RandAugment, mixup 0.8 / cutmix 1.0, label smoothing 0.1), drop-path 0.1.
Not reproduced: EMA of the weights, repeated augmentation, random erasing.

From scratch (``init=`` empty; run_code.sh): 300 epochs, lr 5e-4 per 512, wd 0.05, 5 warm-up
epochs, keep rate 1 for 10 epochs then a cosine down to ``keep`` over 100 epochs, rounded up to
steps of 0.05: 7 training-step compilations from 1 to 0.7 instead of one per distinct rate.

Arguments: model (tiny/small/base), keep (0.7), fuse (true), init, data_dir, manual_dir, batch
(2048), epochs (30 fine-tuning, 300 from scratch). Evaluated at "dense" and "evit:{keep}".
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

SIZES = ("tiny", "small", "base")


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="small", keep=0.7, fuse=True, init="", data_dir="", manual_dir="",
                  batch=2048, epochs=-1.0)
    if a.model not in SIZES:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {SIZES}")
    scratch = not a.init
    c = base_config()
    c.model = f"evit_deit_{a.model}_patch16_224"
    c.model_kwargs.update(num_classes=1000, drop_path_rate=0.1, keep_rate=a.keep, drop_loc=(3, 6, 9),
                          fuse_token=a.fuse)
    c.init = a.init
    c.method = "evit"
    c.method_kwargs.update(shrink_start_epoch=10.0 if scratch else 0.0, shrink_epochs=100.0 if scratch else 0.0,
                           keep_rate_step=0.05)

    imagenet_data(c, a.data_dir, a.manual_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs if a.epochs > 0 else (300.0 if scratch else 30.0)
    c.optim.lr_per_512 = 5e-4 if scratch else 2e-5
    c.optim.min_lr = 1e-5 if scratch else 2e-6
    c.optim.warmup_epochs = 5.0 if scratch else 0.0
    c.optim.weight_decay = 0.05 if scratch else 1e-6

    c.eval.densities = ("dense", f"evit:{a.keep:g}" + ("" if a.fuse else ",fuse=0"))
    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
