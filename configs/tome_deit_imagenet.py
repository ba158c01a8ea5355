"""ToMe-DeiT on ImageNet-1k: off-the-shelf merging of DeiT weights, or training with merging in place.

Off the shelf (no training; ToMe's main use): evaluate converted DeiT weights at several r,

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/tome_deit_imagenet.py:model=small,init=deit_s.npz \
        --workdir /tmp/tome_s --mode sweep --config.data.manual_dir=/data/imagenet_manual

(``--mode eval``/``sweep`` evaluate ``init`` when the workdir holds no checkpoint.) A user
reports DeiT-S at r = 13 off the shelf at 78.83 % (ToMe issue #11; dense 79.8 %).

Trained (how ToMe's released DeiT checkpoints were made: the DeiT recipe from scratch with
r = 13 and proportional attention inside the network; DeiT-S 79.36 %, DeiT-Ti 71.27 %):

    python -m saitjax.main --config configs/tome_deit_imagenet.py:model=small,r=13 --workdir gs://bucket/tome_s

DeiT recipe: 300 epochs at batch 1024, lr 5e-4 per 512 images, 5 warm-up epochs, cosine to 1e-5,
wd 0.05, drop-path 0.1, RandAugment, mixup 0.8 / cutmix 1.0, label smoothing 0.1. Not reproduced:
EMA, repeated augmentation, random erasing. ToMe's released checkpoints convert with
``python -m saitjax.tools.convert --src deit_S_r13.pth --model tome_deit_small_patch16_224 --out tome_s.npz``
(their keys are timm DeiT's).

GMACs of DeiT-S (saitjax's count, matching and merging included; backbone alone in brackets):
r = 8: 3.42 (3.42), r = 13: 2.71 (2.70), r = 16: 2.30 (2.29); dense 4.60.

Arguments: model (tiny/small/base), r (13), prop_attn (true), init, data_dir, manual_dir, batch
(1024), epochs (300). Evaluated at "dense", "tome:8", "tome:{r}" and "tome:16".
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

SIZES = ("tiny", "small", "base")


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="small", r=13, prop_attn=True, init="", data_dir="", manual_dir="",
                  batch=1024, epochs=300.0)
    if a.model not in SIZES:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {SIZES}")
    c = base_config()
    c.model = f"tome_deit_{a.model}_patch16_224"
    c.model_kwargs.update(num_classes=1000, drop_path_rate=0.1, r=a.r, prop_attn=a.prop_attn)
    c.init = a.init
    c.method = "supervised"  # at the model's own r: merging is part of the forward pass

    imagenet_data(c, a.data_dir, a.manual_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs
    c.optim.lr_per_512 = 5e-4
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 5.0
    c.optim.weight_decay = 0.05

    c.eval.densities = tuple(dict.fromkeys(("dense", "tome:8", f"tome:{a.r}", "tome:16")))
    c.eval.sweep = c.eval.densities
    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
