"""STViT-DeiT on ImageNet-1k: fine-tune a dense DeiT into semantic tokens (our reading of the paper).

The DeiT version's code and recipe were never released (changsn/STViT-R issue #1), so this is a
stated guess, not a reproduction: DeiT's own fine-tuning hyper-parameters, starting from dense
weights (the generation and update layers are DeiT blocks 4 and 5, see saitjax/models/stvit.py),
with logit distillation from the same dense weights:

    python -m saitjax.tools.convert --src deit_small_patch16_224.safetensors --out deit_s.npz
    python -m saitjax.main --config configs/stvit_deit_imagenet.py:model=small,init=deit_s.npz \
        --workdir /ckpt/stvit_s --config.data.manual_dir=/data/imagenet_manual

Published (abstract only, not verified): 16 semantic tokens on DeiT-T/S/B keep accuracy with
about 60 % fewer FLOPs and > 100 % speed-up; saitjax counts 1.93 GMACs for DeiT-S with 16
tokens from block 4 (dense 4.60: 58 % fewer).

Recipe: 30 epochs at batch 1024, lr 1e-5 per 512 (DeiT's fine-tuning scale) with 2 warm-up
epochs, cosine to 1e-6, weight decay 0.05, DeiT augmentation (RandAugment, mixup 0.8 / cutmix
1.0, label smoothing 0.1), drop-path 0.1, KL distillation to the dense model (weight 1). From
scratch (``init=`` empty): 300 epochs, lr 5e-4 per 512, 5 warm-up epochs, no teacher.

Arguments: model (tiny/small/base), tokens (16), location (4), init, data_dir, manual_dir, batch
(1024), epochs (30 fine-tuning, 300 from scratch), distill_weight (1.0 when init is given).
Evaluated at "dense" (the DeiT forward of the same weights) and at 9 / 16 / 25 semantic tokens.
"""

from saitjax.config import base_config, finalize, imagenet_data, parse_arg

SIZES = ("tiny", "small", "base")


def get_config(arg: str | None = None):
    a = parse_arg(arg, model="small", tokens=16, location=4, init="", data_dir="", manual_dir="",
                  batch=1024, epochs=-1.0, distill_weight=1.0)
    if a.model not in SIZES:
        raise ValueError(f"invalid config: model={a.model!r}; choose one of {SIZES}")
    scratch = not a.init
    c = base_config()
    c.model = f"stvit_deit_{a.model}_patch16_224"
    c.model_kwargs.update(num_classes=1000, drop_path_rate=0.1, semantic_tokens=a.tokens,
                          semantic_location=a.location)
    c.init = a.init
    c.method = "supervised"
    if not scratch and a.distill_weight:
        c.teacher = "init"
        c.method_kwargs.update(distill_weight=a.distill_weight)

    imagenet_data(c, a.data_dir, a.manual_dir)
    c.batch_size = a.batch
    c.train_epochs = a.epochs if a.epochs > 0 else (300.0 if scratch else 30.0)
    c.optim.lr_per_512 = 5e-4 if scratch else 1e-5
    c.optim.min_lr = 1e-5 if scratch else 1e-6
    c.optim.warmup_epochs = 5.0 if scratch else 2.0
    c.optim.weight_decay = 0.05

    loc = a.location
    c.eval.densities = ("dense", f"semantic:9@{loc}", f"semantic:{a.tokens}@{loc}", f"semantic:25@{loc}")
    c.eval.every_steps = 2500
    c.checkpoint.every_steps = 1000
    return finalize(c)
